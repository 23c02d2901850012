"""MABN2d's state across versions of mabn_det: old checkpoints load and train on unchanged.

`data/mabn2d_v1.pt` was saved by the code of commit 278bd99 (the layer before it had a
`_version`, i.e. nn.Module's default 1): a 4-channel layer trained 5 steps past both warm-ups
(buffer_size 3, renormalisation on), its state_dict, then one more step's input x and gradient dy
and what that step gave: y, dx, dγ, dβ and the state after it.
"""
import os

import pytest
import torch

from mabn_det.layers import MABN2d

V1_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mabn2d_v1.pt")


def test_checkpoint_of_version_1_loads_and_gives_the_same_step():
    saved = torch.load(V1_CHECKPOINT, weights_only=True)
    assert saved["state_dict"]._metadata[""]["version"] == 1
    layer = MABN2d(saved["num_features"], **saved["settings"])
    layer.load_state_dict(saved["state_dict"])
    x = saved["x"].clone().requires_grad_()
    y = layer(x)
    y.backward(saved["dy"])
    for name, got in [("y", y), ("dx", x.grad), ("dgamma", layer.weight.grad),
                      ("dbeta", layer.bias.grad)]:
        torch.testing.assert_close(got, saved[name], rtol=1e-5, atol=1e-6, msg=name)
    after = layer.state_dict()
    assert list(after) == list(saved["state_after"])
    for key, want in saved["state_after"].items():
        torch.testing.assert_close(after[key], want, rtol=1e-5, atol=1e-6, msg=key)


def test_saved_state_keeps_its_keys_and_declares_version_2():
    state = MABN2d(4, buffer_size=3).state_dict()
    assert list(state) == ["weight", "bias", "iteration", "chi_buffer", "psi_buffer",
                           "running_var", "skipped_forward_stats", "skipped_backward_stats"]
    assert state._metadata[""]["version"] == MABN2d._version == 2


def test_state_of_a_newer_version_is_refused_by_name():
    state = MABN2d(4).state_dict()
    state._metadata[""]["version"] = 3
    with pytest.raises(RuntimeError, match="version 3, written by a newer mabn_det"):
        MABN2d(4).load_state_dict(state)


def test_diagnostics_and_constants_move_with_the_module_and_are_not_saved():
    layer = MABN2d(4, buffer_size=3, warmup_iters=0, renorm_warmup_iters=0, renorm_clip=1.1)
    layer(torch.randn(2, 4, 3, 3) * 3).sum().backward()
    renorm = layer.last_renorm.clone()
    assert renorm.shape == (4,) and not torch.equal(renorm, torch.ones(4))
    assert "last_renorm" not in layer.state_dict()
    layer.double()
    assert layer.last_renorm.dtype == torch.float64
    torch.testing.assert_close(layer.last_renorm, renorm.double())
    # Rebuilt in the new dtype, not converted: 1/3 and 1/1.1 exactly as float64 has them.
    assert layer._ring_weights[0].item() == 1 / 3
    assert layer._renorm_bounds[1, 1, 0].item() == 1 / 1.1
    assert layer._triton_tickets.dtype == torch.int32 and not layer._triton_tickets.any()


def test_settings_are_fixed_at_construction():
    layer = MABN2d(4, buffer_size=3)
    with pytest.raises(AttributeError):
        layer.buffer_size = 5
    layer.kernel = "torch"  # the one setting that may change
    assert (layer.buffer_size, layer.kernel) == (3, "torch")
