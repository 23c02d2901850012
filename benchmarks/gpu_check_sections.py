#!/usr/bin/env python
"""The sections of `make gpu-check`, one per process: each prints its rows as they are measured.

    python benchmarks/gpu_check_sections.py SECTION [--configs SHAPE/DTYPE/LAYOUT ...] [...]

SECTION is one of smoke, checks, kernels, maskrcnn, tests; checks and kernels take configurations
such as ``res5/bf16/NHWC`` (default: every shape, dtype and layout). Every row goes to stdout as
one line ``GPU_CHECK_ROW <json>`` the moment it is measured; benchmarks/gpu_check.py starts each
section in its own process with its own timeout, so that a sticky CUDA error, a hang or a crash
costs that section alone. An error inside a row is reported in the row (its message and the last
frames), and the next row still runs.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, Iterable, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_report import KERNEL_TRAFFIC, LAYER_TRAFFIC  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_PREFIX = "GPU_CHECK_ROW "
# R50-FPN at 2 images of 800×1216: the 64- and 128-channel convs inside res2 and res3, the stage
# outputs (256 ... 2048 channels), the heads (512 RoIs and 64 detections per image).
SHAPES = {"res2-64": (2, 64, 200, 336), "res3-128": (2, 128, 100, 168),
          "res2": (2, 256, 200, 336), "res3": (2, 512, 100, 168), "res4": (2, 1024, 50, 84),
          "res5": (2, 2048, 25, 42), "box head": (1024, 256, 7, 7),
          "mask head": (128, 256, 14, 14)}
SMOKE_SHAPE = (2, 64, 32, 48)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
REPLAYS = 30
# Inputs rotated through in the timings, at least this many bytes of x and dy together, so that
# no step finds the previous one's tensors in L2 (50 MB on an H100).
FRESH_BYTES = 256 * 2**20


def emit(row: Dict) -> None:
    print(ROW_PREFIX + json.dumps(row), flush=True)


def error_text(e: BaseException) -> str:
    """The exception's type, message and last frames, for a row of the report."""
    frames = "".join(traceback.format_tb(e.__traceback__, limit=-3)).strip()
    return f"{type(e).__name__}: {e}\n{frames}"


def steady_layer(channels: int, kernel: str, device: str = "cuda"):
    """An MABN2d past its warm-ups, rings full of plausible statistics."""
    from mabn_det.layers import MABN2d

    layer = MABN2d(channels, kernel=kernel, warmup_iters=10, renorm_warmup_iters=10).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        layer.iteration.fill_(100)
        layer.chi_buffer.uniform_(0.5, 2.0, generator=g)
        layer.psi_buffer.normal_(0.0, 0.01, generator=g)
        layer.running_var.uniform_(0.5, 2.0, generator=g)
        layer.weight.uniform_(0.5, 1.5, generator=g)
        layer.bias.normal_(0.0, 1.0, generator=g)
    return layer


def inputs(shape, dtype, layout, device: str = "cuda", seed: int = 1):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, device=device, generator=g).to(dtype).contiguous(memory_format=layout)
    dy = torch.randn(shape, device=device, generator=g).to(dtype).contiguous(memory_format=layout)
    return x, dy


def train_step(layer, x, dy) -> Dict[str, torch.Tensor]:
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dgamma": layer.weight.grad, "dbeta": layer.bias.grad}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.view(ints), b.view(ints)
    return torch.equal(a, b)


def _differing(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k in want if not _same_bits(got[k], want[k])]


def parity(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], dtype) -> tuple:
    """(largest difference relative to each output's largest magnitude, within tolerance)."""
    rel = max(float((got[k].float() - want[k].float()).abs().max())
              / max(float(want[k].float().abs().max()), 1.0) for k in want)
    return rel, rel <= (1e-4 if dtype == torch.float32 else 3e-2)


def smoke(layout: str) -> Dict:
    """One steady-state training step of the Triton path at a small shape against the PyTorch
    path: whether the kernels compile, launch and agree, before anything long runs."""
    start = time.perf_counter()
    x, dy = inputs(SMOKE_SHAPE, torch.float32, LAYOUTS[layout])
    got = train_step(steady_layer(SMOKE_SHAPE[1], "triton"), x, dy)
    want = train_step(steady_layer(SMOKE_SHAPE[1], "torch"), x, dy)
    rel, ok = parity(got, want, torch.float32)
    torch.cuda.synchronize()
    return {"parity": f"{rel:.1e}", "seconds": time.perf_counter() - start,
            "failures": [] if ok else [f'differs from kernel="torch" by {rel:.2e}']}


def graph_step(layer, x, dy, saved) -> Dict[str, torch.Tensor]:
    """The training step captured in a CUDA graph and replayed once from `saved`."""
    x = x.detach().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        for _ in range(2):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.backward(dy)
    layer.load_state_dict(saved)
    graph.replay()
    torch.cuda.synchronize()
    return {"y": y.detach().clone(), "dx": x.grad.clone(), "dgamma": layer.weight.grad.clone(),
            "dbeta": layer.bias.grad.clone()}


def check_config(shape, dtype, layout, device: str = "cuda", replays: int = REPLAYS,
                 graph: bool = True) -> Dict:
    """Replays from one saved steady state, tickets, step counter, parity with the PyTorch path
    and a CUDA-graph replay, for one input (on the CPU only under TRITON_INTERPRET=1, for the
    tests of this script: no CUDA graph there)."""
    tri, ref = steady_layer(shape[1], "triton", device), steady_layer(shape[1], "torch", device)
    x, dy = inputs(shape, dtype, layout, device)
    saved = {k: v.clone() for k, v in tri.state_dict().items()}
    first = train_step(tri, x, dy)
    after = {k: v.clone() for k, v in tri.state_dict().items()}
    repeated, tickets_ok, iteration_ok = 0, True, True
    for _ in range(replays):
        tri.load_state_dict(saved)
        got = train_step(tri, x, dy)
        state = tri.state_dict()
        repeated += not (_differing(got, first) or _differing(state, after))
        tickets_ok &= not bool(tri._triton_tickets.any())
        iteration_ok &= int(state["iteration"]) == int(saved["iteration"]) + 1
    out = {"replays": f"{repeated}/{replays}", "tickets": "0" if tickets_ok else "held",
           "iteration": "+1" if iteration_ok else "wrong"}
    failures = [] if repeated == replays else [f"{replays - repeated} replays differ"]
    failures += [] if tickets_ok else ["a ticket is not back at 0"]
    failures += [] if iteration_ok else ["the step counter did not advance by 1"]
    ref.load_state_dict(saved)
    rel, ok = parity(first, train_step(ref, x, dy), dtype)
    state_rel, state_ok = parity({k: v for k, v in after.items() if v.is_floating_point()},
                                 {k: v for k, v in ref.state_dict().items()
                                  if v.is_floating_point()}, torch.float32)
    out["parity"] = f"{rel:.1e} (state {state_rel:.1e})"
    failures += [] if ok and state_ok else [f'differs from kernel="torch" by {rel:.2e} '
                                            f"(state {state_rel:.2e})"]
    out["graph"] = "not run"
    if graph:
        try:
            tri.load_state_dict(saved)
            differ = _differing(graph_step(tri, x, dy, saved), first)
            out["graph"] = "same bits" if not differ else f"differs: {', '.join(differ)}"
            failures += [f"CUDA graph replay: {', '.join(differ)} differ"] if differ else []
        except Exception as e:  # noqa: BLE001 - a capture failure is a result to report
            out["graph"] = f"error: {type(e).__name__}"
            failures.append(f"CUDA graph capture: {error_text(e)}")
    out["failures"] = failures
    return out


def _fresh_inputs(shape, dtype, layout, device: str = "cuda") -> List[tuple]:
    """Enough different (x, dy) pairs that cycling through them never hits L2."""
    pair_bytes = 2 * torch.Size(shape).numel() * dtype.itemsize
    count = max(2, min(16, -(-FRESH_BYTES // pair_bytes)))
    pairs = [inputs(shape, dtype, layout, device, seed) for seed in range(count)]
    for x, _ in pairs:
        x.requires_grad_()
    return pairs


def _profiled_steps(step: Callable[[int], None], steps: int) -> List[List[tuple]]:
    """Per step, the (name, device µs) of each CUDA kernel it ran, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.name, e.time_range.elapsed_us())
                     for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    per_step = len(kernels) // steps
    return [[(name, us) for _, name, us in kernels[i * per_step:(i + 1) * per_step]]
            for i in range(steps)]


def _wall_us(step: Callable[[int], None], steps: int) -> float:
    """Median wall time of a step between two CUDA events, launch gaps included."""
    times = []
    for i in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _gbps(tensor_bytes: int, passes: int, us: float) -> float | None:
    return passes * tensor_bytes / (us * 1e-6) / 1e9 if us > 0 else None


def time_layers(shape, dtype, layout, steps: int = 20) -> Dict:
    from torch import nn

    pairs = _fresh_inputs(shape, dtype, layout)
    x0 = pairs[0][0]
    layers = {"BatchNorm2d": nn.BatchNorm2d(shape[1]), "GroupNorm(32)": nn.GroupNorm(32, shape[1]),
              "MABN2d torch": steady_layer(shape[1], "torch"),
              "MABN2d Triton": steady_layer(shape[1], "triton")}
    tensor_bytes = x0.numel() * x0.element_size()
    out, fused = {}, None
    for name, layer in layers.items():
        layer = layer.cuda().train()

        def step(i):
            x, dy = pairs[i % len(pairs)]
            x.grad = None
            layer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                y = layer(x)
            y.backward(dy.to(y.dtype))  # GroupNorm runs in float32 under autocast

        try:
            for i in range(len(pairs)):
                step(i)
            torch.cuda.synchronize()
            per_step = _profiled_steps(step, steps)
            device_us = sorted(sum(t for _, t in s) for s in per_step)[steps // 2]
            out[name] = {"device_us": device_us, "wall_us": _wall_us(step, steps),
                         "gbps": _gbps(tensor_bytes, LAYER_TRAFFIC, device_us),
                         "launches": len(per_step[0])}
        except Exception as e:  # noqa: BLE001 - reported in the table, the next layer runs
            out[name] = {"error": error_text(e)}
            continue
        if name == "MABN2d Triton":
            fused = per_step
    row = {"layer_names": list(layers), "layers": out, "failures": []}
    if fused and all(len(s) == len(KERNEL_TRAFFIC) for s in fused):
        row["triton_kernels"] = []
        for i, (label, passes) in enumerate(KERNEL_TRAFFIC.items()):
            us = sorted(s[i][1] for s in fused)[steps // 2]
            row["triton_kernels"].append({"kernel": label, "name": fused[0][i][0], "us": us,
                                          "gbps": _gbps(tensor_bytes, passes, us)})
    elif fused:
        row["failures"].append(f"the Triton step launched {[n for n, _ in fused[0]]}, "
                               "expected the four fused kernels")
    row["failures"] += [f"{name}: {layer['error']}" for name, layer in out.items()
                        if "error" in layer]
    return row


def all_configs() -> List[str]:
    """Every SHAPE/DTYPE/LAYOUT."""
    return [f"{shape}/{dtype}/{layout}" for shape in SHAPES for dtype in DTYPES
            for layout in LAYOUTS]


def parse_config(text: str) -> Dict:
    """"res5/bf16/NHWC" → {"shape": "res5", "dtype": "bf16", "layout": "NHWC"}."""
    parts = text.split("/")
    if (len(parts) != 3 or parts[0] not in SHAPES or parts[1] not in DTYPES
            or parts[2] not in LAYOUTS):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SHAPE/DTYPE/LAYOUT with SHAPE in {list(SHAPES)}, DTYPE in "
            f"{list(DTYPES)} and LAYOUT in {list(LAYOUTS)}")
    return dict(zip(("shape", "dtype", "layout"), parts))


def run_rows(configs: Iterable[Dict], measure: Callable[[Dict], Dict]) -> None:
    """Emit one row per configuration; an error becomes the row's failure."""
    for config in configs:
        try:
            row = measure(config)
        except Exception as e:  # noqa: BLE001 - reported, the next configuration still runs
            row = {"failures": [error_text(e)]}
        emit({**config, **row})


def maskrcnn(args) -> None:
    import bench_maskrcnn

    size, width = 800, int(800 * 1.52) // 32 * 32
    batch = bench_maskrcnn._batch(size, width, "cuda")
    setting = f"2 images {size}×{width}, median of {args.iters} iterations"
    bn_seconds = None
    for label in args.norms:
        norm, kernel = {"BN": ("BN", "torch"), "GN": ("GN", "torch"),
                        "MABN torch": ("MABN", "torch"), "MABN Triton": ("MABN", "triton")}[label]
        row = {"norm": label, "setting": setting, "ms": "–", "vs_bn": "–", "peak_gib": "–",
               "failures": []}
        try:
            seconds, peak, _, _ = bench_maskrcnn.measure(norm, "cuda", batch, args.iters, kernel)
            bn_seconds = bn_seconds or (seconds if label == "BN" else None)
            row.update(ms=f"{seconds * 1e3:.1f}", peak_gib=f"{peak:.2f}",
                       vs_bn=f"{seconds / bn_seconds:.3f}×" if bn_seconds else "–")
        except Exception as e:  # noqa: BLE001 - reported, the next norm still runs
            row["failures"].append(error_text(e))
        emit(row)
        torch.cuda.empty_cache()


def tests(args) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", args.select,
               "tests/layers"]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                timeout=args.timeout)
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"{e.stdout or ''}\ntimed out after {args.timeout} s", -1
    summary = next((line.strip("= ") for line in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|error)", line)), "no summary")
    emit({"command": f"pytest -k '{args.select}' tests/layers", "summary": summary,
          "seconds": time.perf_counter() - start, "output_tail": output[-4000:],
          "failures": [] if code == 0 else [f"pytest exit {code}: {summary}"]})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["smoke", "checks", "kernels", "maskrcnn", "tests"])
    parser.add_argument("--configs", nargs="+", type=parse_config,
                        default=[parse_config(c) for c in all_configs()])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                        help="smoke: the layouts to try")
    parser.add_argument("--norms", nargs="+", default=["BN", "GN", "MABN torch", "MABN Triton"])
    parser.add_argument("--iters", type=int, default=10, help="Mask R-CNN iterations timed")
    parser.add_argument("--select", default="cuda", help="pytest -k expression of the tests")
    parser.add_argument("--timeout", type=int, default=300, help="seconds pytest may take")
    args = parser.parse_args(argv)
    if args.section == "smoke":
        run_rows(({"shape": str(SMOKE_SHAPE), "dtype": "fp32", "layout": layout}
                  for layout in args.layouts), lambda c: smoke(c["layout"]))
    elif args.section == "checks":
        run_rows(args.configs, lambda c: check_config(SHAPES[c["shape"]], DTYPES[c["dtype"]],
                                                      LAYOUTS[c["layout"]]))
    elif args.section == "kernels":
        run_rows(args.configs, lambda c: time_layers(SHAPES[c["shape"]], DTYPES[c["dtype"]],
                                                     LAYOUTS[c["layout"]]))
    else:
        {"maskrcnn": maskrcnn, "tests": tests}[args.section](args)


if __name__ == "__main__":
    main()
