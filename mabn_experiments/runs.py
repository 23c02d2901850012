"""Running a grid of independent training runs and tabulating their results."""
import concurrent.futures
import multiprocessing
import os
import statistics
from typing import Callable, List, Sequence, Tuple, TypeVar

from tqdm import tqdm

__all__ = ["markdown_table", "mean_and_std", "run_in_processes", "threads_per_job"]

Task = TypeVar("Task")
Result = TypeVar("Result")


def threads_per_job(jobs: int) -> int:
    """CPU threads each of `jobs` concurrent processes may use without oversubscribing the cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


def run_in_processes(fn: Callable[[Task], Result], tasks: Sequence[Task], jobs: int,
                     desc: str) -> List[Result]:
    """`[fn(t) for t in tasks]`, `jobs` at a time, each in a fresh spawned process, with a bar.

    A fresh process per run keeps runs independent: Detectron2's catalogs, loggers and torch's
    thread pools are process-global. `fn` must be importable (defined at module level).
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(tqdm(pool.map(fn, tasks), total=len(tasks), desc=desc, unit="run"))


def mean_and_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with one row per entry of `rows`, cells formatted with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
