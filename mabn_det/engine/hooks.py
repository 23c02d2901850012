"""Watching MABN during training (diagnostics in the EventStorage, a clear error on NaN), and
PreciseBN for MABN, for evaluation only."""
import contextlib
import functools
import logging
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch import nn
from tqdm import tqdm

from ..layers import MABN2d
from .state import average_mabn_statistics, preserved_rng

__all__ = ["MABNDiagnostics", "precise_mabn_statistics", "update_mabn_stats"]


class MABNDiagnostics(HookBase):
    """Every `period` iterations, put MABN statistics of the whole model into the EventStorage.

    Scalars (so they reach the console and TensorBoard):
      - ``mabn/renorm_mean``: mean of r over all channels of all layers (1 until renorm starts);
      - ``mabn/renorm_clipped``: fraction of channels whose r sits at a clip bound;
      - ``mabn/chi_ratio_max``: the largest ratio, either way, between a batch's χ and the moving
        average it is normalised by: how far one batch strays from the averaged statistics;
      - ``mabn/skipped_forward`` / ``mabn/skipped_backward``: non-finite statistics kept out of the
        buffers so far.
    Reading the values back costs one device synchronisation per period; the layers never sync.

    Args:
        model: the (unwrapped) model.
        period: iterations between two reports; must be ≥ 1.
        fail_on_nonfinite: raise when a layer had to skip a non-finite statistic. Leave it off under
            AMP, whose GradScaler produces infinite gradients by design.
    """

    def __init__(self, model: nn.Module, period: int, *, fail_on_nonfinite: bool = True):
        if period < 1:
            raise ValueError(f"MABNDiagnostics period must be ≥ 1, got {period}")
        self._layers: List[Tuple[str, MABN2d]] = [
            (name, m) for name, m in model.named_modules() if isinstance(m, MABN2d)
        ]
        self._period = period
        self._fail_on_nonfinite = fail_on_nonfinite
        self._skips_seen = None
        # Execution order of the layers, recorded during the first step: module registration
        # order differs (Detectron2's FPN registers its convs before the ResNet it wraps).
        self._forward_order: List[int] = []
        self._order_hooks = [
            m.register_forward_pre_hook(functools.partial(self._record_order, index))
            for index, (_, m) in enumerate(self._layers)
        ]

    def _record_order(self, index: int, module, inputs) -> None:
        if index not in self._forward_order:
            self._forward_order.append(index)

    def _first_in_execution_order(self, new_skips: torch.Tensor) -> Tuple[str, str]:
        """The layer and direction where a non-finite statistic appeared first in the step."""
        order = self._forward_order + [i for i in range(len(self._layers))
                                       if i not in self._forward_order]
        for direction, column, layers in (("forward χ", 0, order), ("backward ψ", 1, order[::-1])):
            for index in layers:
                if new_skips[index, column]:
                    return self._layers[index][0], direction
        raise AssertionError("no new skipped statistic")

    def _skip_counts(self) -> torch.Tensor:
        """Returns: (layers, 2) int64, cumulative skipped forward and backward statistics."""
        return torch.stack([torch.stack([m.skipped_forward_stats, m.skipped_backward_stats])
                            for _, m in self._layers]).cpu()

    def _chi_ratio_max(self, layer: MABN2d) -> torch.Tensor:
        slot = torch.remainder(layer.iteration, layer.buffer_size)
        current = layer.chi_buffer.index_select(0, slot.view(1))[0]
        average = layer.chi_buffer.mean(0)
        ratio = (current + layer.eps) / (average + layer.eps)
        return torch.maximum(ratio, 1.0 / ratio).max()

    def _statistics(self) -> Dict[str, float]:
        # last_renorm is 1 until a layer's first training step (a non-persistent buffer).
        trained = [m for _, m in self._layers]
        if not trained:
            return {}
        renorm = torch.cat([m.last_renorm.float() for m in trained])
        clip = torch.cat([torch.full_like(m.last_renorm, m.renorm_clip, dtype=torch.float)
                          for m in trained])
        at_bound = (renorm >= clip * (1 - 1e-6)) | (renorm <= (1 + 1e-6) / clip)
        chi_ratio = torch.stack([self._chi_ratio_max(m) for m in trained]).max()
        values = torch.stack([renorm.mean(), at_bound.float().mean(), chi_ratio.float()])
        renorm_mean, clipped, chi_ratio_max = values.tolist()
        return {"mabn/renorm_mean": renorm_mean, "mabn/renorm_clipped": clipped,
                "mabn/chi_ratio_max": chi_ratio_max}

    def before_train(self):
        if self._layers:
            self._skips_seen = self._skip_counts()

    def after_step(self):
        for handle in self._order_hooks:
            handle.remove()
        self._order_hooks = []
        if not self._layers or (self.trainer.iter + 1) % self._period:
            return
        skips = self._skip_counts()
        scalars = self._statistics()
        scalars["mabn/skipped_forward"], scalars["mabn/skipped_backward"] = skips.sum(0).tolist()
        self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)
        new = (skips - self._skips_seen) > 0
        self._skips_seen = skips
        if self._fail_on_nonfinite and new.any():
            layer, direction = self._first_in_execution_order(new)
            raise FloatingPointError(
                f"MABN {direction} became non-finite first in layer '{layer}' within iterations "
                f"{self.trainer.iter + 1 - self._period}..{self.trainer.iter}; it was kept out of the "
                "layer's buffers, but the training has diverged (check the inputs and the learning "
                "rate)"
            )


@torch.no_grad()
def update_mabn_stats(model: nn.Module, data_loader: Iterable, num_iter: int) -> None:
    """Set every MABN2d's ``running_var`` to the population second moment of its input.

    Runs ``model(batch)`` in training mode (as Detectron2's PreciseBN does, so that the heads see
    training RoIs) on `num_iter` batches of `data_loader`. After each batch every buffer of the model
    is restored, so each batch is normalised exactly as the next training step would normalise it
    and no batch affects another. Then each MABN2d's running_var becomes the mean over batches of
    the per-channel mean(x²) of its input x: (N, C, H, W). Rings, step and skip counters,
    parameters and every other buffer are left as they were. A batch that is empty for a layer (a
    mask head without foreground RoIs) or holds a non-finite value does not count for that layer;
    a layer that saw no batch keeps its running_var. Events logged by the model are discarded.

    Each process estimates its own statistics (`precise_mabn_statistics` averages them).

    Args:
        model: an unwrapped model whose training forward takes a batch of `data_loader`.
        data_loader: yields at least `num_iter` batches.
        num_iter: batches to average over; must be ≥ 1.
    """
    if num_iter < 1:
        raise ValueError(f"PreciseBN for MABN needs num_iter ≥ 1, got {num_iter}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MABN2d)]
    if not layers:
        return
    second_moments = [torch.zeros_like(m.running_var, dtype=torch.float64) for _, m in layers]
    batches_seen = [0] * len(layers)

    def record(index: int, module: MABN2d, inputs) -> None:
        x = inputs[0]
        if x.numel() == 0:
            return
        chi = x.detach().float().square().mean(dim=(0, 2, 3))
        if bool(torch.isfinite(chi).all()):
            second_moments[index] += chi
            batches_seen[index] += 1

    handles = [m.register_forward_pre_hook(functools.partial(record, index))
               for index, (_, m) in enumerate(layers)]
    buffers = list(model.buffers())
    saved_buffers = [b.clone() for b in buffers]
    was_training = model.training
    model.train()
    try:
        with EventStorage():
            batches = iter(data_loader)
            for _ in tqdm(range(num_iter), desc="PreciseBN (MABN)", leave=False,
                          disable=not comm.is_main_process()):
                model(next(batches))
                for buffer, saved in zip(buffers, saved_buffers):
                    buffer.copy_(saved)
    finally:
        for handle in handles:
            handle.remove()
        for buffer, saved in zip(buffers, saved_buffers):
            buffer.copy_(saved)
        model.train(was_training)
    unseen = []
    for (name, m), total, count in zip(layers, second_moments, batches_seen):
        if count:
            m.running_var.copy_(total / count)
        else:
            unseen.append(name)
    if unseen:
        logging.getLogger(__name__).warning(
            f"PreciseBN (MABN): {len(unseen)} layer(s) saw no non-empty finite batch in {num_iter} "
            f"iterations and keep their running_var: {', '.join(unseen)}")


@contextlib.contextmanager
def precise_mabn_statistics(model: nn.Module, data_loader: Iterable,
                            num_iter: int) -> Iterator[None]:
    """PreciseBN for evaluation only: inside, every MABN2d's ``running_var`` is the population
    statistic of `update_mabn_stats` on `num_iter` batches of `data_loader`, averaged over the
    processes; on exit every buffer (running_var included), every layer's last r and this process's
    random generators are what they were on entry, so training goes on as if it never ran.

        with precise_mabn_statistics(model, loader, 200):
            results = inference_on_dataset(model, test_loader, evaluator)

    Every process must enter it (the average is a collective).

    Args:
        model: the unwrapped model (see `update_mabn_stats`).
        data_loader: training batches; each entry starts a fresh iterator of it.
        num_iter: batches to average over; must be ≥ 1.
    """
    layers = [m for m in model.modules() if isinstance(m, MABN2d)]
    training_stats = [m.running_var.clone() for m in layers]
    try:
        with preserved_rng():
            logging.getLogger(__name__).info(
                f"Running PreciseBN for MABN over {num_iter} batches")
            update_mabn_stats(model, data_loader, num_iter)
            average_mabn_statistics(model)
            yield
    finally:
        with torch.no_grad():
            for m, stats in zip(layers, training_stats):
                m.running_var.copy_(stats)
