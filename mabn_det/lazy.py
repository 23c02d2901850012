"""MABN in Detectron2's LazyConfig (Python) configs.

A LazyConfig names each norm where the module takes it (``norm=`` of BasicStem, ResNet stages and
FPN; ``conv_norm=`` of the box and mask heads), and every one of those constructors calls a callable
norm with the channel count. So MABN is written as one `mabn_norm` node, referenced from each site::

    from detectron2.config import LazyCall as L
    from mabn_det.lazy import mabn_norm

    mabn = L(mabn_norm)(buffer_size=16, warmup_iters=100, renorm_warmup_iters=1000)
    model.backbone.bottom_up.stem.norm = "${mabn}"
    model.backbone.bottom_up.stages.norm = "${mabn}"
    model.backbone.norm = "${mabn}"
    model.roi_heads.box_head.conv_norm = "${mabn}"
    model.roi_heads.mask_head.conv_norm = "${mabn}"
    model.backbone.bottom_up.freeze_at = 0

The interpolations keep one set of MABN settings, overridden once (``mabn.buffer_size=8``), and the
node, unlike a lambda, survives `LazyConfig.save`. After `instantiate(cfg.model)`, call
`prepare_mabn_model` (tools/lazyconfig_train_net.py does): it centres the convs that feed MABN and
refuses what cannot train.
"""
import dataclasses
import functools
from typing import Callable

from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from .layers import CentredConv2d, MABN2d, MABNSettings, PerLevelMABN2d

__all__ = ["mabn_norm", "prepare_mabn_model"]


def mabn_norm(**settings) -> Callable[[int], MABN2d]:
    """A norm factory for LazyConfig ``norm=`` / ``conv_norm=`` fields: channels → MABN2d.

    Args:
        **settings: fields of `mabn_det.layers.MABNSettings` (buffer_size, warmup_iters, ...);
            those not given take its defaults, the paper's detection settings. They are checked
            here, when the config is instantiated.

    Raises:
        TypeError, ValueError: naming the bad argument, its value and the valid range.
    """
    checked = MABNSettings.from_user(lambda field: f"mabn_norm({field}=...)", **settings)
    return functools.partial(MABN2d, **dataclasses.asdict(checked))


def prepare_mabn_model(model: nn.Module, *, centred_conv: bool = True) -> nn.Module:
    """The step after `instantiate(cfg.model)`: centre the convs before MABN, then check the model.

    Every conv that feeds an MABN layer becomes a CentredConv2d in place (see
    `CentredConv2d.convert_convs_before_mabn`). A model without MABN2d is returned unchanged.

    Args:
        model: the instantiated model, before the optimizer is built (its parameters are kept).
        centred_conv: False keeps plain convs (an ablation; MABN drops the mean subtraction and
            relies on centred weights).

    Returns:
        `model`.

    Raises:
        ValueError: an MABN2d that is frozen (its stage has ``freeze_at`` > 0); with
            `centred_conv`, one that is the ``norm`` of a conv that cannot be centred (a deformable
            conv); or one that a RetinaNet head would share across its FPN levels. Each names the
            module.
    """
    for head_name, head in model.named_modules():
        if isinstance(head, RetinaNetHead):
            _refuse_level_shared_mabn(head_name, head)
    if centred_conv:
        CentredConv2d.convert_convs_before_mabn(model)
    for name, m in model.named_modules():
        if isinstance(m, MABN2d) and not m.weight.requires_grad:
            raise ValueError(f"MABN layer '{name}' is frozen, and MABN layers cannot be "
                             "frozen: set the backbone's freeze_at to 0 (e.g. "
                             "model.backbone.bottom_up.freeze_at=0)")
        if (centred_conv and isinstance(getattr(m, "norm", None), MABN2d)
                and not isinstance(m, CentredConv2d)):
            raise ValueError(f"'{name}' ({type(m).__name__}) feeds MABN but cannot be "
                             f"weight-centred as {CentredConv2d.__name__}; use another norm there "
                             "(a deformable conv: set its stage's deform settings off)")
    return model


def _refuse_level_shared_mabn(head_name: str, head: RetinaNetHead) -> None:
    """RetinaNet runs one head on every FPN level, so an MABN2d there would mix the levels'
    statistics in one ring; its norms must be per-level (PerLevelMABN2d)."""
    per_level = {id(m) for p in head.modules() if isinstance(p, PerLevelMABN2d)
                 for m in p.modules()}
    for name, m in head.named_modules():
        if isinstance(m, MABN2d) and id(m) not in per_level:
            raise ValueError(
                f"MABN layer '{head_name}.{name}' would be shared by all FPN levels of the RetinaNet "
                "head; write model.head.norm = \"BN\" and, after instantiate, call "
                "PerLevelMABN2d.replace_cycle_batch_norms(model.head, **mabn_settings) before "
                "prepare_mabn_model, so that each level has its own statistics")
