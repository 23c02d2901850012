"""Every shipped config merges after add_mabn_config and builds (at tiny sizes, on CPU)."""
import glob
import os

import pytest
import torch
from detectron2.modeling import build_model

from mabn_det.config import stock_inference_config
from mabn_det.layers import MABN2d
from tests.common import REPO, make_cfg

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def test_configs_are_self_contained():
    assert CONFIGS
    for path in CONFIGS:
        with open(path) as f:
            for line in f:
                if line.startswith("_BASE_"):
                    base = os.path.normpath(os.path.join(os.path.dirname(path),
                                                         line.split(":", 1)[1].strip().strip('"')))
                    assert base.startswith(REPO) and os.path.exists(base), (path, base)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO) for p in CONFIGS])
def test_config_builds(path):
    # R18, 20 proposals and 5 detections keep the eval forward of the full-size recipes short (the
    # box and mask heads keep their full width).
    cfg = make_cfg(path, opts=["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                               "MODEL.RESNETS.STRIDE_IN_1X1", "False",
                               "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
                               "TEST.DETECTIONS_PER_IMAGE", "5"])
    model = build_model(cfg)
    uses_mabn = "MABN" in (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM)
    assert any(isinstance(m, MABN2d) for m in model.modules()) == uses_mabn
    model.eval()
    with torch.no_grad():
        model([{"image": torch.zeros(3, 64, 64), "height": 64, "width": 64}])


def test_stock_inference_config_has_no_mabn_keys():
    stock = stock_inference_config(make_cfg())
    assert "MABN" not in stock.MODEL and "GRAD_ACCUMULATION_STEPS" not in stock.SOLVER
    assert stock.MODEL.RESNETS.NORM == "FrozenBN"
    assert stock.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert stock.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
