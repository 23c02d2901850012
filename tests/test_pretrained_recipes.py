"""The recipes for a pretrained backbone: MABN heads on Detectron2's FrozenBN R-50 (YAML and its
LazyConfig twin build the same model), and MABN everywhere from a converted checkpoint."""
import os

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from mabn_det.layers import CentredConv2d, MABN2d
from tests.common import REPO, make_cfg

HEADS_YAML = os.path.join(REPO, "configs", "mask_rcnn_R_50_FPN_3x_mabn_heads.yaml")
HEADS_LAZY = os.path.join(REPO, "configs", "lazy", "mask_rcnn_R_50_FPN_3x_mabn_heads.py")
FINETUNE_YAML = os.path.join(REPO, "configs", "mask_rcnn_R_50_FPN_3x_mabn_finetune.yaml")
R50_PKL = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"


def _mabn_sites(model):
    return sorted(name for name, m in model.named_modules()
                  if isinstance(m, CentredConv2d) and isinstance(m.norm, MABN2d))


def test_heads_recipes_keep_detectrons_backbone_and_build_the_same_model():
    cfg = make_cfg(HEADS_YAML)
    assert cfg.MODEL.WEIGHTS == R50_PKL and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 and cfg.SOLVER.MAX_ITER == 270000
    torch.manual_seed(0)
    yaml_model = build_model(cfg)
    lazy = LazyConfig.load(HEADS_LAZY)
    assert lazy.train.init_checkpoint == R50_PKL and lazy.train.max_iter == 270000
    lazy_model = instantiate(lazy.model)

    for model in (yaml_model, lazy_model):
        bottom_up = model.backbone.bottom_up
        assert not any(isinstance(m, MABN2d) for m in bottom_up.modules())
        assert all(isinstance(m.norm, FrozenBatchNorm2d) for m in bottom_up.modules()
                   if hasattr(m, "norm") and m.norm is not None)
        frozen = {name.split(".")[0] for name, p in bottom_up.named_parameters()
                  if not p.requires_grad}
        assert frozen == {"stem", "res2"}
    sites = _mabn_sites(yaml_model)
    assert sites == _mabn_sites(lazy_model)
    assert {s.rsplit(".", 1)[0] for s in sites} == {
        "backbone", "roi_heads.box_head", "roi_heads.mask_head"}
    assert len(sites) == 8 + 4 + 4  # FPN lateral and output convs, 4conv1fc, 4 mask convs
    yaml_state, lazy_state = yaml_model.state_dict(), lazy_model.state_dict()
    assert {k: v.shape for k, v in yaml_state.items()} == {k: v.shape
                                                           for k, v in lazy_state.items()}


def test_finetune_recipe_is_mabn_everywhere_with_msras_stride():
    cfg = make_cfg(FINETUNE_YAML)
    assert cfg.MODEL.RESNETS.NORM == cfg.MODEL.FPN.NORM == "MABN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.WEIGHTS.endswith(".pth") and not os.path.isabs(cfg.MODEL.WEIGHTS)
