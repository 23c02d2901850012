#!/usr/bin/env python
"""The first minutes of a GPU: are MABN2d's fused Triton kernels right, and how fast are they?

    make gpu-check QUICK=1             # about 4 minutes on a cold H100 (its own estimate below)
    make gpu-check                     # everything: more than one 10-minute device call
    python benchmarks/gpu_check.py --quick --output DIR
    python benchmarks/gpu_check.py --sections smoke checks --budget 540

On the lent device machine (no .venv; see the header of ../shared/tools/device-prep.sh): run
`make device-wheels` once in the repository root, then the device tool's run with carry [".whl"],
timeout_s 300 and

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/gpu_check.py --quick --output $OUT/gpu

Sections, in this order, each in its own process (benchmarks/gpu_check_sections.py) with its own
timeout, so that a sticky CUDA error, a hang or a crash costs one section and the next one still
runs:

1. smoke: one training step of the Triton path at a small shape against the PyTorch path, in one
   process per layout (under 30 s each, cold): do the kernels compile, launch and agree at all?
2. checks: at R50-FPN shapes (64 to 2048 channels; fp32 and bf16; NCHW and NHWC), from one saved
   steady state: 30 replays give the same bits, every ticket is back at 0, the step counter
   advanced by 1; the result matches kernel="torch"; a CUDA-graph replay gives the eager bits.
3. kernels: per training step, device time (profiler, kernels only) and wall time (CUDA events)
   of BatchNorm2d, GroupNorm(32), MABN2d torch and MABN2d Triton under autocast, with fresh inputs
   every step (more than L2 holds), and each fused kernel's time; GB/s are effective ones.
4. maskrcnn: one Mask R-CNN R50-FPN training iteration, 2 images of 800×1216: ms, peak memory.
5. tests: the CUDA tests of tests/layers (pytest -k), last: the slowest to compile.

DIR/gpu_check.md and gpu_check.json (DIR: --output, default docs/gpu) are rewritten after every
row. Before starting, the script estimates each section's seconds (process start, Triton JIT of
the kernel variants not compiled yet, rows); a section whose estimate no longer fits in --budget
is skipped and reported as such. Exits 0 when every section ran and passed, 1 otherwise, 2 (one
line, no traceback) when there is no CUDA device.
"""
import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from typing import Dict, List, Set

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import gpu_check_sections as sections_  # noqa: E402
from gpu_check_report import Report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS_SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check_sections.py")
ORDER = ("smoke", "checks", "kernels", "maskrcnn", "tests")

# The estimate's constants, for a cold H100 machine; gpu_check.json records each section's
# measured seconds beside its estimate, to calibrate them.
PROCESS_S = 8  # python, torch (and Detectron2) imports, the CUDA context
JIT_S = 1.2  # one Triton kernel variant (issue #30: ~250 variants took 5-8 minutes)
ROW_S = {"smoke": 2, "checks": 5, "kernels": 4}  # one row, compiled
MASKRCNN_NORM_S = 10  # per norm: build the model, three warm-up iterations
MASKRCNN_ITER_S = 0.5
MASKRCNN_VARIANTS = 40  # Triton variants of the R50-FPN's MABN layers (NCHW, fp32)
PYTEST_S = 15  # collection and imports
TEST_VARIANTS = {"full": 80, "quick": 12}
TEST_RUN_S = {"full": 40, "quick": 10}

QUICK_TESTS = ("four_kernels or (no_cuda_synchronisation and triton) "
               "or (triton_matches_torch and fp32 and hw16)")
MODES = {
    "quick": dict(checks=["res2-64/fp32/NHWC", "res5/fp32/NCHW"],
                  kernels=["res2-64/bf16/NHWC", "res3-128/bf16/NCHW", "res2/bf16/NHWC",
                           "res5/bf16/NCHW"],
                  maskrcnn=dict(norms=["BN", "MABN Triton"], iters=3), tests=QUICK_TESTS),
    "full": dict(checks=sections_.all_configs(), kernels=sections_.all_configs(),
                 maskrcnn=dict(norms=["BN", "GN", "MABN torch", "MABN Triton"], iters=10),
                 tests="cuda"),
}


@dataclasses.dataclass
class Section:
    """One process of the check: its name, the kind of rows it prints, its command line and the
    seconds it is expected to take."""

    name: str
    kind: str
    command: List[str]
    estimate_s: float


def _new_variants(configs: List[Dict], seen: Set) -> int:
    """Triton kernel variants that `configs` (checks/kernels configurations) compile and `seen`
    does not hold yet (Triton's on-disk cache serves the others to later processes); updates
    `seen`."""
    from mabn_det.layers import mabn_triton

    before = len(seen)
    for c in configs:
        shape, dtype = sections_.SHAPES.get(c["shape"], sections_.SMOKE_SHAPE), c["dtype"]
        channels_last = c["layout"] == "NHWC"
        plan = mabn_triton.Plan(shape, channels_last, 16, 4 * 132,
                                sections_.DTYPES[dtype].itemsize)
        aligned = tuple(size % 16 == 0 for size in shape)
        for kernel in ("fwd_reduce", "bwd_reduce", "scale_add y", "scale_add dx"):
            blocks = plan.elementwise_blocks if "scale" in kernel else plan.reduce_blocks
            seen.add((kernel, channels_last, dtype, tuple(sorted(blocks.items())), aligned))
    return len(seen) - before


def plan_sections(mode: str, names: List[str]) -> List[Section]:
    """The sections of `mode` ("quick" or "full") among `names`, in the order of ORDER, each
    with its estimate."""
    config, seen, out = MODES[mode], set(), []
    base = [sys.executable, SECTIONS_SCRIPT]
    for name in [n for n in ORDER if n in names]:
        if name == "maskrcnn":
            norms, iters = config["maskrcnn"]["norms"], config["maskrcnn"]["iters"]
            command = base + ["maskrcnn", "--norms", *norms, "--iters", str(iters)]
            estimate = (PROCESS_S + len(norms) * (MASKRCNN_NORM_S + iters * MASKRCNN_ITER_S)
                        + JIT_S * MASKRCNN_VARIANTS * ("MABN Triton" in norms))
        elif name == "tests":
            estimate = PROCESS_S + PYTEST_S + JIT_S * TEST_VARIANTS[mode] + TEST_RUN_S[mode]
            command = base + ["tests", "--select", config["tests"],
                              "--timeout", str(int(1.8 * estimate))]
        elif name == "smoke":
            # One process per layout: a layout that hangs or crashes leaves the other's verdict.
            for layout in sections_.LAYOUTS:
                configs = [{"shape": "smoke", "dtype": "fp32", "layout": layout}]
                out.append(Section(f"smoke {layout}", "smoke",
                                   base + ["smoke", "--layouts", layout],
                                   PROCESS_S + JIT_S * _new_variants(configs, seen)
                                   + ROW_S["smoke"]))
            continue
        else:
            configs = [sections_.parse_config(c) for c in config[name]]
            command = base + [name, "--configs", *config[name]]
            estimate = (PROCESS_S + JIT_S * _new_variants(configs, seen)
                        + ROW_S[name] * len(configs))
        out.append(Section(name, name, command, estimate))
    return out


def run_section(section: Section, report: Report, timeout_s: float) -> None:
    """Run one section's process, adding each row to the report as it arrives; a crash, an
    error exit or the timeout ends the section with a failure, never the check."""
    entry = report.start(section.name, section.kind, section.estimate_s,
                         " ".join(os.path.relpath(a, REPO) if a.startswith(REPO) else a
                                  for a in section.command[1:]))
    start = time.perf_counter()
    process = subprocess.Popen(section.command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log: List[str] = []

    def read():
        for line in process.stdout:
            try:
                row = (json.loads(line[len(sections_.ROW_PREFIX):])
                       if line.startswith(sections_.ROW_PREFIX) else None)
            except ValueError:
                row = None
            if row is not None:
                report.add_row(entry, row)
            else:
                log.append(line)
                print(f"  {section.name}: {line}", end="", flush=True)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        code = process.wait(timeout=timeout_s)
        status, failures = ("ok", []) if code == 0 else (
            "crashed", [f"the process exited with {code}"])
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # pytest's child too
        process.wait()
        status, failures = "timed out", [f"timed out after {timeout_s:.0f} s"]
    reader.join()
    report.finish(entry, status, time.perf_counter() - start, failures, "".join(log)[-4000:])


def run(sections: List[Section], report: Report, budget_s: float) -> None:
    """Run the sections in order within `budget_s`; each gets twice its estimate (at least a
    minute) and never more than the budget left; one whose estimate no longer fits is skipped."""
    began = time.perf_counter()
    for section in sections:
        left = budget_s - (time.perf_counter() - began)
        if section.estimate_s > left:
            entry = report.start(section.name, section.kind, section.estimate_s, "not run")
            report.finish(entry, "skipped", 0.0, [f"skipped: estimated {section.estimate_s:.0f} s"
                                                  f", {max(left, 0):.0f} s of the budget left"])
            continue
        print(f"{section.name}: estimated {section.estimate_s:.0f} s, {left:.0f} s left",
              flush=True)
        run_section(section, report, min(left, max(60.0, 2 * section.estimate_s)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "gpu"),
                        help="where gpu_check.md and gpu_check.json go (default: docs/gpu)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes, dtypes, norms and tests: about 4 minutes cold")
    parser.add_argument("--sections", nargs="+", default=list(ORDER), choices=list(ORDER))
    parser.add_argument("--budget", type=float,
                        help="seconds for the whole check (default: 240 quick, 540 full)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device visible to torch {torch.__version__}; nothing was run.")
        return 2
    mode = "quick" if args.quick else "full"
    sections = plan_sections(mode, args.sections)
    budget = args.budget or (240.0 if args.quick else 540.0)
    estimate = sum(s.estimate_s for s in sections)
    title = (f"{common.header('cuda')}, Triton {_distribution_version('triton')}; "
             f"`python benchmarks/gpu_check.py{' --quick' if args.quick else ''}`")
    print(f"{title}\nestimated {estimate:.0f} s in a budget of {budget:.0f} s", flush=True)
    report = Report(args.output, title, {"mode": mode, "estimate_s": estimate, "budget_s": budget})
    run(sections, report, budget)
    print(f"wrote {args.output}/gpu_check.md and gpu_check.json")
    return 1 if report.failed else 0


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


if __name__ == "__main__":
    sys.exit(main())
