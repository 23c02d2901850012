"""How many ops one training step of MABN2d's PyTorch path issues, counted from a CPU profile.

On a GPU each is a kernel launch with its fixed cost, which at detection shapes weighs more than
the bytes. Two counts (benchmarks/launch_count.py): issue #30's ("leaf": ops with no ATen op beneath
them, gradients accumulating into existing .grad; 56 for MABN2d before this test existed, 4 for
nn.BatchNorm2d) and every op that does work itself ("work", fresh gradients; 67 before, 3 for
nn.BatchNorm2d).
"""
import importlib.util
import os

import pytest
import torch

from mabn_det.layers import MABN2d

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The counter is a script of benchmarks/, beside the scripts that print its counts.
_spec = importlib.util.spec_from_file_location(
    "launch_count", os.path.join(REPO, "benchmarks", "launch_count.py"))
launch_count = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_count)

LEAF_BOUND = 27
WORK_BOUND = 36
# The three phases of a step: batch statistics, moving averages, renormalisation (the counts must
# not depend on the phase: the phase is a tensor, never a Python branch).
PHASES = {"batch statistics": dict(warmup_iters=100, renorm_warmup_iters=100),
          "averaged": dict(warmup_iters=0, renorm_warmup_iters=100),
          "renormalised": dict(warmup_iters=0, renorm_warmup_iters=0)}


def step_ops(layer, how: str, channels_last: bool = False):
    """The ops `launch_count.layer_step_ops` counts in one forward+backward of `layer`."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(2, 8, 5, 6).contiguous(memory_format=fmt)
    return launch_count.layer_step_ops(layer, x, dy, how)


@pytest.mark.parametrize("phase", list(PHASES))
def test_pytorch_path_op_count_is_bounded_in_every_phase(phase):
    layer = MABN2d(8, buffer_size=2, **PHASES[phase])
    leaf = step_ops(layer, "leaf")
    work = step_ops(layer, "work")
    assert len(leaf) <= LEAF_BOUND, sorted(leaf)
    assert len(work) <= WORK_BOUND, sorted(work)
    assert len(step_ops(layer, "work", channels_last=True)) == len(work)


def test_counts_reproduce_batchnorm_and_see_every_extra_op():
    bn = torch.nn.BatchNorm2d(8)
    assert len(step_ops(bn, "leaf")) == 4
    assert sorted(step_ops(bn, "work")) == [
        "add_", "native_batch_norm", "native_batch_norm_backward"]

    class OneMore(MABN2d):
        def forward(self, x):
            return super().forward(x) * 1.0

    baseline = len(step_ops(MABN2d(8, buffer_size=2), "work"))
    extra = step_ops(OneMore(8, buffer_size=2), "work")
    # y·1.0: a multiplication forward, and MulBackward's one backward.
    assert len(extra) == baseline + 2
