"""NORM: "MABN" beyond Mask R-CNN FPN: RetinaNet, Mask R-CNN C4, Cascade R-CNN and Panoptic FPN.

Each shipped full-size recipe is shrunk (R18, narrow heads, few RoIs), trained two steps on a batch
with an empty image, and checked: every norm is an MABN2d fed by a centred conv, and no other norm
is left.
"""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from mabn_det.deploy import export_for_stock_detectron2
from mabn_det.engine.hooks import MABNDiagnostics
from mabn_det.layers import CentredConv2d, MABN2d, PerLevelMABN2d, convert_to_inference_form
from mabn_det.modeling import stock_inference_config
from mabn_det.solver import mabn_aware_param_groups
from tests.common import REPO, make_cfg, train_checking_finite

STEPS = 2
SMALL = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "32", "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4",
    "MODEL.RETINANET.NUM_CLASSES", "3", "TEST.DETECTIONS_PER_IMAGE", "10",
    "MODEL.MABN.BUFFER_SIZE", "2", "MODEL.MABN.WARMUP_ITERS", "0",
    "MODEL.MABN.RENORM_WARMUP_ITERS", "1",  # the second step renormalises (r ≠ 1)
]
FPN_ANCHORS = ["MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]"]
OTHER_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm, FrozenBatchNorm2d,
               CycleBatchNormList)


def _small_cfg(config, *opts):
    return make_cfg(os.path.join(REPO, "configs", config), [*SMALL, *opts])


def _mabn_layers(module):
    return [m for m in module.modules() if isinstance(m, MABN2d)]


def _assert_only_centred_mabn(model):
    """Every norm is an MABN2d, and the conv feeding each is a CentredConv2d: its own (Detectron2
    Conv2d.norm) or the element before it in an nn.Sequential (RetinaNet's subnets)."""
    fed = set()
    for m in model.modules():
        if isinstance(m, CentredConv2d) and m.norm is not None:
            fed |= {id(n) for n in _mabn_layers(m.norm)}
        if isinstance(m, nn.Sequential):
            for conv, norm in zip(list(m), list(m)[1:]):
                if isinstance(conv, CentredConv2d):
                    fed |= {id(n) for n in _mabn_layers(norm)}
    layers = _mabn_layers(model)
    assert layers and fed == {id(m) for m in layers}
    assert not [m for m in model.modules() if isinstance(m, OTHER_NORMS)]


def _train(model, batch, steps=STEPS):
    torch.manual_seed(0)
    train_checking_finite(model, batch, steps)


def _assert_steps(module, steps=STEPS):
    assert {int(m.iteration) for m in _mabn_layers(module)} == {steps}


def test_retinanet_head_has_per_level_mabn(batch_with_empty_image):
    cfg = _small_cfg("retinanet_R_50_FPN_2x_mabn_scratch.yaml", *FPN_ANCHORS)
    model = build_model(cfg)
    _assert_only_centred_mabn(model)
    head_norms = [m for m in model.head.modules() if isinstance(m, PerLevelMABN2d)]
    assert len(head_norms) == 2 * cfg.MODEL.RETINANET.NUM_CONVS
    assert {len(n.levels) for n in head_norms} == {len(cfg.MODEL.RETINANET.IN_FEATURES)}
    assert type(model.head.cls_score) is nn.Conv2d  # the predictors have no norm: not centred

    _train(model, batch_with_empty_image)
    _assert_steps(model)  # one step per level and per training step, not one per call
    for norm in head_norms:
        rings = torch.stack([level.chi_buffer for level in norm.levels])
        assert not torch.allclose(rings[0], rings[-1])  # P3 and P7 keep their own statistics

    # The diagnostics see each level; the shared γ and β are one parameter each, decayed as norms.
    diagnostics = MABNDiagnostics(model, period=1)
    assert sum(".levels." in name for name, _ in diagnostics._layers) == 5 * len(head_norms)
    cfg.defrost()
    cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM = 1e-4, 0.0
    decay = {id(p): g.get("weight_decay", 1e-4) for g in mabn_aware_param_groups(cfg, model)
             for p in g["params"]}
    assert all(decay[id(n.weight)] == 0.0 for n in head_norms)
    assert len(decay) == len(list(model.parameters()))


def test_retinanet_exports_to_stock_detectron2(tmp_path, batch_with_empty_image):
    cfg = _small_cfg("retinanet_R_50_FPN_2x_mabn_scratch.yaml", *FPN_ANCHORS,
                     "MODEL.MABN.EPS", "1e-3", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0")
    model = build_model(cfg)
    _train(model, batch_with_empty_image, steps=1)  # moves the statistics away from their init
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("mabn")
    config = export_for_stock_detectron2(cfg, str(tmp_path / "mabn.pth"), str(tmp_path / "deploy"))

    stock_cfg = get_cfg()  # Detectron2's own keys only: the export needs nothing from mabn_det
    stock_cfg.merge_from_file(config)
    assert stock_cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert stock_cfg.MODEL.RETINANET.NORM == "BN"
    stock = build_model(stock_cfg).eval()
    DetectionCheckpointer(stock).load(stock_cfg.MODEL.WEIGHTS)
    image = {k: batch_with_empty_image[0][k] for k in ("image", "height", "width")}
    with torch.no_grad():
        expected = model.eval()([image])[0]["instances"]
        got = stock([image])[0]["instances"]
    assert len(expected) > 0
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor,
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("config, opts", [
    ("mask_rcnn_R_50_C4_2x_mabn_scratch.yaml", ["MODEL.ANCHOR_GENERATOR.SIZES", "[[8, 16, 32]]"]),
    ("cascade_mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml", FPN_ANCHORS),
    ("panoptic_fpn_R_50_2x_mabn_scratch.yaml", FPN_ANCHORS),
])
def test_inference_form_loads_into_the_stock_model(config, opts):
    cfg = _small_cfg(config, *opts)
    converted = convert_to_inference_form(build_model(cfg))
    stock_cfg = stock_inference_config(cfg)
    assert not any(name.startswith(("MABN", "build_mabn")) for name in (
        stock_cfg.MODEL.META_ARCHITECTURE, stock_cfg.MODEL.BACKBONE.NAME,
        stock_cfg.MODEL.ROI_HEADS.NAME, stock_cfg.MODEL.ROI_BOX_HEAD.NAME,
        stock_cfg.MODEL.ROI_MASK_HEAD.NAME, stock_cfg.MODEL.SEM_SEG_HEAD.NAME))
    build_model(stock_cfg).load_state_dict(converted.state_dict())  # strict: same keys and shapes


def test_c4_res5_in_the_roi_heads_is_mabn(batch_with_empty_image):
    model = build_model(_small_cfg("mask_rcnn_R_50_C4_2x_mabn_scratch.yaml",
                                   "MODEL.ANCHOR_GENERATOR.SIZES", "[[8, 16, 32]]"))
    _assert_only_centred_mabn(model)
    assert _mabn_layers(model.roi_heads.res5) and _mabn_layers(model.backbone)
    _train(model, batch_with_empty_image)
    _assert_steps(model)


def test_cascade_has_mabn_box_heads_in_all_three_stages(batch_with_empty_image):
    model = build_model(_small_cfg("cascade_mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml", *FPN_ANCHORS))
    _assert_only_centred_mabn(model)
    box_heads = model.roi_heads.box_head
    assert len(box_heads) == 3 and all(_mabn_layers(head) for head in box_heads)
    _train(model, batch_with_empty_image)
    for head in box_heads:
        _assert_steps(head)


def test_panoptic_fpn_semantic_head_is_mabn(batch_with_empty_image):
    model = build_model(_small_cfg("panoptic_fpn_R_50_2x_mabn_scratch.yaml", *FPN_ANCHORS))
    _assert_only_centred_mabn(model)
    assert _mabn_layers(model.sem_seg_head)
    batch = []
    for item in batch_with_empty_image:
        masks = item["instances"].gt_masks.tensor
        sem_seg = torch.zeros(masks.shape[1:], dtype=torch.long)  # stuff class 0 ...
        for k, mask in enumerate(masks):
            sem_seg[mask] = 1 + k % 3  # ... and "things" (Detectron2's separated panoptic format)
        batch.append({**item, "sem_seg": sem_seg})
    _train(model, batch)
    _assert_steps(model.sem_seg_head)


@pytest.mark.parametrize("config, opts, message", [
    ("retinanet_R_50_FPN_2x_mabn_scratch.yaml", ["MODEL.META_ARCHITECTURE", "RetinaNet"],
     "MODEL.RETINANET.NORM = \"MABN\" needs cfg.MODEL.META_ARCHITECTURE to be 'MABNRetinaNet'"),
    ("retinanet_R_50_FPN_2x_mabn_scratch.yaml",
     ["MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone"],
     "build_mabn_retinanet_resnet_fpn_backbone"),
    ("mask_rcnn_R_50_C4_2x_mabn_scratch.yaml", ["MODEL.ROI_HEADS.NAME", "Res5ROIHeads"],
     "MODEL.RESNETS.NORM = \"MABN\" needs cfg.MODEL.ROI_HEADS.NAME to be 'MABNRes5ROIHeads'"),
    ("panoptic_fpn_R_50_2x_mabn_scratch.yaml", ["MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead"],
     "MODEL.SEM_SEG_HEAD.NORM = \"MABN\" needs cfg.MODEL.SEM_SEG_HEAD.NAME"),
    ("cascade_mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml",
     ["MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"], "MABNFastRCNNConvFCHead"),
])
def test_impossible_combinations_are_refused_naming_the_key(config, opts, message):
    from mabn_det.engine import Trainer

    with pytest.raises(ValueError, match=message):
        Trainer.build_model(_small_cfg(config, *opts))


def test_mabn_in_a_norm_the_meta_architecture_does_not_read_is_ignored():
    """As Detectron2 ignores them: a Mask R-CNN may set every NORM, RetinaNet's too, to "MABN"."""
    model = build_model(make_cfg(opts=["MODEL.RETINANET.NORM", "MABN",
                                       "MODEL.SEM_SEG_HEAD.NORM", "MABN"]))
    _assert_only_centred_mabn(model)
