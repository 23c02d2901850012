"""Box and mask heads whose NORM may be "MABN" (registered in ROI_BOX_HEAD / ROI_MASK_HEAD), and
C4 ROI heads whose res5 may use MABN (ROI_HEADS)."""
from detectron2.config import configurable
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    FastRCNNConvFCHead,
    MaskRCNNConvUpsampleHead,
    Res5ROIHeads,
)

from ..config import check_mabn_config, with_mabn_norms
from ..layers import CentredConv2d

__all__ = ["MABNFastRCNNConvFCHead", "MABNHeadMixin", "MABNMaskRCNNConvUpsampleHead",
           "MABNRes5ROIHeads"]


class MABNHeadMixin:
    """For a configurable head (box, mask, semantic) built from one `from_config`: reads the head's
    NORM through `with_mabn_norms` and makes the convs that feed MABN centred.

    ROI head batches are RoIs (ROI_HEADS.BATCH_SIZE_PER_IMAGE × images), and the mask head may see
    none at all; MABN2d leaves its statistics untouched for such an empty batch.
    """

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_mabn_config(cfg)
        ret = super().from_config(with_mabn_norms(cfg), input_shape)
        ret["centred_conv"] = cfg.MODEL.MABN.CENTRED_CONV
        return ret

    @configurable
    def __init__(self, *args, centred_conv: bool = True, **kwargs):
        """Args: centred_conv: make the convs followed by MABN2d CentredConv2d; others: the parent's."""
        super().__init__(*args, **kwargs)
        if centred_conv:
            CentredConv2d.convert_convs_before_mabn(self)


@ROI_BOX_HEAD_REGISTRY.register()
class MABNFastRCNNConvFCHead(MABNHeadMixin, FastRCNNConvFCHead):
    """`FastRCNNConvFCHead` with `MODEL.ROI_BOX_HEAD.NORM` allowed to be "MABN"."""


@ROI_MASK_HEAD_REGISTRY.register()
class MABNMaskRCNNConvUpsampleHead(MABNHeadMixin, MaskRCNNConvUpsampleHead):
    """`MaskRCNNConvUpsampleHead` with `MODEL.ROI_MASK_HEAD.NORM` allowed to be "MABN"."""


@ROI_HEADS_REGISTRY.register()
class MABNRes5ROIHeads(Res5ROIHeads):
    """`Res5ROIHeads` (C4 models) whose res5 stage reads `MODEL.RESNETS.NORM` allowing "MABN".

    res5 runs on the pooled RoIs, so its MABN statistics are over the sampled RoIs
    (ROI_HEADS.BATCH_SIZE_PER_IMAGE × images), while res2-res4 in the backbone see images.
    """

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_mabn_config(cfg)
        return super().from_config(cfg, input_shape)

    @classmethod
    def _build_res5_block(cls, cfg):
        # The hook Detectron2 keeps for subclasses: Res5ROIHeads.from_config calls it.
        res5, out_channels = super()._build_res5_block(with_mabn_norms(cfg))
        if cfg.MODEL.MABN.CENTRED_CONV:
            CentredConv2d.convert_convs_before_mabn(res5)
        return res5, out_channels
