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

from ..config import with_mabn_norms
from .prepare import prepare_mabn_model
from .sites import mabn_site

__all__ = ["MABNFastRCNNConvFCHead", "MABNHeadMixin", "MABNMaskRCNNConvUpsampleHead",
           "MABNRes5ROIHeads"]


class MABNHeadMixin:
    """For a configurable head (box, mask, semantic) built from one `from_config`: reads the head's
    NORM through `with_mabn_norms` and prepares the head (`prepare_mabn_model`).

    ROI head batches are RoIs (ROI_HEADS.BATCH_SIZE_PER_IMAGE × images), and the mask head may see
    none at all; MABN2d leaves its statistics untouched for such an empty batch.
    """

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(with_mabn_norms(cfg), input_shape)
        ret["centred_conv"] = cfg.MODEL.MABN.CENTRED_CONV
        return ret

    @configurable
    def __init__(self, *args, centred_conv: bool = True, **kwargs):
        """Args: centred_conv: see `prepare_mabn_model`; the others: the parent's."""
        super().__init__(*args, **kwargs)
        prepare_mabn_model(self, centred_conv=centred_conv)


@mabn_site(ROI_BOX_HEAD_REGISTRY, "MODEL.ROI_BOX_HEAD.NAME", FastRCNNConvFCHead,
           ("MODEL.ROI_BOX_HEAD.NORM",))
class MABNFastRCNNConvFCHead(MABNHeadMixin, FastRCNNConvFCHead):
    """`FastRCNNConvFCHead` with `MODEL.ROI_BOX_HEAD.NORM` allowed to be "MABN"."""


@mabn_site(ROI_MASK_HEAD_REGISTRY, "MODEL.ROI_MASK_HEAD.NAME", MaskRCNNConvUpsampleHead,
           ("MODEL.ROI_MASK_HEAD.NORM",))
class MABNMaskRCNNConvUpsampleHead(MABNHeadMixin, MaskRCNNConvUpsampleHead):
    """`MaskRCNNConvUpsampleHead` with `MODEL.ROI_MASK_HEAD.NORM` allowed to be "MABN"."""


# Of the ROI heads, only Res5ROIHeads reads MODEL.RESNETS.NORM, and only GeneralizedRCNN and
# PanopticFPN build ROI heads.
@mabn_site(ROI_HEADS_REGISTRY, "MODEL.ROI_HEADS.NAME", Res5ROIHeads, ("MODEL.RESNETS.NORM",),
           built_by=("GeneralizedRCNN", "PanopticFPN"), only_stock_reads=True)
class MABNRes5ROIHeads(Res5ROIHeads):
    """`Res5ROIHeads` (C4 models) whose res5 stage reads `MODEL.RESNETS.NORM` allowing "MABN".

    res5 runs on the pooled RoIs, so its MABN statistics are over the sampled RoIs
    (ROI_HEADS.BATCH_SIZE_PER_IMAGE × images), while res2-res4 in the backbone see images.
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        # The hook Detectron2 keeps for subclasses: Res5ROIHeads.from_config calls it.
        res5, out_channels = super()._build_res5_block(with_mabn_norms(cfg))
        return prepare_mabn_model(res5, centred_conv=cfg.MODEL.MABN.CENTRED_CONV), out_channels
