#!/usr/bin/env python
"""The first minutes of a GPU: are MABN2d's fused Triton kernels right, and how fast are they?

    make gpu-check                     # .venv's python (else python3); writes docs/gpu/gpu_check.*
    python benchmarks/gpu_check.py --output DIR --sections checks kernels --shapes res2 res5

On the lent device machine (torch 2.11, Triton 3.6, no .venv; see the header of
/work/shared/tools/device-prep.sh): run `make device-wheels` once in the repository root (that
script plus tqdm and portalocker), then the device tool's run with carry [".whl"], timeout_s 540 and

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/gpu_check.py --output $OUT/gpu_check

Sections, in order (about 8 minutes on one H100/H200). After each one, DIR/gpu_check.md and
gpu_check.json are rewritten (DIR: --output, default docs/gpu), so that a run cut short still
leaves what it measured:

1. tests: `pytest -k cuda tests/layers` (the CUDA tests of MABN2d and its Triton path).
2. checks: at R50-FPN shapes (res2-res5, box and mask heads; fp32 and bf16; NCHW and NHWC), from
   one saved steady state (rings full, renormalisation on): 30 replays of a training step give
   the same bits, every ticket is back at 0 and the step counter advanced by 1 each time; the
   result matches kernel="torch"; a CUDA-graph replay of the step gives the eager step's bits.
3. kernels: device time per training step (profiler, kernels only) of nn.BatchNorm2d,
   GroupNorm(32), MABN2d torch and MABN2d Triton under autocast, and each fused kernel's time and
   achieved GB/s (bytes it must move / its time).
4. maskrcnn: one Mask R-CNN R50-FPN training iteration, 2 images of 800×1216 (bench_maskrcnn.py):
   BN, GN, MABN torch, MABN Triton; ms and peak memory.

Exits 0 when every check and test passed, 1 when one failed, 2 (one line, no traceback) when
there is no CUDA device.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from importlib import metadata
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"res2": (2, 256, 200, 336), "res3": (2, 512, 100, 168), "res4": (2, 1024, 50, 84),
          "res5": (2, 2048, 25, 42), "box head": (1024, 256, 7, 7),
          "mask head": (128, 256, 14, 14)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
REPLAYS = 30
# Global-memory traffic of each fused kernel in units of one tensor of the input's size:
# K1 reads x; K2 reads x, writes y; K3 reads dy and x; K4 reads dy and x, writes dx.
KERNEL_TRAFFIC = {"K1 Σx²": 1, "K2 y": 2, "K3 Σdy·x, Σdy": 2, "K4 dx": 3}
# The least a fused forward+backward of any norm must move: x, y, dy, x again, dx.
LAYER_TRAFFIC = 5


class Report:
    """Sections of results, written as JSON and Markdown after each one."""

    def __init__(self, output: str, title: str):
        self.output, self.title = output, title
        self.sections: Dict[str, dict] = {}
        os.makedirs(output, exist_ok=True)

    def add(self, name: str, section: dict) -> None:
        self.sections[name] = section
        with open(os.path.join(self.output, "gpu_check.json"), "w") as f:
            json.dump({"title": self.title, "sections": self.sections}, f, indent=1)
        with open(os.path.join(self.output, "gpu_check.md"), "w") as f:
            f.write(render(self.title, self.sections) + "\n")

    @property
    def failed(self) -> bool:
        return any(section.get("failures") for section in self.sections.values())


def render(title: str, sections: Dict[str, dict]) -> str:
    """Markdown of the sections done so far (pure: tested on CPU)."""
    lines = ["# MABN2d on CUDA: `make gpu-check`", "", title, ""]
    if "tests" in sections:
        s = sections["tests"]
        lines += ["## CUDA tests", "", f"`{s['command']}`: {s['summary']} ({s['seconds']:.0f} s)",
                  ""]
    if "checks" in sections:
        rows = [[r["shape"], r["dtype"], r["layout"], r["replays"], r["tickets"], r["iteration"],
                 r["graph"], r["parity"]] for r in sections["checks"]["rows"]]
        lines += ["## Triton path at production shapes", "",
                  f"From one saved steady state: {REPLAYS} replays bit-identical, tickets at 0, "
                  "step counter +1; CUDA-graph replay = eager; largest difference to "
                  'kernel="torch" relative to the output\'s largest magnitude.', "",
                  common.markdown_table(["shape", "dtype", "layout", "replays", "tickets",
                                         "iteration", "CUDA graph", "parity"], rows), ""]
    if "kernels" in sections:
        k = sections["kernels"]
        rows = [[r["shape"], r["dtype"], r["layout"]]
                + [_cell(r["layers"].get(name), r["layers"].get("BatchNorm2d"))
                   for name in k["layers"]] for r in k["rows"]]
        lines += ["## Device time per training step (forward+backward)", "",
                  f"µs of kernel time per step (profiler), GB/s at {LAYER_TRAFFIC} tensor passes "
                  "(the least a fused norm moves), ratio to BatchNorm2d; under autocast.", "",
                  common.markdown_table(["shape", "dtype", "layout"] + k["layers"], rows), ""]
        rows = [[r["shape"], r["dtype"], r["layout"]]
                + [f"{t['us']:.1f} µs, {t['gbps']:.0f} GB/s" for t in r["triton_kernels"]]
                for r in k["rows"] if r.get("triton_kernels")]
        if rows:
            lines += ["### The four fused kernels", "",
                      common.markdown_table(["shape", "dtype", "layout"] + list(KERNEL_TRAFFIC),
                                            rows), ""]
    if "maskrcnn" in sections:
        m = sections["maskrcnn"]
        lines += [f"## Mask R-CNN R50-FPN training iteration ({m['setting']})", "",
                  common.markdown_table(["norm", "ms / iteration", "vs BN", "peak memory (GiB)"],
                                        m["rows"]), ""]
    failures = [f"- {name}: {f}" for name, s in sections.items() for f in s.get("failures", [])]
    lines += ["## Failures", ""] + (failures or ["none"])
    return "\n".join(lines)


def _cell(layer: dict | None, bn: dict | None) -> str:
    if not layer:
        return "–"
    if "error" in layer:
        return f"error: {layer['error']}"
    ratio = f", {layer['us'] / bn['us']:.2f}×" if bn and "us" in bn else ""
    return f"{layer['us']:.0f} µs, {layer['gbps']:.0f} GB/s{ratio}"


def gbps(tensor_bytes: int, passes: int, us: float) -> float:
    return passes * tensor_bytes / (us * 1e-6) / 1e9


# ------------------------------------------------------------------------------------------------
# 1. tests


def run_cuda_tests(timeout: int) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
               "tests/layers"]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"{e.stdout or ''}\ntimed out after {timeout} s", -1
    summary = next((line.strip("= ") for line in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|error)", line)), "no summary")
    failures = [] if code == 0 else [f"pytest exit {code}: {summary}"]
    return {"command": "pytest -k cuda tests/layers", "summary": summary, "failures": failures,
            "seconds": time.perf_counter() - start, "output_tail": output[-6000:]}


# ------------------------------------------------------------------------------------------------
# 2. checks


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


def inputs(shape, dtype, layout, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(1)
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


def parity(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], dtype) -> tuple:
    """(largest difference relative to each output's largest magnitude, within tolerance)."""
    rel = max(float((got[k].float() - want[k].float()).abs().max())
              / max(float(want[k].float().abs().max()), 1.0) for k in want)
    return rel, rel <= (1e-4 if dtype == torch.float32 else 3e-2)


def check_config(shape, dtype, layout, device: str = "cuda", replays: int = REPLAYS,
                 graph: bool = True) -> dict:
    """The checks of section 2 for one input (on the CPU only under TRITON_INTERPRET=1, for the
    tests of this script: no CUDA graph there)."""
    tri, ref = steady_layer(shape[1], "triton", device), steady_layer(shape[1], "torch", device)
    x, dy = inputs(shape, dtype, layout, device)
    saved = {k: v.clone() for k, v in tri.state_dict().items()}
    first = train_step(tri, x, dy)
    after = {k: v.clone() for k, v in tri.state_dict().items()}
    out, failures = {}, []
    tickets = tri._triton_tickets
    repeated, tickets_ok, iteration_ok = 0, True, True
    for _ in range(replays):
        tri.load_state_dict(saved)
        got = train_step(tri, x, dy)
        state = tri.state_dict()
        repeated += not (_differing(got, first) or _differing(state, after))
        tickets_ok &= not bool(tickets.any())
        iteration_ok &= int(state["iteration"]) == int(saved["iteration"]) + 1
    out["replays"] = f"{repeated}/{replays}"
    out["tickets"] = "0" if tickets_ok else "held"
    out["iteration"] = "+1" if iteration_ok else "wrong"
    failures += [] if repeated == replays else [f"{replays - repeated} replays differ"]
    failures += [] if tickets_ok else ["a ticket is not back at 0"]
    failures += [] if iteration_ok else ["the step counter did not advance by 1"]
    ref.load_state_dict(saved)
    want = train_step(ref, x, dy)
    rel, ok = parity(first, want, dtype)
    state_rel, state_ok = parity({k: v for k, v in after.items() if v.is_floating_point()},
                                 {k: v for k, v in ref.state_dict().items()
                                  if v.is_floating_point()}, torch.float32)
    out["parity"] = f"{rel:.1e} (state {state_rel:.1e})"
    failures += [] if ok and state_ok else [f'differs from kernel="torch" by {rel:.2e} '
                                            f"(state {state_rel:.2e})"]
    if not graph:
        out.update(graph="not run", failures=failures)
        return out
    try:
        tri.load_state_dict(saved)
        differ = _differing(graph_step(tri, x, dy, saved), first)
        out["graph"] = "same bits" if not differ else f"differs: {', '.join(differ)}"
        failures += [f"CUDA graph replay: {', '.join(differ)} differ"] if differ else []
    except Exception as e:  # noqa: BLE001 - a capture failure is a result to report
        out["graph"] = f"error: {type(e).__name__}"
        failures.append(f"CUDA graph capture: {type(e).__name__}: {e}")
    out["failures"] = failures
    return out


def run_checks(shapes: List[str]) -> dict:
    rows, failures = [], []
    for name, shape, dtype_name, layout_name in _configs(shapes):
        row = {"shape": name, "dtype": dtype_name, "layout": layout_name}
        try:
            row.update(check_config(shape, DTYPES[dtype_name], LAYOUTS[layout_name]))
        except Exception as e:  # noqa: BLE001 - reported, the next configuration still runs
            row.update(replays="–", tickets="–", iteration="–", graph="–",
                       parity=f"error: {type(e).__name__}",
                       failures=[f"{type(e).__name__}: {e}",
                                 traceback.format_exc(limit=-3)])
        failures += [f"{name} {dtype_name} {layout_name}: {f}" for f in row["failures"]]
        rows.append(row)
        print(f"  checked {name} {dtype_name} {layout_name}: "
              f"{'; '.join(row['failures']) or 'ok'}", flush=True)
    return {"rows": rows, "failures": failures}


def _configs(shapes: List[str]):
    return [(name, SHAPES[name], dtype_name, layout_name) for name in shapes
            for dtype_name in DTYPES for layout_name in LAYOUTS]


# ------------------------------------------------------------------------------------------------
# 3. kernels


def kernel_times(step: Callable[[], None], steps: int) -> List[List[tuple]]:
    """Per step, the (name, µs) of each CUDA kernel it ran, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.name, e.time_range.elapsed_us())
                     for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    per_step = len(kernels) // steps
    return [[(name, us) for _, name, us in kernels[i * per_step:(i + 1) * per_step]]
            for i in range(steps)]


def time_layers(shape, dtype, layout, steps: int = 20) -> dict:
    from torch import nn

    x, dy = inputs(shape, dtype, layout)
    x.requires_grad_()
    layers = {"BatchNorm2d": nn.BatchNorm2d(shape[1]), "GroupNorm(32)": nn.GroupNorm(32, shape[1]),
              "MABN2d torch": steady_layer(shape[1], "torch"),
              "MABN2d Triton": steady_layer(shape[1], "triton")}
    tensor_bytes = x.numel() * x.element_size()
    out, kernels = {}, None
    for name, layer in layers.items():
        layer = layer.cuda().train()

        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                y = layer(x)
            y.backward(dy)

        try:
            per_step = kernel_times(step, steps)
        except Exception as e:  # noqa: BLE001 - reported in the table
            out[name] = {"error": type(e).__name__}
            continue
        us = sorted(sum(t for _, t in s) for s in per_step)[steps // 2]
        out[name] = {"us": us, "gbps": gbps(tensor_bytes, LAYER_TRAFFIC, us),
                     "launches": len(per_step[0])}
        if name == "MABN2d Triton":
            kernels = per_step
    row = {"layers": out}
    if kernels and all(len(s) == len(KERNEL_TRAFFIC) for s in kernels):
        row["triton_kernels"] = []
        for i, (label, passes) in enumerate(KERNEL_TRAFFIC.items()):
            us = sorted(s[i][1] for s in kernels)[steps // 2]
            row["triton_kernels"].append({"kernel": label, "name": kernels[0][i][0], "us": us,
                                          "gbps": gbps(tensor_bytes, passes, us)})
    elif kernels:
        row["unexpected_kernels"] = [name for name, _ in kernels[0]]
    return row


def run_kernel_timings(shapes: List[str]) -> dict:
    rows, failures = [], []
    for name, shape, dtype_name, layout_name in _configs(shapes):
        row = {"shape": name, "dtype": dtype_name, "layout": layout_name}
        row.update(time_layers(shape, DTYPES[dtype_name], LAYOUTS[layout_name]))
        if "unexpected_kernels" in row:
            failures.append(f"{name} {dtype_name} {layout_name}: the Triton step launched "
                            f"{row['unexpected_kernels']}, expected the four fused kernels")
        rows.append(row)
        print(f"  timed {name} {dtype_name} {layout_name}", flush=True)
    return {"layers": ["BatchNorm2d", "GroupNorm(32)", "MABN2d torch", "MABN2d Triton"],
            "rows": rows, "failures": failures}


# ------------------------------------------------------------------------------------------------
# 4. Mask R-CNN


def run_maskrcnn(iters: int) -> dict:
    import bench_maskrcnn

    size, width = 800, int(800 * 1.52) // 32 * 32
    batch = bench_maskrcnn._batch(size, width, "cuda")
    rows, failures, bn = [], [], None
    for label, norm, kernel in [("BN", "BN", "torch"), ("GN", "GN", "torch"),
                                ("MABN torch", "MABN", "torch"),
                                ("MABN Triton", "MABN", "triton")]:
        try:
            seconds, peak, _, _ = bench_maskrcnn.measure(norm, "cuda", batch, iters, kernel)
        except Exception as e:  # noqa: BLE001 - reported
            rows.append([label, f"error: {type(e).__name__}", "–", "–"])
            failures.append(f"{label}: {type(e).__name__}: {e}")
            continue
        bn = bn or seconds
        rows.append([label, f"{seconds * 1e3:.1f}", f"{seconds / bn:.3f}×", f"{peak:.2f}"])
        print(f"  {label}: {seconds * 1e3:.1f} ms", flush=True)
        torch.cuda.empty_cache()
    return {"setting": f"2 images {size}×{width}, median of {iters}", "rows": rows,
            "failures": failures}


# ------------------------------------------------------------------------------------------------


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "gpu"),
                        help="where gpu_check.md and gpu_check.json go (default: docs/gpu)")
    parser.add_argument("--sections", nargs="+", default=["tests", "checks", "kernels", "maskrcnn"],
                        choices=["tests", "checks", "kernels", "maskrcnn"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                        metavar="SHAPE",
                        help=f"the shapes of sections 2 and 3 (default: all, {list(SHAPES)})")
    parser.add_argument("--test-timeout", type=int, default=240)
    parser.add_argument("--iters", type=int, default=10, help="Mask R-CNN iterations timed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device visible to torch {torch.__version__}; nothing was run.")
        return 2
    # The version only: Triton itself is MABN2d's to import (mabn_det[triton]).
    title = (f"{common.header('cuda')}, Triton {_distribution_version('triton')}; "
             f"`python benchmarks/gpu_check.py`")
    print(title, flush=True)
    report = Report(args.output, title)
    sections = {"tests": lambda: run_cuda_tests(args.test_timeout),
                "checks": lambda: run_checks(args.shapes),
                "kernels": lambda: run_kernel_timings(args.shapes),
                "maskrcnn": lambda: run_maskrcnn(args.iters)}
    began = time.perf_counter()
    for name in args.sections:
        print(f"{name} ({time.perf_counter() - began:.0f} s)", flush=True)
        report.add(name, sections[name]())
    print(render(title, report.sections))
    print(f"wrote {args.output}/gpu_check.md and gpu_check.json in "
          f"{time.perf_counter() - began:.0f} s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
