"""Importing this package registers the MABN backbones, ROI heads, RetinaNet and semantic head in
Detectron2's registries, each with its `MABNSite` (`mabn_site`)."""
from .backbone import (
    build_mabn_resnet_backbone,
    build_mabn_resnet_fpn_backbone,
    build_mabn_retinanet_resnet_fpn_backbone,
)
from .prepare import prepare_mabn_model
from .retinanet import MABNRetinaNet
from .roi_heads import (MABNFastRCNNConvFCHead, MABNHeadMixin, MABNMaskRCNNConvUpsampleHead,
                        MABNRes5ROIHeads)
from .semantic_seg import MABNSemSegFPNHead
from .sites import (MABNSite, check_mabn_config, mabn_site, stock_inference_config,
                    supported_norm_keys)

__all__ = [
    "build_mabn_resnet_backbone",
    "build_mabn_resnet_fpn_backbone",
    "build_mabn_retinanet_resnet_fpn_backbone",
    "check_mabn_config",
    "mabn_site",
    "prepare_mabn_model",
    "stock_inference_config",
    "supported_norm_keys",
    "MABNFastRCNNConvFCHead",
    "MABNHeadMixin",
    "MABNMaskRCNNConvUpsampleHead",
    "MABNRes5ROIHeads",
    "MABNRetinaNet",
    "MABNSemSegFPNHead",
    "MABNSite",
]
