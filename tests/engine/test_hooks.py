from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_backbone
from detectron2.utils.events import EventStorage

from mabn_det.engine import MABNDiagnostics
from tests.common import make_cfg


def _backbone():
    cfg = make_cfg(opts=["MODEL.MABN.BUFFER_SIZE", "2", "MODEL.MABN.WARMUP_ITERS", "0",
                         "MODEL.MABN.RENORM_WARMUP_ITERS", "2", "MODEL.MABN.RENORM_CLIP", "1.5"])
    return build_backbone(cfg)


def _step(backbone, images):
    sum(f.square().mean() for f in backbone(images).values()).backward()


def test_diagnostics_reach_the_event_storage():
    torch.manual_seed(0)
    backbone = _backbone()
    hook = MABNDiagnostics(backbone, period=2)
    with EventStorage() as storage:
        hook.trainer = SimpleNamespace(iter=0, storage=storage)
        hook.before_train()
        for it in range(4):
            hook.trainer.iter = it
            _step(backbone, torch.randn(2, 3, 64, 64) * (1 + it))
            hook.after_step()
        latest = {k: v for k, (v, _) in storage.latest().items()}
    assert 1 / 1.5 - 1e-6 <= latest["mabn/renorm_mean"] <= 1.5 + 1e-6
    assert latest["mabn/renorm_mean"] != 1.0, "renormalisation should be active after step 2"
    assert 0.0 <= latest["mabn/renorm_clipped"] <= 1.0
    assert latest["mabn/chi_ratio_max"] >= 1.0
    assert latest["mabn/skipped_forward"] == 0 and latest["mabn/skipped_backward"] == 0


def test_nonfinite_statistics_name_the_first_layer():
    backbone = _backbone()
    hook = MABNDiagnostics(backbone, period=1)
    with EventStorage() as storage:
        hook.trainer = SimpleNamespace(iter=0, storage=storage)
        hook.before_train()
        _step(backbone, torch.randn(2, 3, 64, 64))
        hook.after_step()
        images = torch.randn(2, 3, 64, 64)
        images[1, 0, 5, 5] = float("nan")
        hook.trainer.iter = 1
        backbone(images)
        with pytest.raises(FloatingPointError, match="forward χ became non-finite first in layer "
                                                     "'bottom_up.stem.conv1.norm'"):
            hook.after_step()


def test_period_must_be_positive():
    with pytest.raises(ValueError, match="period must be ≥ 1, got 0"):
        MABNDiagnostics(torch.nn.Identity(), period=0)
