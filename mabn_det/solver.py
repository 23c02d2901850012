"""The optimizer: Detectron2's, with MABN2d parameters treated as norm parameters."""
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import (
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)

from .layers import MABN2d

__all__ = ["build_mabn_optimizer", "mabn_aware_param_groups", "mabn_optimizer_params"]


def mabn_optimizer_params(model: torch.nn.Module, *, weight_decay_norm: float | None = None,
                          weight_decay_bias: float | None = None,
                          **kwargs) -> List[Dict[str, Any]]:
    """Detectron2's `get_default_optimizer_params`, with MABN2d's γ and β treated as norm parameters.

    Same arguments and a drop-in for it (also as the ``optimizer.params`` node of a LazyConfig): with
    `weight_decay_norm` set, MABN2d's γ and β get it as Detectron2's own norms do (a β still takes
    `weight_decay_bias` when that is set).
    """
    groups = get_default_optimizer_params(model, weight_decay_norm=weight_decay_norm,
                                          weight_decay_bias=weight_decay_bias, **kwargs)
    if weight_decay_norm is None:
        return groups
    as_norm = {
        id(param)
        for module in model.modules() if isinstance(module, MABN2d)
        for name, param in module.named_parameters(recurse=False)
        if not (name == "bias" and weight_decay_bias is not None)
    }
    regrouped = []
    for group in groups:
        norm_params = [p for p in group["params"] if id(p) in as_norm]
        other_params = [p for p in group["params"] if id(p) not in as_norm]
        if other_params:
            regrouped.append({**group, "params": other_params})
        if norm_params:
            regrouped.append({**group, "params": norm_params, "weight_decay": weight_decay_norm})
    return reduce_param_groups(regrouped)


def mabn_aware_param_groups(cfg: CfgNode, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """`mabn_optimizer_params` with the SOLVER settings of `cfg`."""
    return mabn_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )


def build_mabn_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Detectron2's SGD (momentum, Nesterov, gradient clipping) over `mabn_aware_param_groups`."""
    optimizer = torch.optim.SGD(
        mabn_aware_param_groups(cfg, model),
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        foreach=True,
    )
    return maybe_add_gradient_clipping(cfg, optimizer)
