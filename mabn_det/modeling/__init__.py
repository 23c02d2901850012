"""Importing this package registers the MABN backbones and ROI heads in Detectron2's registries."""
from .backbone import build_mabn_resnet_backbone, build_mabn_resnet_fpn_backbone
from .roi_heads import MABNFastRCNNConvFCHead, MABNMaskRCNNConvUpsampleHead

__all__ = [
    "build_mabn_resnet_backbone",
    "build_mabn_resnet_fpn_backbone",
    "MABNFastRCNNConvFCHead",
    "MABNMaskRCNNConvUpsampleHead",
]
