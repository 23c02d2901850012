"""Box and mask heads whose NORM may be "MABN" (registered in ROI_BOX_HEAD / ROI_MASK_HEAD)."""
from detectron2.config import configurable
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    FastRCNNConvFCHead,
    MaskRCNNConvUpsampleHead,
)

from ..config import check_mabn_config, with_mabn_norms
from ..layers import CentredConv2d

__all__ = ["MABNFastRCNNConvFCHead", "MABNMaskRCNNConvUpsampleHead"]


class _MABNHeadMixin:
    """Reads the head's NORM through `with_mabn_norms` and makes the convs that feed MABN centred.

    Head batches are RoIs (ROI_HEADS.BATCH_SIZE_PER_IMAGE × images), and the mask head may see none
    at all; MABN2d leaves its statistics untouched for such an empty batch.
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
class MABNFastRCNNConvFCHead(_MABNHeadMixin, FastRCNNConvFCHead):
    """`FastRCNNConvFCHead` with `MODEL.ROI_BOX_HEAD.NORM` allowed to be "MABN"."""


@ROI_MASK_HEAD_REGISTRY.register()
class MABNMaskRCNNConvUpsampleHead(_MABNHeadMixin, MaskRCNNConvUpsampleHead):
    """`MaskRCNNConvUpsampleHead` with `MODEL.ROI_MASK_HEAD.NORM` allowed to be "MABN"."""
