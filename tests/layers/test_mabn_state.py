"""MABN2d's state across versions of mabn_det: old checkpoints load and train on unchanged.

`data/mabn2d_v1.pt` was saved by the code of commit 278bd99 (the layer before it had a
`_version`, i.e. nn.Module's default 1): a 4-channel layer trained 5 steps past both warm-ups
(buffer_size 3, renormalisation on), its state_dict, then one more step's input x and gradient dy
and what that step gave: y, dx, dγ, dβ and the state after it.
"""
import os

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
