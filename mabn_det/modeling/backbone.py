"""ResNet and ResNet-FPN backbones whose NORM may be "MABN" (registered in BACKBONE_REGISTRY)."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import (
    build_resnet_fpn_backbone,
    build_retinanet_resnet_fpn_backbone,
)
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..config import check_mabn_config, with_mabn_norms
from ..layers import CentredConv2d

__all__ = ["build_mabn_resnet_backbone", "build_mabn_resnet_fpn_backbone",
           "build_mabn_retinanet_resnet_fpn_backbone"]


def _centred_if_asked(backbone: Backbone, cfg) -> Backbone:
    if cfg.MODEL.MABN.CENTRED_CONV:
        CentredConv2d.convert_convs_before_mabn(backbone)
    return backbone


@BACKBONE_REGISTRY.register()
def build_mabn_resnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet (depth 18-152) with `MODEL.RESNETS.NORM` allowed to be "MABN"."""
    check_mabn_config(cfg)
    return _centred_if_asked(build_resnet_backbone(with_mabn_norms(cfg), input_shape), cfg)


@BACKBONE_REGISTRY.register()
def build_mabn_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet-FPN with `MODEL.RESNETS.NORM` and `MODEL.FPN.NORM` allowed to be "MABN".

    The FPN's lateral and output convs are centred in place, so its plain lists of convs run the
    centred ones.
    """
    check_mabn_config(cfg)
    return _centred_if_asked(build_resnet_fpn_backbone(with_mabn_norms(cfg), input_shape), cfg)


@BACKBONE_REGISTRY.register()
def build_mabn_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's RetinaNet ResNet-FPN (P3-P7) with `MODEL.RESNETS.NORM` and `MODEL.FPN.NORM`
    allowed to be "MABN". P6 and P7 come from unnormalised convs, as in Detectron2.
    """
    check_mabn_config(cfg)
    return _centred_if_asked(build_retinanet_resnet_fpn_backbone(with_mabn_norms(cfg), input_shape),
                             cfg)
