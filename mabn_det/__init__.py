"""mabn_det: Moving Average Batch Normalization (Yan et al., ICLR 2020) for Detectron2.

Importing the package registers its backbones, ROI and semantic heads and RetinaNet in Detectron2's
registries. It imports nothing beyond torch and Detectron2 and registers no dataset; the synthetic
shapes set, the demo and the norm study live beside it, in `mabn_experiments`.
"""
try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mabn_det needs Detectron2, which is not on PyPI. From a mabn_det checkout run "
        "`make setup` (everything) or `python tools/install_detectron2.py` (Detectron2 alone, into "
        "the current environment); or install your own build of detectron2."
    ) from e

from .config import add_mabn_config, load_config
from .modeling import check_mabn_config  # importing modeling registers its modules
from .layers import (CentredConv2d, MABN2d, MABNSettings, PerLevelMABN2d,
                     convert_to_inference_form)

__all__ = ["CentredConv2d", "MABN2d", "MABNSettings", "PerLevelMABN2d", "add_mabn_config",
           "check_mabn_config", "convert_to_inference_form", "load_config"]
