"""Weight-centred convolution: each output filter has its mean subtracted before convolving.

MABN normalises by mean(x²) without subtracting the batch mean; centring the weights of the conv that
feeds it keeps that conv's output close to zero-mean, which is what makes dropping the mean safe
(Yan et al., ICLR 2020, section 4.3).
"""
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import nn

from .mabn import MABN2d

__all__ = ["CentredConv2d"]


class CentredConv2d(Conv2d):
    """A Detectron2 `Conv2d` whose forward uses W − mean(W), the mean taken per output filter.

    It takes the same arguments (including ``norm`` and ``activation``) and has the same state-dict
    keys as `detectron2.layers.Conv2d`; the stored weights stay uncentred and the centring is part of
    the differentiable forward.
    """

    def centred_weight(self) -> torch.Tensor:
        """Returns: (C_out, C_in/groups, kh, kw), each filter with mean 0."""
        return self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.centred_weight(), self.bias, self.stride, self.padding,
                     self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    @classmethod
    def convert_convs_before_mabn(cls, module: nn.Module) -> nn.Module:
        """Turn, in place, every Detectron2 `Conv2d` whose ``norm`` is an MABN2d into a CentredConv2d.

        The class of each conv is swapped rather than the module replaced: Detectron2's FPN and ROI
        heads also reach their convs through plain Python lists, which a replaced child would leave
        pointing at the old module. The swap adds no state, so parameters, initialisation and keys
        are kept.

        Returns:
            `module`, for chaining.
        """
        for m in module.modules():
            if type(m) is Conv2d and isinstance(m.norm, MABN2d):
                m.__class__ = cls
        return module
