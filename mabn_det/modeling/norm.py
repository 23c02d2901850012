"""Turning the config string "MABN" into something Detectron2's constructors accept.

Detectron2's `get_norm` is a closed table of strings but calls any callable it is given with the
channel count. Every constructor we reuse passes its norm argument to `get_norm`, so a copy of the
config in which "MABN" is replaced by an MABN2d factory builds the stock modules with MABN inside.
"""
import functools

from detectron2.config import CfgNode
from torch import nn

from ..config import MABN_NORM, MABN_NORM_SITES, get_key, mabn_layer_kwargs, set_key
from ..layers import MABN2d, centre_convs_before_mabn_

__all__ = ["with_mabn_norms", "centre_if_enabled"]


def with_mabn_norms(cfg: CfgNode) -> CfgNode:
    """A copy of `cfg` where every supported NORM equal to "MABN" is an MABN2d factory.

    Other values ("BN", "GN", "SyncBN", "", ...) are left for Detectron2 to resolve, so norms mix.
    The copy is only for building modules: `cfg` itself (and the config.yaml dumped from it) keeps
    the string.
    """
    factory = functools.partial(MABN2d, **mabn_layer_kwargs(cfg))
    resolved = cfg.clone()
    resolved.defrost()
    for key in MABN_NORM_SITES:
        if get_key(resolved, key) == MABN_NORM:
            set_key(resolved, key, factory)
    return resolved


def centre_if_enabled(module: nn.Module, cfg: CfgNode) -> nn.Module:
    """Weight-centre the convs feeding MABN layers when `cfg.MODEL.MABN.WEIGHT_CENTRALIZATION`."""
    if cfg.MODEL.MABN.WEIGHT_CENTRALIZATION:
        centre_convs_before_mabn_(module)
    return module
