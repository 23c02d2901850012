#!/usr/bin/env python
"""Forward+backward time of one normalisation layer, and its ratio to nn.BatchNorm2d.

Compares, at the same input: nn.BatchNorm2d (training mode), nn.GroupNorm(32), mabn_det's MABN2d
(in its steady state: moving averages and renormalisation active), and a naive MABN written op by op
with Python-side step counting (the formulation of the paper, implemented without fusion) as a
reference point. Prints a Markdown table with the device name; each cell also gives, in brackets,
the kernel launches of one forward+backward (CUDA: counted by the profiler; CPU: ATen ops that
would each be a kernel on a GPU).

    python benchmarks/bench_layers.py                 # CPU shapes (and CUDA shapes when present)
    python benchmarks/bench_layers.py --device cuda   # R50-FPN shapes, 2 images of 800×1216
    python benchmarks/bench_layers.py --device cuda --kernel triton   # MABN2d's Triton path only
    python benchmarks/bench_layers.py --markdown output/bench_layers.md  # also as a Markdown file
    python benchmarks/bench_layers.py --clock cpu     # CPU time of one thread: for a busy machine
    python benchmarks/bench_layers.py --baseline DIR  # MABN2d against DIR's (an older checkout)

MABN2d runs with kernel="torch" and, on CUDA, kernel="triton" (`--kernel` picks one). On CPU it
also prints the ATen ops of one forward+backward counted both ways of benchmarks/launch_count.py.
`--baseline DIR` times, on CPU, the MABN2d of another checkout (DIR/mabn_det, e.g. a `git worktree`
of an older commit) against this one in the same process, their steps interleaved in small blocks
and timed by one thread's CPU time, so that a busy machine slows both alike.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch
from torch import nn

import common
from launch_count import count_launches, layer_step_ops
from mabn_det.layers import MABN2d

CPU_SHAPES = {"(2,256,64,64)": (2, 256, 64, 64), "(2,64,128,128)": (2, 64, 128, 128),
              "(256,256,7,7)": (256, 256, 7, 7)}
# Mask R-CNN R50-FPN with 2 images of 800×1216: the four ResNet stages, box head, mask head.
CUDA_SHAPES = {"res2": (2, 256, 200, 336), "res3": (2, 512, 100, 168), "res4": (2, 1024, 50, 84),
               "res5": (2, 2048, 25, 42), "box head": (1024, 256, 7, 7),
               "mask head": (128, 256, 14, 14)}


class NaiveMABN(nn.Module):
    """MABN written directly from the equations: one op per term, a Python step counter and
    Python branches on it, autograd through the averaged backward via a custom Function."""

    def __init__(self, channels: int, buffer_size: int = 16, eps: float = 1e-5, clip: float = 5.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("chi", torch.zeros(buffer_size, channels))
        self.register_buffer("psi", torch.zeros(buffer_size, channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.step, self.m, self.eps, self.clip = 0, buffer_size, eps, clip

    def forward(self, x):
        self.step += 1
        layer = self

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, weight, bias):
                chi = x.pow(2).mean(dim=(0, 2, 3))
                layer.chi[layer.step % layer.m] = chi
                var = layer.chi.mean(0)
                sigma = (var + layer.eps).sqrt()
                r = (sigma / (layer.running_var + layer.eps).sqrt()).clamp(1 / layer.clip,
                                                                            layer.clip)
                z = x / sigma.view(1, -1, 1, 1)
                layer.running_var.mul_(0.98).add_(0.02 * var)
                ctx.save_for_backward(z, weight, sigma, r)
                return weight.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) * z + bias.view(1, -1, 1, 1)

            @staticmethod
            def backward(ctx, dy):
                z, weight, sigma, r = ctx.saved_tensors
                g = dy * (weight * r).view(1, -1, 1, 1)
                layer.psi[layer.step % layer.m] = (g * z).mean(dim=(0, 2, 3))
                psi = layer.psi.mean(0)
                dx = (g - z * psi.view(1, -1, 1, 1)) / sigma.view(1, -1, 1, 1)
                return dx, (dy * z * r.view(1, -1, 1, 1)).sum(dim=(0, 2, 3)), dy.sum(dim=(0, 2, 3))

        return Fn.apply(x, self.weight, self.bias)


def _layers(channels: int, kernels: List[str]) -> Dict[str, nn.Module]:
    layers = {"BatchNorm2d": nn.BatchNorm2d(channels), "GroupNorm(32)": nn.GroupNorm(32, channels)}
    for kernel in kernels:
        name = "MABN2d" if kernel == "torch" else f"MABN2d ({kernel})"
        layers[name] = MABN2d(channels, warmup_iters=0, renorm_warmup_iters=0, kernel=kernel)
    layers["naive MABN"] = NaiveMABN(channels)
    return layers


def op_counts(channels: int = 32) -> str:
    """Markdown: the ATen ops of one forward+backward on CPU, as issue #30 counted them (leaf
    ops, gradients accumulating into existing .grad) and as ops that do work (fresh .grad)."""
    rows = []
    x = torch.randn(2, channels, 5, 6, requires_grad=True)
    dy = torch.randn_like(x)
    for name, layer in _layers(channels, ["torch"]).items():
        counts = [len(layer_step_ops(layer, x, dy, how)) for how in ("leaf", "work")]
        rows.append([name] + counts)
    return common.markdown_table(["layer", "leaf ops (issue #30's count)", "ops that do work"],
                                 rows)


def _baseline_mabn(checkout: str):
    """MABN2d of another checkout, imported under another package name (its mabn.py and the
    modules it imports relatively)."""
    layers = os.path.join(checkout, "mabn_det", "layers")
    spec = importlib.util.spec_from_file_location(
        "baseline_layers", os.path.join(layers, "__init__.py"), submodule_search_locations=[layers])
    package = importlib.util.module_from_spec(spec)  # not executed: only its submodules are used
    sys.modules["baseline_layers"] = package
    return importlib.import_module("baseline_layers.mabn").MABN2d


def compare_with(checkout: str, shapes: Dict[str, Tuple[int, ...]], rounds: int,
                 block: int = 4) -> str:
    """Markdown: CPU time of one thread per forward+backward, DIR's MABN2d against this one."""
    torch.set_num_threads(1)
    versions = {"baseline": _baseline_mabn(checkout), "this": MABN2d}
    rows = []
    for label, shape in shapes.items():
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        times = {}
        for name, cls in versions.items():
            layer = cls(shape[1], warmup_iters=0, renorm_warmup_iters=0)

            def step(layer=layer):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).backward(dy)

            times[name] = (step, [])
            for _ in range(3):
                step()
        for r in range(rounds):
            for name in (list(times) if r % 2 == 0 else list(times)[::-1]):
                step, taken = times[name]
                for _ in range(block):
                    start = time.thread_time()
                    step()
                    taken.append(time.thread_time() - start)
        old, new = (statistics.median(times[n][1]) for n in versions)
        rows.append([label, f"{old * 1e3:.3f}", f"{new * 1e3:.3f}", f"{new / old:.3f}"])
    return common.markdown_table(["shape", "baseline (ms)", "this (ms)", "this / baseline"],
                                 rows)


def bench_shape(shape: Tuple[int, ...], device: str, dtype: torch.dtype, channels_last: bool,
                repeats: int, kernels: List[str],
                clock=time.perf_counter) -> Dict[str, Tuple[float, int]]:
    """(seconds, kernel launches) per forward+backward of each layer at `shape`."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype=dtype, memory_format=memory_format)
    x.requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype=dtype, memory_format=memory_format)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    result = {}
    for name, layer in _layers(shape[1], kernels).items():
        layer = layer.to(device).train()

        def step():
            # Fresh gradients: no accumulation kernels in the count.
            x.grad = None
            layer.zero_grad(set_to_none=True)
            with autocast:
                y = layer(x)
            y.backward(dy.to(y.dtype))

        seconds = common.median_seconds(step, repeats, common.synchronizer(device), clock=clock)
        result[name] = seconds, count_launches(step, device)
    return result


def table(device: str, shapes: Dict[str, Tuple[int, ...]], dtypes: List[torch.dtype],
          formats: List[bool], repeats: int, kernels: List[str], clock=time.perf_counter) -> str:
    """Markdown: BatchNorm2d's ms and every other layer's time as a multiple of it."""
    names = list(_layers(32, kernels))
    rows = []
    for label, shape in shapes.items():
        for dtype in dtypes:
            for channels_last in formats:
                r = bench_shape(shape, device, dtype, channels_last, repeats, kernels, clock)
                bn_seconds, bn_launches = r["BatchNorm2d"]
                rows.append([label, str(dtype).split(".")[-1], "NHWC" if channels_last else "NCHW",
                             f"{bn_seconds * 1e3:.2f} ({bn_launches})"]
                            + [f"{r[n][0] / bn_seconds:.2f}× ({r[n][1]})" for n in names[1:]])
    return common.markdown_table(
        ["shape", "dtype", "layout", "BatchNorm2d (ms)"] + [f"{n} / BN" for n in names[1:]], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], action="append",
                        help="default: cpu, plus cuda when available")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: one torch thread, timed by its CPU time (CPU devices only)")
    parser.add_argument("--kernel", choices=["torch", "triton"], action="append",
                        help="MABN2d implementation(s) to time; default: torch, plus triton on "
                             "CUDA (the Triton path runs on CUDA only)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="compare MABN2d with DIR's on CPU (and do nothing else)")
    common.add_markdown_argument(parser)
    args = parser.parse_args()
    if args.baseline:
        shapes = {**CPU_SHAPES, "(2,256,16,16)": (2, 256, 16, 16), "(2,64,8,8)": (2, 64, 8, 8)}
        lines = [f"{common.header('cpu')}; forward+backward, CPU time of one thread, median of "
                 f"{args.repeats * 4} steps each, interleaved; baseline: {args.baseline}", "",
                 compare_with(args.baseline, shapes, args.repeats), ""]
        print("\n".join(lines))
        common.write_markdown(args.markdown, "MABN2d against a baseline", lines)
        return
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = []
    for device in devices:
        kernels = args.kernel or (["torch", "triton"] if device == "cuda" else ["torch"])
        if device != "cuda" and "triton" in kernels:
            print("\nMABN2d(kernel='triton') runs on CUDA only; timing its PyTorch path on CPU")
            kernels = ["torch"]
        clock = time.perf_counter
        if device == "cuda":
            note = ("forward+backward, median of {}; (n) = kernel launches per forward+backward")
            shapes, dtypes, formats = (CUDA_SHAPES, [torch.float32, torch.float16, torch.bfloat16],
                                       [False, True])
        else:
            note = ("forward+backward, median of {}; (n) = ATen ops that do work per "
                    "forward+backward, each a kernel launch on a GPU")
            shapes, dtypes, formats = CPU_SHAPES, [torch.float32], [False]
            if args.clock == "cpu":
                torch.set_num_threads(1)
                clock = time.thread_time
                note += "; CPU time of one thread"
        lines += [f"{common.header(device)}; {note.format(args.repeats)}", "",
                  table(device, shapes, dtypes, formats, args.repeats, kernels, clock), ""]
        if device == "cpu":
            lines += [op_counts(), ""]
        print("\n" + "\n".join(lines[-6 if device == "cpu" else -4:]))
    common.write_markdown(args.markdown, "Forward+backward of one normalisation layer", lines)


if __name__ == "__main__":
    main()
