"""Each rule lives in one place and runs once: the model's config check once per build, the training
check once per trainer, one refusal of frozen and deformable MABN for YAML and LazyConfig models,
and a new MABN module needs one registration."""
import re

import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.modeling.backbone import resnet
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead
from torch import nn

from mabn_det.config import check_training
from mabn_det.engine import Trainer
from mabn_det.engine.lazy_training import build_lazy_model, check_lazy_training
from mabn_det.layers import CentredConv2d, MABN2d
from mabn_det.modeling import (MABNHeadMixin, check_mabn_config, mabn_site, sites,
                               stock_inference_config)
from tests.common import LAZY_RECIPES, count_calls, make_cfg, tiny_lazy_config, train_opts


def _count_preparations(monkeypatch):
    """Count the models and modules that `prepare_mabn_model` centres (it centres once each)."""
    prepared = []
    convert = CentredConv2d.convert_convs_before_mabn

    def spy(module):
        prepared.append(module)
        return convert(module)

    monkeypatch.setattr(CentredConv2d, "convert_convs_before_mabn", spy)
    return prepared


def test_the_model_check_runs_once_per_yaml_build_and_ignores_the_solver(monkeypatch):
    checks = count_calls(monkeypatch, check_mabn_config)
    trainings = count_calls(monkeypatch, check_training)
    prepared = _count_preparations(monkeypatch)
    # Settings a trainer refuses do not concern the model.
    model = Trainer.build_model(make_cfg(opts=["SOLVER.GRAD_ACCUMULATION_STEPS", "3"]))
    assert len(checks) == 1 and not trainings
    # Each module that holds MABN is prepared once, as it is built: backbone, box and mask heads.
    assert [type(m) for m in prepared] == [type(model.backbone), type(model.roi_heads.box_head),
                                           type(model.roi_heads.mask_head)]


def test_a_lazyconfig_model_is_prepared_once_per_build(monkeypatch):
    checks = count_calls(monkeypatch, check_mabn_config)
    prepared = _count_preparations(monkeypatch)
    # instantiate() builds it through build_mabn_model; build_lazy_model's own call finds it ready.
    model = build_lazy_model(tiny_lazy_config(LAZY_RECIPES[0]))
    assert prepared == [model] and not checks


@pytest.fixture
def tiny_train(tiny_coco):
    if "tiny_checks" not in DatasetCatalog.list():
        register_coco_instances("tiny_checks", {}, *tiny_coco)
    return "tiny_checks"


def test_the_trainer_checks_training_and_the_model_once(monkeypatch, tiny_train, tmp_path):
    checks = count_calls(monkeypatch, check_mabn_config)
    trainings = count_calls(monkeypatch, check_training)
    Trainer(make_cfg(opts=train_opts(str(tmp_path), tiny_train)))
    assert len(checks) == len(trainings) == 1


@pytest.mark.parametrize("opts, message", [
    (["SOLVER.GRAD_ACCUMULATION_STEPS", "3"], "GRAD_ACCUMULATION_STEPS must be ≥ 1 and divide"),
    (["SOLVER.GRAD_ACCUMULATION_STEPS", "2", "SOLVER.AMP.ENABLED", "True"],
     "cfg.SOLVER.GRAD_ACCUMULATION_STEPS > 1 does not support SOLVER.AMP.ENABLED"),
    (["MODEL.MABN.LOG_PERIOD", "-1"], "cfg.MODEL.MABN.LOG_PERIOD must be ≥ 0, got -1"),
])
def test_the_trainer_refuses_training_settings_before_building(monkeypatch, tmp_path, opts,
                                                               message):
    builds = count_calls(monkeypatch, check_mabn_config)
    with pytest.raises(ValueError, match=message):
        Trainer(make_cfg(opts=train_opts(str(tmp_path), **dict(zip(opts[::2], opts[1::2])))))
    assert not builds


def test_the_lazyconfig_training_check_names_the_train_keys():
    cfg = tiny_lazy_config(LAZY_RECIPES[0])
    check_lazy_training(cfg)  # the recipe's defaults
    cfg.train.mabn_log_period = -1
    with pytest.raises(ValueError, match="train.mabn_log_period must be ≥ 0, got -1"):
        check_lazy_training(cfg)
    cfg.train.update(mabn_log_period=0, grad_accumulation_steps=2, amp=dict(enabled=True))
    with pytest.raises(ValueError, match="train.grad_accumulation_steps > 1 does not support "
                                         "train.amp.enabled"):
        check_lazy_training(cfg)


class _BuildableDeformConv(nn.Module):
    """Detectron2's DeformConv as far as building a model goes; the real one needs the compiled
    detectron2._C, which this CPU build may lack, to be constructed at all."""

    def __init__(self, in_channels, out_channels, kernel_size, *, groups=1, norm=None, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = None
        self.norm = norm


def _refusal(build) -> str:
    with pytest.raises(ValueError) as refused:
        build()
    return str(refused.value)


def test_yaml_and_lazyconfig_models_are_refused_with_one_message(monkeypatch):
    """The YAML builders prepare the backbone, LazyConfig the whole model: the module names differ
    by the model's "backbone." and nothing else does."""
    def same(yaml_message, lazy_message):
        assert lazy_message == yaml_message.replace("'bottom_up.", "'backbone.bottom_up.")

    lazy = tiny_lazy_config(LAZY_RECIPES[0])
    lazy.model.backbone.bottom_up.freeze_at = 2
    frozen = _refusal(lambda: build_model(make_cfg(opts=["MODEL.BACKBONE.FREEZE_AT", "2"])))
    assert "'bottom_up.stem.conv1.norm' is frozen" in frozen
    same(frozen, _refusal(lambda: instantiate(lazy.model)))

    monkeypatch.setattr(resnet, "DeformConv", _BuildableDeformConv)
    lazy = tiny_lazy_config(LAZY_RECIPES[0])
    lazy.model.backbone.bottom_up.stages.update(depth=50, block_class=resnet.DeformBottleneckBlock)
    deformable = _refusal(lambda: build_model(make_cfg(opts=[
        "MODEL.RESNETS.DEPTH", "50",
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[True, True, True, True]"])))
    assert re.search(r"'bottom_up.res2.0.conv2' \(_BuildableDeformConv\) feeds MABN but cannot "
                     r"be weight-centred", deformable)
    same(deformable, _refusal(lambda: instantiate(lazy.model)))


def test_a_new_mabn_head_is_one_registration(monkeypatch):
    """A user's mask head, made an MABN head by one `mabn_site` registration: the check, the build
    and the export know it."""
    monkeypatch.setattr(ROI_MASK_HEAD_REGISTRY, "_obj_map", dict(ROI_MASK_HEAD_REGISTRY._obj_map))
    monkeypatch.setattr(sites, "_SITES", dict(sites._SITES))

    @ROI_MASK_HEAD_REGISTRY.register()
    class MyMaskHead(MaskRCNNConvUpsampleHead):
        pass

    cfg = make_cfg(opts=["MODEL.ROI_MASK_HEAD.NAME", "MyMaskHead"])
    with pytest.raises(ValueError, match="needs cfg.MODEL.ROI_MASK_HEAD.NAME to be "
                                         "'MABNMaskRCNNConvUpsampleHead', got 'MyMaskHead'"):
        check_mabn_config(cfg)

    @mabn_site(ROI_MASK_HEAD_REGISTRY, "MODEL.ROI_MASK_HEAD.NAME", MyMaskHead,
               ["MODEL.ROI_MASK_HEAD.NORM"])
    class MABNMyMaskHead(MABNHeadMixin, MyMaskHead):
        pass

    with pytest.raises(ValueError, match=r"to be one of \('MABNMaskRCNNConvUpsampleHead', "
                                         r"'MABNMyMaskHead'\), got 'MyMaskHead'"):
        check_mabn_config(cfg)
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MABNMyMaskHead"
    head = Trainer.build_model(cfg).roi_heads.mask_head
    assert type(head) is MABNMyMaskHead
    assert type(head.mask_fcn1) is CentredConv2d and isinstance(head.mask_fcn1.norm, MABN2d)
    stock = stock_inference_config(cfg).MODEL.ROI_MASK_HEAD
    assert (stock.NAME, stock.NORM) == ("MyMaskHead", "FrozenBN")
