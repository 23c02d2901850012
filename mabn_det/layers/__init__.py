from .centred_conv import CentredConv2d
from .inference import convert_to_inference_form
from .mabn import MABN2d
from .mabn_settings import MABNSettings
from .per_level_mabn import PerLevelMABN2d
from .pretrained_offset import PretrainedOffset

__all__ = [
    "CentredConv2d",
    "MABN2d",
    "MABNSettings",
    "PerLevelMABN2d",
    "PretrainedOffset",
    "convert_to_inference_form",
]
