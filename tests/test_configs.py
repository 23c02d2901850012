"""Every shipped config merges after add_mabn_config and builds (at tiny sizes, on CPU); MABN's
settings have one home that the layer, the YAML keys and the LazyConfig factory share."""
import ast
import dataclasses
import glob
import os
import re

import pytest
import torch
from detectron2.modeling import build_model

from mabn_det.config import check_training, load_config, mabn_settings
from mabn_det.layers import MABN2d, MABNSettings
from mabn_det.lazy import mabn_norm
from mabn_det.modeling import stock_inference_config
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
    assert stock.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"


def test_layer_yaml_keys_and_lazy_factory_share_the_settings_defaults():
    defaults = dataclasses.asdict(MABNSettings())
    assert defaults["buffer_size"] == 16 and defaults["momentum"] == 0.02  # the paper's
    for layer in (MABN2d(4), mabn_norm()(4)):
        assert {name: getattr(layer, name) for name in defaults} == defaults
    cfg = load_config()
    assert {name: cfg.MODEL.MABN[name.upper()] for name in defaults} == defaults
    assert mabn_settings(cfg) == MABNSettings()


@pytest.mark.parametrize("build, error, message", [
    (lambda: MABN2d(4, buffer_size="16"), TypeError, "buffer_size must be an int, got '16'"),
    (lambda: MABN2d(4, bufer_size=2), TypeError, "bufer_size is not an MABN setting; they are "
                                                 "buffer_size, warmup_iters"),
    (lambda: mabn_norm(momentum=0), ValueError, r"mabn_norm\(momentum=...\) must be in \(0, 1\]"),
    (lambda: mabn_norm(buffer_size=2.5), TypeError,
     r"mabn_norm\(buffer_size=...\) must be an int, got 2.5"),
    (lambda: mabn_settings(load_config(opts=["MODEL.MABN.WARMUP_ITERS", "-1"])), ValueError,
     "cfg.MODEL.MABN.WARMUP_ITERS must be ≥ 0, got -1"),
])
def test_settings_errors_name_the_setting_as_the_user_wrote_it(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_settings_are_frozen_and_numbers_become_floats():
    settings = MABNSettings(renorm_clip=2, eps=1)
    assert settings == MABNSettings(renorm_clip=2.0, eps=1.0)
    assert isinstance(settings.renorm_clip, float) and isinstance(MABN2d(2, eps=1).eps, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.buffer_size = 8


def test_training_check_names_the_keys_it_is_given():
    lazy = dict(steps=("train.grad_accumulation_steps", 2),
                images_per_step=("dataloader.train.total_batch_size", 4),
                amp=("train.amp.enabled", True), log_period=("train.mabn_log_period", 20))
    with pytest.raises(ValueError, match=r"^train.grad_accumulation_steps > 1 does not support "
                                         r"train.amp.enabled; set one of them back"):
        check_training(**lazy)
    with pytest.raises(ValueError, match=r"^train.grad_accumulation_steps must be ≥ 1 and divide "
                                         r"dataloader.train.total_batch_size \(4\), got 3"):
        check_training(**{**lazy, "steps": ("train.grad_accumulation_steps", 3)})
    lazy["amp"] = ("train.amp.enabled", False)
    with pytest.raises(ValueError, match=r"^train.mabn_log_period must be ≥ 0, got -1"):
        check_training(**{**lazy, "log_period": ("train.mabn_log_period", -1)})
    check_training(**lazy)


def test_configuration_key_table_shows_the_defaults_of_the_one_home():
    with open(os.path.join(REPO, "docs", "configuration.md")) as f:
        rows = re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", f.read(), flags=re.MULTILINE)
    shown = {key: ast.literal_eval(default.strip()) for key, default in rows}
    assert shown == dict(load_config().MODEL.MABN)
