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
from .per_level_mabn import PerLevelMABN2d
from .pretrained_offset import PretrainedOffset

__all__ = ["CentredConv2d"]


def _is_mabn(norm) -> bool:
    return isinstance(norm, (MABN2d, PerLevelMABN2d))


class CentredConv2d(Conv2d):
    """A Detectron2 `Conv2d` whose forward uses W − mean(W), the mean taken per output filter.

    It takes the same arguments (including ``norm`` and ``activation``) and has the same state-dict
    keys as `detectron2.layers.Conv2d`; the stored weights stay uncentred and the centring is part of
    the differentiable forward.

    A conv loaded from a converted BatchNorm checkpoint (`mabn_det.bn_checkpoint`) also has a
    child ``pretrained_offset`` (`PretrainedOffset`): it is created when the state dict being loaded
    holds its keys, adds the loaded filters' means and the BN mean back so that the conv computes
    the loaded one, and fades them to zero during fine-tuning. Other convs have no such child and
    no such keys.
    """

    def centred_weight(self) -> torch.Tensor:
        """Returns: (C_out, C_in/groups, kh, kw), each filter with mean 0."""
        return self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.centred_weight(), self.bias
        # A class swap (convert_convs_before_mabn) runs no __init__: read the child from _modules.
        offset = self._modules.get("pretrained_offset")
        if offset is not None:
            weight, bias = offset(weight, bias)
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Children are loaded after their parent, so a child added here receives its keys.
        if (prefix + "pretrained_offset.filter_mean" in state_dict
                and "pretrained_offset" not in self._modules):
            # In the conv's mode: an offset added to a model in eval mode must not count forwards.
            offset = PretrainedOffset(self.out_channels).to(self.weight.device).train(self.training)
            self.add_module("pretrained_offset", offset)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @classmethod
    def convert_convs_before_mabn(cls, module: nn.Module) -> nn.Module:
        """Turn, in place, every conv that feeds an MABN layer into a CentredConv2d.

        Two layouts are recognised: a Detectron2 `Conv2d` whose ``norm`` is an MABN2d (ResNet, FPN,
        ROI and semantic heads), and a plain `nn.Conv2d` directly followed by an MABN2d or
        PerLevelMABN2d in an `nn.Sequential` (RetinaNet's subnets); the latter gets ``norm`` and
        ``activation`` None, since the Sequential applies them.

        The class of each conv is swapped rather than the module replaced: Detectron2's FPN and ROI
        heads also reach their convs through plain Python lists, which a replaced child would leave
        pointing at the old module. The swap adds no state, so parameters, initialisation and keys
        are kept.

        Returns:
            `module`, for chaining.
        """
        for m in module.modules():
            if type(m) is Conv2d and _is_mabn(m.norm):
                m.__class__ = cls
            elif isinstance(m, nn.Sequential):
                for conv, norm in zip(list(m), list(m)[1:]):
                    if type(conv) is nn.Conv2d and _is_mabn(norm):
                        conv.__class__ = cls
                        conv.norm = conv.activation = None
        return module
