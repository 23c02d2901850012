"""Importing this package registers the MABN backbones, ROI heads, RetinaNet and semantic head in
Detectron2's registries."""
from .backbone import (
    build_mabn_resnet_backbone,
    build_mabn_resnet_fpn_backbone,
    build_mabn_retinanet_resnet_fpn_backbone,
)
from .retinanet import MABNRetinaNet
from .roi_heads import MABNFastRCNNConvFCHead, MABNMaskRCNNConvUpsampleHead, MABNRes5ROIHeads
from .semantic_seg import MABNSemSegFPNHead

__all__ = [
    "build_mabn_resnet_backbone",
    "build_mabn_resnet_fpn_backbone",
    "build_mabn_retinanet_resnet_fpn_backbone",
    "MABNFastRCNNConvFCHead",
    "MABNMaskRCNNConvUpsampleHead",
    "MABNRes5ROIHeads",
    "MABNRetinaNet",
    "MABNSemSegFPNHead",
]
