"""The Panoptic FPN semantic head with NORM "MABN" (registered in SEM_SEG_HEADS_REGISTRY)."""
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

from .sites import mabn_site
from .roi_heads import MABNHeadMixin

__all__ = ["MABNSemSegFPNHead"]


@mabn_site(SEM_SEG_HEADS_REGISTRY, "MODEL.SEM_SEG_HEAD.NAME", SemSegFPNHead,
           ("MODEL.SEM_SEG_HEAD.NORM",), built_by=("SemanticSegmentor", "PanopticFPN"))
class MABNSemSegFPNHead(MABNHeadMixin, SemSegFPNHead):
    """`SemSegFPNHead` with `MODEL.SEM_SEG_HEAD.NORM` allowed to be "MABN" (Detectron2's default
    there is "GN"). Each FPN level has its own scale head, so every MABN layer sees one level; its
    batch is the images, at 1/4 to 1/32 of their resolution.
    """
