"""Which checkpoints a run keeps across requeues, and a checkpoint when the cluster asks a job to
stop (preemption, time limit) after which a requeued job resumes exactly."""
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import threading
from typing import Dict, List, Sequence

from detectron2.engine import HookBase, hooks, launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from .state import ProcessStates

__all__ = ["PREEMPTED_EXIT_STATUS", "PreemptionCheckpointer", "RotatingCheckpointer",
           "TrainingPreempted", "launch_preemptible", "listen_for_preemption", "parse_signals"]

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT_STATUS = 75

_logger = logging.getLogger(__name__)
# Set by the signal handler, read at step boundaries (and cleared when training ends).
_stop_requested = threading.Event()


class RotatingCheckpointer(hooks.PeriodicCheckpointer):
    """Detectron2's PeriodicCheckpointer hook whose `max_to_keep` counts the periodic checkpoints in
    the output directory, whoever wrote them.

    After each periodic save, of the files named as periodic checkpoints (``model_0009999.pth``)
    up to the current iteration, the newest `max_to_keep` stay: those of this run and of the runs
    it resumed (a requeued job's predecessors, whose preemption checkpoints are named so too).
    ``model_final.pth``, other files and checkpoints of later iterations (left by a run that went
    further) are never deleted. Detectron2's own hook counts only the files its process wrote, so
    every requeue of a job would leave up to `max_to_keep` more.

    Args:
        checkpointer, period, max_iter, file_prefix: as Detectron2's PeriodicCheckpointer.
        max_to_keep: periodic checkpoints kept, ≥ 1; None keeps all.
    """

    def __init__(self, checkpointer, period: int, max_iter: int | None = None,
                 max_to_keep: int | None = None, file_prefix: str = "model"):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be ≥ 1 or None (keep all), got {max_to_keep}")
        super().__init__(checkpointer, period, max_iter, max_to_keep=None,
                         file_prefix=file_prefix)
        self.keep = max_to_keep

    def step(self, iteration: int, **kwargs) -> None:
        super().step(iteration, **kwargs)
        if self.keep is not None and (int(iteration) + 1) % self.period == 0:
            self._delete_older_than_kept(int(iteration))

    def _delete_older_than_kept(self, iteration: int) -> None:
        directory = self.checkpointer.save_dir
        pattern = re.compile(rf"{re.escape(self.file_prefix)}_(\d{{7,}})\.pth")
        matches = filter(None, map(pattern.fullmatch, self.path_manager.ls(directory)))
        periodic = sorted((int(m.group(1)), m.group(0)) for m in matches
                          if int(m.group(1)) <= iteration)
        for _, name in periodic[:-self.keep]:
            self.path_manager.rm(os.path.join(directory, name))


class TrainingPreempted(SystemExit):
    """Training stopped at a signal after writing a checkpoint: the process exits with status
    `PREEMPTED_EXIT_STATUS`. A SystemExit, so that Detectron2's training loop runs its hooks'
    ``after_train`` without reporting an error."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_STATUS)


def parse_signals(names: Sequence[str], key: str) -> List[signal.Signals]:
    """The signals named in `names` (the config value of `key`, such as ("SIGUSR1",)).

    Raises:
        ValueError: naming `key` and the name that is not a signal this process can catch.
    """
    catchable = set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP}
    parsed = []
    for name in names:
        if name not in signal.Signals.__members__ or signal.Signals[name] not in catchable:
            raise ValueError(f"{key} must name signals a process can catch, such as 'SIGUSR1' or "
                             f"'SIGTERM', got {name!r}")
        parsed.append(signal.Signals[name])
    return parsed


def _request_stop(signum: int, frame) -> None:
    _stop_requested.set()


def listen_for_preemption(signals: Sequence[signal.Signals]) -> Dict[signal.Signals, object]:
    """From now on, each of `signals` asks this process's training to stop at the next step
    boundary (`PreemptionCheckpointer`) instead of ending it (SIGUSR1's and SIGTERM's default).
    Training processes call it first thing, so that a signal while the model and data are built
    is not fatal. Python lets only the main thread set handlers: elsewhere it warns and does
    nothing.

    Returns:
        The handlers it replaced, by signal.
    """
    if signals and threading.current_thread() is not threading.main_thread():
        _logger.warning(f"Training runs outside the main thread, where Python cannot catch "
                        f"{', '.join(s.name for s in signals)}: no checkpoint on preemption")
        return {}
    return {s: signal.signal(s, _request_stop) for s in signals}


def _request_requeue() -> bool:
    """Ask SLURM to requeue this job (``scontrol requeue $SLURM_JOB_ID``) when run by SLURM;
    returns whether it was asked and accepted."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        _logger.warning(f"Could not run scontrol to requeue SLURM job {job}: {e}")
        return False
    if result.returncode:
        _logger.warning(f"scontrol requeue {job} failed with status {result.returncode} (was the "
                        f"job submitted with --requeue?): {result.stderr.strip()}")
        return False
    return True


class PreemptionCheckpointer(HookBase):
    """On one of `signals` (SLURM's ``--signal``, a scheduler's SIGTERM), stop training after the
    current step with one checkpoint holding every process's state, then exit with status
    `PREEMPTED_EXIT_STATUS`; under SLURM, process 0 first asks for the job to be requeued.

    Every process checks at each step boundary whether any process has received a signal (one
    all-gather of a flag), so all of them stop after the same iteration, whichever got the
    signal. There, `process_states` gathers each process's buffers and random generators as they
    are (MABN's running_var is not averaged: the resumed run must continue from each process's
    own), and the checkpoint is named as a periodic one (``model_0001234.pth``) and becomes
    ``last_checkpoint``: ``--resume`` continues from it exactly as from a periodic checkpoint. An
    evaluation due at that iteration is not run. After the last iteration there is nothing to
    save: the run finishes as usual.

    Place it right after `ProcessStates`. Every process must run it.

    Args:
        checkpointer: the trainer's DetectionCheckpointer (it writes on process 0 only).
        process_states: the run's `ProcessStates` hook.
        signals: the signals to stop at (`parse_signals`); empty turns the hook off.
    """

    def __init__(self, checkpointer, process_states: ProcessStates,
                 signals: Sequence[signal.Signals]):
        self._checkpointer = checkpointer
        self._process_states = process_states
        self._signals = list(signals)
        self._replaced: Dict[signal.Signals, object] = {}

    def before_train(self):
        self._replaced = listen_for_preemption(self._signals)

    def after_step(self):
        iteration = self.trainer.iter
        if not self._signals or iteration + 1 >= self.trainer.max_iter:
            return
        if not any(comm.all_gather(_stop_requested.is_set())):
            return
        self._process_states.gather()
        # Named as periodic checkpoints are, so that RotatingCheckpointer counts it.
        self._checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        # Before the barrier: once a process exits, the launcher ends the others.
        if comm.is_main_process():
            requeued = _request_requeue()
            _logger.info(
                f"Stopped at a preemption signal after iteration {iteration}: saved "
                f"{self._checkpointer.get_checkpoint_file()}"
                + ("; asked SLURM to requeue the job" if requeued else "")
                + f"; exiting with status {PREEMPTED_EXIT_STATUS} (--resume continues from it)")
        comm.synchronize()
        raise TrainingPreempted()

    def after_train(self):
        for sig, handler in self._replaced.items():
            signal.signal(sig, handler)
        self._replaced = {}
        _stop_requested.clear()


def _forward_to_workers(signum: int, frame) -> None:
    for worker in multiprocessing.active_children():
        os.kill(worker.pid, signum)


def launch_preemptible(main_func, signals: Sequence[signal.Signals], num_gpus_per_machine: int,
                       **launch_kwargs) -> None:
    """Detectron2's `launch`, for training processes that stop on `signals`
    (`PreemptionCheckpointer`).

    With several processes, this (launching) process passes each of `signals` on to them, so
    that a signal sent to it alone (``kill``, a container's SIGTERM) reaches the training; and
    when they stopped for preemption it exits with `PREEMPTED_EXIT_STATUS` too, instead of
    reporting a failed process. With one process, `main_func` runs here and raises
    `TrainingPreempted` itself.

    Args:
        main_func, num_gpus_per_machine, **launch_kwargs: as Detectron2's `launch`.
        signals: as `PreemptionCheckpointer`'s.

    Raises:
        TrainingPreempted: when the training processes stopped for preemption.
    """
    world_size = launch_kwargs.get("num_machines", 1) * num_gpus_per_machine
    replaced = {s: signal.signal(s, _forward_to_workers) for s in signals} if world_size > 1 else {}
    try:
        launch(main_func, num_gpus_per_machine, **launch_kwargs)
    except ProcessExitedException as e:
        if e.exit_code != PREEMPTED_EXIT_STATUS:
            raise
        raise TrainingPreempted() from None
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
