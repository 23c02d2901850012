"""The step after building modules with MABN2d, for the YAML builders and LazyConfig models alike:
centre the convs that feed MABN and refuse what MABN cannot do."""
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from ..layers import CentredConv2d, MABN2d, PerLevelMABN2d

__all__ = ["prepare_mabn_model"]


def prepare_mabn_model(model: nn.Module, *, centred_conv: bool | None = None) -> nn.Module:
    """Centre the convs that feed MABN in `model` and check it.

    Every conv that feeds an MABN layer becomes a CentredConv2d in place (see
    `CentredConv2d.convert_convs_before_mabn`). A model without MABN2d keeps its modules. The
    registered builders and heads of `mabn_det.modeling` run it on what they build, with
    ``cfg.MODEL.MABN.CENTRED_CONV``; `mabn_det.lazy.build_mabn_model` on the whole model. It runs
    once per module: preparing a prepared module returns it as it is.

    Args:
        model: the built module, before the optimizer is built (its parameters are kept).
        centred_conv: False keeps plain convs (an ablation; MABN drops the mean subtraction and
            relies on centred weights). None: as the model was prepared before, True for a model
            not prepared yet.

    Returns:
        `model`, with the attribute ``mabn_centred_conv`` recording the choice.

    Raises:
        ValueError: an MABN2d that is frozen (its stage is below the backbone's freeze_at); with
            `centred_conv`, one that is the ``norm`` of a conv that cannot be centred (a deformable
            conv); one that a RetinaNet head would share across its FPN levels; or a
            `centred_conv` that contradicts how the model was prepared before. Each names the
            module and the setting, for YAML and LazyConfig configs alike.
    """
    before = getattr(model, "mabn_centred_conv", None)
    if before is not None:
        if centred_conv is not None and centred_conv != before:
            raise ValueError(f"the model was prepared with centred_conv={before}, got "
                             f"centred_conv={centred_conv}; build it again to change that")
        return model
    centred_conv = True if centred_conv is None else centred_conv
    for head_name, head in model.named_modules():
        if isinstance(head, RetinaNetHead):
            _refuse_level_shared_mabn(head_name, head)
    if centred_conv:
        CentredConv2d.convert_convs_before_mabn(model)
    for name, m in model.named_modules():
        if isinstance(m, MABN2d) and not m.weight.requires_grad:
            raise ValueError(f"MABN layer '{name}' is frozen, and MABN layers cannot be frozen: "
                             "set the backbone's freeze_at to 0 (cfg.MODEL.BACKBONE.FREEZE_AT, "
                             "model.backbone.bottom_up.freeze_at in a LazyConfig)")
        if (centred_conv and isinstance(getattr(m, "norm", None), MABN2d)
                and not isinstance(m, CentredConv2d)):
            raise ValueError(f"'{name}' ({type(m).__name__}) feeds MABN but cannot be "
                             f"weight-centred as {CentredConv2d.__name__}; use another norm there "
                             "(a deformable conv: turn its stage's deformable convs off, e.g. "
                             "cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE all False)")
    model.mabn_centred_conv = centred_conv
    return model


def _refuse_level_shared_mabn(head_name: str, head: RetinaNetHead) -> None:
    """RetinaNet runs one head on every FPN level, so an MABN2d there would mix the levels'
    statistics in one ring; its norms must be per-level (PerLevelMABN2d)."""
    per_level = {id(m) for p in head.modules() if isinstance(p, PerLevelMABN2d)
                 for m in p.modules()}
    for name, m in head.named_modules():
        if isinstance(m, MABN2d) and id(m) not in per_level:
            raise ValueError(
                f"MABN layer '{head_name}.{name}' would be shared by all FPN levels of the "
                "RetinaNet head; write model.head.norm = \"BN\", instantiate the model without "
                "as_mabn_model, then call PerLevelMABN2d.replace_cycle_batch_norms(model.head, "
                "**mabn_settings) and prepare_mabn_model(model), so that each level has its own "
                "statistics")
