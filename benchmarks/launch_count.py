"""Kernel launches of a piece of code: what a normalisation layer costs in fixed overhead.

On CUDA the profiler counts the device activities (kernels, memsets, memcopies) that the code
issued. On CPU, where nothing is launched, the ATen ops of a CPU profile stand in for them, counted
two ways (neither counts views, allocations of uninitialised memory, or dtype conversions that copy
nothing):

- ``"leaf"``, the count of issue #30: ops with no ATen op at all beneath them. An op whose output
  is allocated by a dispatched ``empty`` (``where``, ``index_select``, batch norm itself) has an
  op beneath it, so its own kernel is not counted: nn.BatchNorm2d's forward+backward counts 1.
- ``"work"``: ops with no counted op beneath them, allocations and views set aside; every op that
  does the work itself counts once, so nn.BatchNorm2d's forward+backward counts 3.
"""
import functools
from typing import Callable, List

import torch
from torch.autograd.profiler_util import FunctionEvent

__all__ = ["count_launches", "cpu_ops", "layer_step_ops"]

# Ops that do no work on data: allocations, and conversions or in-place restrides that leave the
# data as it is. Views are recognised from their schema.
_NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
            "set_", "as_strided_", "to", "_to_copy", "contiguous", "resolve_conj", "resolve_neg"}


@functools.lru_cache(maxsize=None)
def _does_no_work(op: str) -> bool:
    if op in _NO_WORK:
        return True
    packet = getattr(torch.ops.aten, op, None)
    return packet is not None and any(getattr(packet, overload).is_view
                                      for overload in packet.overloads())


def _is_op(event: FunctionEvent) -> bool:
    return event.name.startswith("aten::")


def _does_work(event: FunctionEvent) -> bool:
    return _is_op(event) and not _does_no_work(event.name[len("aten::"):])


def _work_beneath(event: FunctionEvent) -> bool:
    return any(_does_work(child) or _work_beneath(child) for child in event.cpu_children)


def cpu_ops(fn: Callable[[], None], how: str = "leaf") -> List[str]:
    """The ATen ops of one call of `fn` on CPU tensors that `how` ("leaf" or "work") counts, in
    the order the profiler recorded them (call `fn` once before, to allocate what it caches)."""
    if how not in ("leaf", "work"):
        raise ValueError(f'how must be "leaf" or "work", got {how!r}')
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counted = []
    for event in prof.events():
        if not _does_work(event):
            continue
        beneath = (any(_is_op(child) for child in event.cpu_children) if how == "leaf"
                   else _work_beneath(event))
        if not beneath:
            counted.append(event.name[len("aten::"):])
    return counted


def layer_step_ops(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor,
                   how: str) -> List[str]:
    """The ops `cpu_ops` counts in one forward+backward of `layer` on CPU tensors (its 4th: the
    first three allocate what the layer caches).

    Args:
        layer: a normalisation layer in training mode.
        x: (N, C, H, W) input that requires grad; dy: the output's gradient, x's shape.
        how: "leaf" (issue #30's count: gradients accumulate into the existing .grad, as they did
            when the count was defined) or "work" (fresh gradients every step).
    """
    def step():
        if how == "work":
            x.grad = None
            layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    for _ in range(3):
        step()
    return cpu_ops(step, how)


def count_launches(fn: Callable[[], None], device: str) -> int:
    """Launches issued by one call of `fn` (call it once before, to compile and allocate); on CPU,
    the ATen ops that do work themselves (`cpu_ops` with how="work")."""
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return len(cpu_ops(fn, "work"))
