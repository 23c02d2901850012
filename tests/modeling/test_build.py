"""NORM: "MABN" in Detectron2 configs builds MABN everywhere it is asked for, and only there."""
import pytest
import torch
from detectron2.layers import Conv2d
from detectron2.modeling import build_model

from mabn_det.solver import mabn_aware_param_groups
from mabn_det.layers import MABN2d, CentredConv2d
from tests.common import make_cfg, train_checking_finite


def _mabn_convs(model):
    return [m for m in model.modules() if isinstance(m, Conv2d) and isinstance(m.norm, MABN2d)]


def test_every_mabn_site_is_weight_centred():
    model = build_model(make_cfg())
    convs = _mabn_convs(model)
    n_mabn = sum(isinstance(m, MABN2d) for m in model.modules())
    assert n_mabn == len(convs) > 0
    assert all(type(c) is CentredConv2d for c in convs)
    prefixes = {name.split(".")[0] + "." + name.split(".")[1] for name, m in model.named_modules()
                if isinstance(m, MABN2d)}
    assert {"backbone.bottom_up", "backbone.fpn_lateral2", "roi_heads.box_head",
            "roi_heads.mask_head"} <= prefixes


def test_adding_a_constant_per_filter_changes_no_output():
    """Behavioural: FPN and heads iterate plain lists of convs, so this fails unless those lists run
    the centred convs. Without centring the outputs change by O(1); float32 cancellation through
    the deep network leaves ~1e-3."""
    torch.manual_seed(0)
    model = build_model(make_cfg()).eval()
    features = torch.randn(1, 3, 64, 64)
    backbone_out = model.backbone(features)
    boxes = torch.randn(3, 64, 7, 7)
    masks = torch.randn(3, 64, 14, 14)
    box_out = model.roi_heads.box_head(boxes)
    mask_layers = model.roi_heads.mask_head.layers(masks)
    with torch.no_grad():
        for conv in _mabn_convs(model):
            conv.weight.add_(torch.randn(conv.out_channels, 1, 1, 1) * 5)
    for name, value in model.backbone(features).items():
        torch.testing.assert_close(value, backbone_out[name], rtol=1e-2, atol=1e-2, msg=name)
    torch.testing.assert_close(model.roi_heads.box_head(boxes), box_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(model.roi_heads.mask_head.layers(masks), mask_layers,
                               rtol=1e-2, atol=1e-2)


def test_centralisation_can_be_turned_off():
    model = build_model(make_cfg(opts=["MODEL.MABN.CENTRED_CONV", "False"]))
    assert not any(isinstance(m, CentredConv2d) for m in model.modules())
    assert len(_mabn_convs(model)) > 0


def test_norms_can_be_mixed():
    model = build_model(make_cfg(opts=["MODEL.RESNETS.NORM", "GN", "MODEL.ROI_MASK_HEAD.NORM", "BN"]))
    assert isinstance(model.backbone.bottom_up.stem.conv1.norm, torch.nn.GroupNorm)
    assert isinstance(model.backbone.fpn_lateral2.norm, MABN2d)
    assert isinstance(model.roi_heads.box_head.conv1.norm, MABN2d)
    assert isinstance(model.roi_heads.mask_head.mask_fcn1.norm, torch.nn.BatchNorm2d)
    assert type(model.roi_heads.mask_head.mask_fcn1) is Conv2d


def test_hyperparameters_reach_every_layer():
    model = build_model(make_cfg(opts=["MODEL.MABN.BUFFER_SIZE", "5", "MODEL.MABN.RENORM_CLIP", "2.5",
                                       "MODEL.MABN.KERNEL", "triton"]))
    layers = [m for m in model.modules() if isinstance(m, MABN2d)]
    assert {(m.buffer_size, m.renorm_clip, m.kernel) for m in layers} == {(5, 2.5, "triton")}


@pytest.mark.parametrize("opts, message", [
    (["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"],
     "NORM = \"MABN\" needs cfg.MODEL.BACKBONE.NAME to be one of"),
    (["MODEL.BACKBONE.NAME", "build_mabn_resnet_backbone", "MODEL.RESNETS.NORM", "BN"],
     "MODEL.FPN.NORM = \"MABN\" needs cfg.MODEL.BACKBONE.NAME"),
    (["MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"], "MABNFastRCNNConvFCHead"),
    (["MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"], "MABNMaskRCNNConvUpsampleHead"),
    (["MODEL.BACKBONE.FREEZE_AT", "2"],
     "MABN layers cannot be frozen: set the backbone's freeze_at to 0 "
     r"\(cfg.MODEL.BACKBONE.FREEZE_AT"),
    (["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NORM", "MABN"],
     "MODEL.RETINANET.NORM = \"MABN\" needs cfg.MODEL.META_ARCHITECTURE to be 'MABNRetinaNet', "
     "got 'RetinaNet'"),
    (["MODEL.MABN.BUFFER_SIZE", "0"], "cfg.MODEL.MABN.BUFFER_SIZE must be ≥ 1, got 0"),
    (["MODEL.MABN.MOMENTUM", "1.5"], r"cfg.MODEL.MABN.MOMENTUM must be in \(0, 1\], got 1.5"),
    (["MODEL.MABN.RENORM_CLIP", "0.5"], "cfg.MODEL.MABN.RENORM_CLIP must be ≥ 1"),
    (["MODEL.MABN.EPS", "0.0"], "cfg.MODEL.MABN.EPS must be > 0"),
    (["MODEL.MABN.KERNEL", "cuda"],
     "cfg.MODEL.MABN.KERNEL must be one of 'auto', 'triton', 'torch', got 'cuda'"),
])
def test_unusable_configs_are_refused_with_the_setting_to_use(opts, message):
    from mabn_det.engine import Trainer

    with pytest.raises(ValueError, match=message):
        Trainer.build_model(make_cfg(opts=opts))


def test_mabn_parameters_get_norm_weight_decay():
    cfg = make_cfg(opts=["SOLVER.WEIGHT_DECAY", "1e-4", "SOLVER.WEIGHT_DECAY_NORM", "0.0"])
    model = build_model(cfg)
    # A group without "weight_decay" takes the optimizer's default, SOLVER.WEIGHT_DECAY.
    decay = {id(p): g.get("weight_decay", 1e-4) for g in mabn_aware_param_groups(cfg, model)
             for p in g["params"]}
    for m in model.modules():
        if isinstance(m, MABN2d):
            assert decay[id(m.weight)] == 0.0 and decay[id(m.bias)] == 0.0
        elif isinstance(m, CentredConv2d):
            assert decay[id(m.weight)] == 1e-4


def test_training_step_with_an_empty_image_keeps_buffers_finite(batch_with_empty_image):
    torch.manual_seed(0)
    model = build_model(make_cfg(opts=["MODEL.MABN.WARMUP_ITERS", "0",
                                       "MODEL.MABN.BUFFER_SIZE", "2"]))
    train_checking_finite(model, batch_with_empty_image, steps=4)
    mask_norms = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, MABN2d)]
    assert all(int(m.iteration) <= 4 for m in mask_norms)
