"""Kernel launches of a piece of code: what a normalisation layer costs in fixed overhead.

On CUDA the profiler counts the device activities (kernels, memsets, memcopies) that the code
issued. On CPU, where nothing is launched, a TorchDispatchMode counts the ATen ops that would each
be one kernel on a GPU: every op except views, aliases and allocations of uninitialised memory.
"""
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
              "alias", "lift_fresh", "set_", "resize_"}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not (getattr(func, "is_view", False) or name in _NO_KERNEL):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_launches(fn: Callable[[], None], device: str) -> int:
    """Launches issued by one call of `fn` (call it once before, to compile and allocate)."""
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    mode = _CountOps()
    with mode:
        fn()
    return mode.count
