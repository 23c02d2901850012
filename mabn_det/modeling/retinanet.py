"""RetinaNet whose head NORM may be "MABN" (registered in META_ARCH_REGISTRY)."""
import dataclasses
import logging

from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet

from ..config import MABN_NORM, mabn_settings
from ..layers import PerLevelMABN2d
from .prepare import prepare_mabn_model
from .sites import mabn_site

__all__ = ["MABNRetinaNet"]

logger = logging.getLogger(__name__)


# Other meta-architectures do not read MODEL.RETINANET.NORM. Stock Detectron2 gives per-level
# statistics only for "BN" (CycleBatchNormList), which is how the inference form runs the head.
@mabn_site(META_ARCH_REGISTRY, "MODEL.META_ARCHITECTURE", RetinaNet, ("MODEL.RETINANET.NORM",),
           only_stock_reads=True, inference_norm="BN")
class MABNRetinaNet(RetinaNet):
    """`RetinaNet` with `MODEL.RETINANET.NORM` allowed to be "MABN".

    The head (`RetinaNetHead`, built by `RetinaNet.from_config` itself, with no registry) runs the
    same subnets on every level. For "MABN" it is built as Detectron2 builds it for "BN", with
    per-level norms (`CycleBatchNormList`), and each of those becomes a `PerLevelMABN2d`: per-level
    MABN statistics, shared γ and β, shared convs. The subnets' plain `nn.Conv2d` that feed them
    become CentredConv2d (MODEL.MABN.CENTRED_CONV). Any other NORM gives Detectron2's RetinaNet.
    """

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.RETINANET.NORM != MABN_NORM:
            return super().from_config(cfg)
        per_level_bn = cfg.clone()
        per_level_bn.defrost()
        per_level_bn.MODEL.RETINANET.NORM = "BN"
        ret = super().from_config(per_level_bn)
        settings = dataclasses.asdict(mabn_settings(cfg))
        PerLevelMABN2d.replace_cycle_batch_norms(ret["head"], **settings)
        prepare_mabn_model(ret["head"], centred_conv=cfg.MODEL.MABN.CENTRED_CONV)
        logger.info("RetinaNetHead: the per-level BN above is replaced by per-level MABN "
                    "(PerLevelMABN2d)")
        return ret
