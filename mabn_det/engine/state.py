"""What the processes of a run share and what each keeps: MABN's inference statistics averaged
across processes before every checkpoint and evaluation, every process's own training state in
the checkpoint, and random generators that evaluation leaves alone."""
import contextlib
import logging
import random
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from ..layers import MABN2d

__all__ = ["ProcessStates", "average_mabn_statistics", "get_rng_state", "preserved_rng",
           "set_rng_state"]


def get_rng_state() -> dict:
    """This process's python, numpy, torch (and CUDA) generator states, in types that
    `torch.load(weights_only=True)` accepts."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` returned."""
    random.setstate(state["python"])
    keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        ("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore this process's random generators on exit: what runs inside (an evaluation, whose
    loader start draws from torch's generator; PreciseBN's training forwards, which sample
    proposals) takes nothing from the training's random streams."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@torch.no_grad()
def average_mabn_statistics(model: nn.Module) -> None:
    """Set every MABN2d's ``running_var``, in every process, to its mean over the processes.

    One all-reduce of the concatenated running_var (C floats per layer). With one process, or a
    model without MABN2d, nothing happens. Every process must call it (a collective).
    """
    layers = [m for m in model.modules() if isinstance(m, MABN2d)]
    world_size = comm.get_world_size()
    if world_size == 1 or not layers:
        return
    flat = torch.cat([m.running_var for m in layers])
    dist.all_reduce(flat)
    flat /= world_size
    for m, mean in zip(layers, flat.split([m.num_features for m in layers])):
        m.running_var.copy_(mean)


class ProcessStates(HookBase):
    """Before every checkpoint and every evaluation: one set of MABN inference statistics, and
    every process's training state collected for the checkpoint.

    After iteration i where a checkpoint or an evaluation follows (i + 1 a multiple of one of
    `periods`, or the last iteration), every process's MABN2d ``running_var`` becomes the mean over
    the processes (`average_mabn_statistics`) and stays so: from then on every process trains on
    from that mean. Rings, step and skip counters and every other buffer stay each process's own.
    So the saved model, the evaluation on every process's share of the test set, and a later
    ``--eval-only`` of the saved model use one and the same statistic. Then every process's
    buffers and random-generator states are gathered to process 0, whose checkpoint holds them
    (as this hook's state in the trainer's); `load_state_dict` gives each process back its own.

    Place it after the LR scheduler and before the checkpointer and the evaluation. Every process
    must run it.

    Args:
        model: the unwrapped model.
        periods: iterations between checkpoints and between evaluations (0: none).
        data_seed: the seed of the training data order, shared by all processes; kept in the
            checkpoint so that a resumed run continues the same order.
    """

    def __init__(self, model: nn.Module, periods: Sequence[int], data_seed: int):
        self._model = model
        self._periods = [p for p in periods if p > 0]
        self.data_seed = data_seed
        self._gathered: tuple[int, List[dict]] | None = None
        self._rng_to_restore: dict | None = None

    def _own_state(self) -> dict:
        parameters = {name for name, _ in self._model.named_parameters()}
        buffers = {name: value.detach().to("cpu", copy=True)
                   for name, value in self._model.state_dict().items() if name not in parameters}
        return {"buffers": buffers, "rng": get_rng_state()}

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or any(next_iter % p == 0 for p in self._periods):
            average_mabn_statistics(self._model)
            self.gather()

    def gather(self) -> None:
        """Gather every process's buffers and random-generator states, as they are now, for a
        checkpoint of this iteration (`state_dict`). Every process must call it (a collective);
        `after_step` does at the iterations of `periods`."""
        self._gathered = (self.trainer.iter, comm.gather(self._own_state()))

    def state_dict(self) -> dict:
        """The data seed and, when gathered at this iteration, every process's state (in rank
        order); a checkpoint saved at another time holds None there (a resume from it is not
        exact) unless there is one process."""
        if self._gathered is not None and self._gathered[0] == self.trainer.iter:
            processes = self._gathered[1]
        elif comm.get_world_size() == 1:
            processes = [self._own_state()]
        else:
            processes = None
        return {"data_seed": self.data_seed, "processes": processes}

    def load_state_dict(self, state: Dict) -> None:
        """Take the data seed, and this process's buffers (into the model, now) and generator
        states (restored when training starts) from a checkpoint written by as many processes."""
        self.data_seed = state["data_seed"]
        processes = state["processes"]
        world_size = comm.get_world_size()
        if processes is None or len(processes) != world_size:
            written_by = "an unknown number of" if processes is None else len(processes)
            logging.getLogger(__name__).warning(
                f"The checkpoint holds the training state of {written_by} processes, not "
                f"{world_size}: every process resumes with process 0's buffers and its own "
                "random generators, so the resumed run is not an exact continuation")
            return
        own = processes[comm.get_rank()]
        buffers = dict(self._model.named_buffers())
        with torch.no_grad():
            for name, value in own["buffers"].items():
                buffers[name].copy_(value)
        self._rng_to_restore = own["rng"]

    def before_train(self):
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
