"""Inference form: a model with no mabn_det class left, loadable by stock Detectron2."""
import copy

import torch
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from torch import nn

from .centred_conv import CentredConv2d
from .mabn import MABN2d
from .per_level_mabn import PerLevelMABN2d

__all__ = ["convert_to_inference_form"]


def _variance_for_default_eps(mabn: MABN2d, eps: float) -> torch.Tensor:
    """running_var' with √(running_var' + eps) = √(running_var + mabn.eps).

    Stock Detectron2 builds its norms with their default ε, so MABN's ε goes into the variance:
    the exported model is then exact whatever `MODEL.MABN.EPS` was.
    """
    return mabn.running_var + (mabn.eps - eps)


def _frozen_bn_from(mabn: MABN2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(mabn.num_features)
    frozen.weight.copy_(mabn.weight.detach())
    frozen.bias.copy_(mabn.bias.detach())
    frozen.running_mean.zero_()
    frozen.running_var.copy_(_variance_for_default_eps(mabn, frozen.eps))
    return frozen.to(mabn.weight.device)


def _cycle_batch_norm_from(per_level: PerLevelMABN2d) -> CycleBatchNormList:
    """What stock Detectron2's RetinaNetHead builds for NORM "BN": per-level BatchNorm2d without
    affine, then the shared γ and β. In eval mode each level is γ·x/√(running_var+ε) + β, like MABN.
    """
    first = per_level.levels[0]
    cycle = CycleBatchNormList(len(per_level.levels), bn_class=nn.BatchNorm2d,
                               num_features=first.num_features)
    cycle.weight.copy_(per_level.weight.detach())
    cycle.bias.copy_(per_level.bias.detach())
    for bn, mabn in zip(cycle, per_level.levels):
        bn.running_mean.zero_()
        bn.running_var.copy_(_variance_for_default_eps(mabn, bn.eps))
    return cycle.to(first.weight.device).train(per_level.training)


def _replace_mabn(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, MABN2d):
            setattr(module, name, _frozen_bn_from(child))
        elif isinstance(child, PerLevelMABN2d):
            setattr(module, name, _cycle_batch_norm_from(child))
        else:
            _replace_mabn(child)


def _fold_pretrained_offset_(conv: CentredConv2d) -> None:
    """Remove the conv's PretrainedOffset, keeping its eval output: α·filter_mean joins the centred
    weight, and α·bias passes through the MABN2d's eval map into its β
    (+ γ·α·bias/√(running_var+ε)), since the stock conv before a norm has no bias."""
    offset = conv._modules.pop("pretrained_offset")
    alpha = offset.scale()
    conv.weight.add_(alpha * offset.filter_mean)
    mabn = conv.norm
    mabn.bias.add_(mabn.weight * alpha * offset.bias / torch.sqrt(mabn.running_var + mabn.eps))


def _fold_frozen_bn_(conv: Conv2d) -> None:
    """conv → norm becomes one conv: W·s, b·s + (β − μ·s) with s = γ/√(σ²+ε) per output channel."""
    norm = conv.norm
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.clone())
    else:
        conv.bias.mul_(scale).add_(shift)
    conv.norm = None


@torch.no_grad()
def convert_to_inference_form(model: nn.Module, *, fold_into_conv: bool = False,
                              inplace: bool = False) -> nn.Module:
    """Turn every MABN2d into Detectron2's FrozenBatchNorm2d, every PerLevelMABN2d into the
    `CycleBatchNormList` of BatchNorm2d that Detectron2 builds for RetinaNet's NORM "BN", and every
    weight-centred conv into a plain Detectron2 Conv2d holding its centred weights.

    Eval outputs are unchanged: MABN at inference is the per-channel affine map
    γ·x/√(running_var+ε) + β, i.e. FrozenBatchNorm2d with running_mean 0 (per level: BatchNorm2d in
    eval mode, whose statistics a training-mode forward would overwrite). A conv's
    `PretrainedOffset` (from a converted BN checkpoint) is folded into its weight and its MABN's β
    at the offset's current scale, and removed. Module identity of the convs is kept (their class is
    swapped), so containers that hold them in plain lists keep working.

    Args:
        model: any module; only MABN2d and CentredConv2d instances are changed.
        fold_into_conv: also fold each such FrozenBatchNorm2d into the Conv2d that feeds it, leaving
            a conv with a bias and no norm (fastest; the state dict no longer matches a FrozenBN model).
            Per-level norms stay: their shared conv cannot hold L foldings.
        inplace: modify `model` itself instead of a deep copy.

    Returns:
        The converted model.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for m in list(model.modules()):  # a folded offset leaves its conv's children
        if isinstance(m, CentredConv2d):
            m.weight.copy_(m.centred_weight())
            if "pretrained_offset" in m._modules:
                _fold_pretrained_offset_(m)
            m.__class__ = Conv2d
    _replace_mabn(model)
    if fold_into_conv:
        for m in model.modules():
            if isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d):
                _fold_frozen_bn_(m)
    return model
