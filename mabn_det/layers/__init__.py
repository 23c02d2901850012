from .centred_conv import CentredConv2d
from .inference import convert_to_inference_form
from .mabn import MABN2d, check_mabn_hyperparameters
from .per_level_mabn import PerLevelMABN2d

__all__ = [
    "CentredConv2d",
    "MABN2d",
    "PerLevelMABN2d",
    "check_mabn_hyperparameters",
    "convert_to_inference_form",
]
