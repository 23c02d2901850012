"""What the benchmark scripts share: the machine they ran on, the timing loops, Markdown output.

The scripts in benchmarks/ are run as files (`python benchmarks/bench_layers.py`), which puts this
directory on sys.path, so they import this module as `common`.
"""
import argparse
import datetime
import os
import statistics
import time
from typing import Callable, Dict, Sequence

import torch

from mabn_experiments.runs import code_commit, describe_machine, markdown_table

__all__ = ["NORM_KEYS", "machine", "versions", "header", "synchronizer", "median_seconds",
           "time_interleaved", "markdown_table", "add_markdown_argument", "write_markdown"]

# The normalised sites of a Mask R-CNN R50-FPN (every one is set to the norm under test).
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
             "MODEL.ROI_MASK_HEAD.NORM")


def machine(device: str = "cpu") -> str:
    """The machine a measurement ran on: its CPU (and GPU), plus, for CPU runs, torch's threads."""
    if device == "cuda":
        return f"{describe_machine()}, CUDA {torch.version.cuda}"
    return f"{describe_machine()}, {torch.get_num_threads()} torch threads"


def versions(*modules: str) -> str:
    """'torch X, <module> Y, ...' for torch and each importable one of `modules`."""
    parts = [f"torch {torch.__version__}"]
    for module in modules:
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            parts.append(f"{module} missing")
    return ", ".join(parts)


def header(device: str = "cpu", *modules: str) -> str:
    """One line for the top of a results table: date, the code's commit, machine, versions."""
    commit = code_commit(os.path.dirname(os.path.abspath(__file__))) or "outside git"
    code = commit[:12] + ("+changes" if commit.endswith("+changes") else "")
    return (f"{datetime.date.today().isoformat()}; code {code}; {machine(device)}; "
            f"{versions(*modules)}")


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading the clock, so that the device's queued work is counted."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None],
                   warmup: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of `fn` over `repeats` calls after `warmup` calls, by `clock` (wall time,
    or e.g. time.thread_time: CPU time, which other processes on the cores do not inflate)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return statistics.median(times)


def time_interleaved(runners: Dict[str, Callable[[], object]], repeats: int,
                     sync: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """Median seconds per call of each runner, repeats interleaved round-robin, under no_grad.

    One warm-up call each, then `repeats` rounds; the starting runner rotates every round so that
    none always follows the same neighbour, and a shared, noisy machine slows every runner alike.
    """
    names = list(runners)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            runners[n]()
        sync()
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                runners[n]()
                sync()
                times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def add_markdown_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write the results as a Markdown file (for docs/)")


def write_markdown(path: str | None, title: str, lines: Sequence[str]) -> None:
    """Write `title` and `lines` (header line, tables) to `path`, if one was given."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {title}\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {path}")
