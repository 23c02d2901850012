from .cen_conv import WeightCentredConv2d, centre_convs_before_mabn_
from .inference import convert_to_inference_form
from .mabn import MABN2d, check_mabn_hyperparameters

__all__ = [
    "MABN2d",
    "WeightCentredConv2d",
    "centre_convs_before_mabn_",
    "check_mabn_hyperparameters",
    "convert_to_inference_form",
]
