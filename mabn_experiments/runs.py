"""Running a grid of independent training runs, tabulating their results and committing them."""
import concurrent.futures
import multiprocessing
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Iterator, List, Sequence, Tuple, TypeVar

import torch
from tqdm import tqdm

__all__ = ["code_commit", "commit_files", "describe_machine", "markdown_table", "mean_and_std",
           "run_as_completed", "run_in_processes", "threads_per_job"]

Task = TypeVar("Task")
Result = TypeVar("Result")


def threads_per_job(jobs: int) -> int:
    """CPU threads each of `jobs` concurrent processes may use without oversubscribing the cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


def run_as_completed(fn: Callable[[Task], Result], tasks: Sequence[Task], jobs: int,
                     desc: str) -> Iterator[Tuple[int, Result]]:
    """Yield `(i, fn(tasks[i]))` for every task as soon as it is done, `jobs` at a time, each in a
    fresh spawned process, with a progress bar.

    A fresh process per run keeps runs independent: Detectron2's catalogs, loggers and torch's
    thread pools are process-global. `fn` must be importable (defined at module level).
    """
    context = multiprocessing.get_context("spawn")
    # One task per worker: a reused worker would carry over the last run's loggers and catalogs.
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context,
                                                max_tasks_per_child=1) as pool:
        futures = {pool.submit(fn, task): index for index, task in enumerate(tasks)}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                           desc=desc, unit="run"):
            yield futures[future], future.result()


def run_in_processes(fn: Callable[[Task], Result], tasks: Sequence[Task], jobs: int,
                     desc: str) -> List[Result]:
    """`[fn(t) for t in tasks]`, computed as `run_as_completed` does."""
    results = dict(run_as_completed(fn, tasks, jobs, desc))
    return [results[index] for index in range(len(tasks))]


def mean_and_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with one row per entry of `rows`, cells formatted with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def describe_machine() -> str:
    """The CPU model and core count (and GPU, if any), e.g. "AMD EPYC 9B14, 2 cores, no GPU"."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {gpu}"


# How long `commit_files` waits for another git process (another helper's merge, a second study
# process) to release the repository's index, or for a merge in progress to end.
GIT_LOCK_TIMEOUT_S = 3600.0
_BUSY_MARKERS = ("index.lock", "MERGE_HEAD", "CHERRY_PICK_HEAD", "REBASE_HEAD")


def commit_files(paths: Sequence[str], message: str,
                 lock_timeout_s: float = GIT_LOCK_TIMEOUT_S) -> bool:
    """`git add` and `git commit` exactly `paths` in the repository that holds them, nothing else.

    `git commit -- paths` commits only the given paths, even when the index holds other staged
    changes, which stay staged. While another git process holds `.git/index.lock`, or a merge,
    cherry-pick or rebase is in progress (git refuses a partial commit then), waits and retries
    (up to `lock_timeout_s`).

    Args:
        paths: files inside one git work tree.
        message: the commit message.

    Returns:
        True if a commit was made; False if the files were already committed as they are.

    Raises:
        RuntimeError: git failed for another reason, or the lock was held for too long.
    """
    paths = [os.path.abspath(p) for p in paths]
    repo = _git(os.path.dirname(paths[0]), "rev-parse", "--show-toplevel").stdout.strip()
    git_dir = _git(repo, "rev-parse", "--absolute-git-dir").stdout.strip()
    deadline = time.monotonic() + lock_timeout_s
    while True:
        if not any(os.path.exists(os.path.join(git_dir, name)) for name in _BUSY_MARKERS):
            added = _git(repo, "add", "--", *paths, check=False)
            changed = _git(repo, "diff", "--cached", "--quiet", "--", *paths, check=False)
            if added.returncode == 0 and changed.returncode == 0:
                return False
            if added.returncode == 0:
                committed = _git(repo, "commit", "-q", "-m", message, "--", *paths, check=False)
                if committed.returncode == 0:
                    return True
                added = committed
            if "index.lock" not in added.stderr:
                raise RuntimeError(f"git failed in {repo}: {added.stderr.strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{git_dir} was busy ({', '.join(_BUSY_MARKERS)}) for over "
                               f"{lock_timeout_s:.0f} s; not committed: {', '.join(paths)}")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))  # not past the deadline


def code_commit(path: str) -> str | None:
    """The commit checked out in the git work tree holding `path` (with "+changes" if its tracked
    files differ from it), or None outside git or where git is not installed."""
    try:
        head = _git(path, "rev-parse", "HEAD", check=False)
    except FileNotFoundError:  # a machine given only the files, such as a lent GPU
        return None
    if head.returncode:
        return None
    dirty = _git(path, "diff", "HEAD", "--quiet", check=False).returncode
    return head.stdout.strip() + ("+changes" if dirty else "")


def _git(cwd: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {result.stderr.strip()}")
    return result
