"""RetinaNet whose head NORM may be "MABN" (registered in META_ARCH_REGISTRY)."""
import dataclasses
import logging

from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet

from ..config import MABN_NORM, check_mabn_config, mabn_settings
from ..layers import CentredConv2d, PerLevelMABN2d

__all__ = ["MABNRetinaNet"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
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
        check_mabn_config(cfg)
        if cfg.MODEL.RETINANET.NORM != MABN_NORM:
            return super().from_config(cfg)
        per_level_bn = cfg.clone()
        per_level_bn.defrost()
        per_level_bn.MODEL.RETINANET.NORM = "BN"
        ret = super().from_config(per_level_bn)
        settings = dataclasses.asdict(mabn_settings(cfg))
        PerLevelMABN2d.replace_cycle_batch_norms(ret["head"], **settings)
        if cfg.MODEL.MABN.CENTRED_CONV:
            CentredConv2d.convert_convs_before_mabn(ret["head"])
        logger.info("RetinaNetHead: the per-level BN above is replaced by per-level MABN "
                    "(PerLevelMABN2d)")
        return ret
