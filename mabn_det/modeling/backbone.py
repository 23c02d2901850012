"""ResNet and ResNet-FPN backbones whose NORM may be "MABN" (registered in BACKBONE_REGISTRY)."""
from typing import Callable

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import (
    build_resnet_fpn_backbone,
    build_retinanet_resnet_fpn_backbone,
)
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..config import with_mabn_norms
from .prepare import prepare_mabn_model
from .sites import mabn_site

__all__ = ["build_mabn_resnet_backbone", "build_mabn_resnet_fpn_backbone",
           "build_mabn_retinanet_resnet_fpn_backbone"]

_NAME_KEY = "MODEL.BACKBONE.NAME"
_RESNET_NORM = ("MODEL.RESNETS.NORM",)
_RESNET_FPN_NORMS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM")


def _build(stock: Callable[..., Backbone], cfg, input_shape: ShapeSpec) -> Backbone:
    return prepare_mabn_model(stock(with_mabn_norms(cfg), input_shape),
                              centred_conv=cfg.MODEL.MABN.CENTRED_CONV)


@mabn_site(BACKBONE_REGISTRY, _NAME_KEY, build_resnet_backbone, _RESNET_NORM)
def build_mabn_resnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet (depth 18-152) with `MODEL.RESNETS.NORM` allowed to be "MABN"."""
    return _build(build_resnet_backbone, cfg, input_shape)


@mabn_site(BACKBONE_REGISTRY, _NAME_KEY, build_resnet_fpn_backbone, _RESNET_FPN_NORMS)
def build_mabn_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet-FPN with `MODEL.RESNETS.NORM` and `MODEL.FPN.NORM` allowed to be "MABN".

    The FPN's lateral and output convs are centred in place, so its plain lists of convs run the
    centred ones.
    """
    return _build(build_resnet_fpn_backbone, cfg, input_shape)


@mabn_site(BACKBONE_REGISTRY, _NAME_KEY, build_retinanet_resnet_fpn_backbone, _RESNET_FPN_NORMS)
def build_mabn_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's RetinaNet ResNet-FPN (P3-P7) with `MODEL.RESNETS.NORM` and `MODEL.FPN.NORM`
    allowed to be "MABN". P6 and P7 come from unnormalised convs, as in Detectron2.
    """
    return _build(build_retinanet_resnet_fpn_backbone, cfg, input_shape)
