"""MABN in Detectron2's LazyConfig (Python) configs.

A LazyConfig names each norm where the module takes it (``norm=`` of BasicStem, ResNet stages and
FPN; ``conv_norm=`` of the box and mask heads), and every one of those constructors calls a callable
norm with the channel count. So MABN is written as one `mabn_norm` node, referenced from each site,
and the model node is made an MABN model with `as_mabn_model`::

    from detectron2.config import LazyCall as L
    from mabn_det.lazy import as_mabn_model, mabn_norm

    model = as_mabn_model(model)
    mabn = L(mabn_norm)()  # MABNSettings' defaults; give only what differs, e.g. buffer_size=8
    model.backbone.bottom_up.stem.norm = "${mabn}"
    model.backbone.bottom_up.stages.norm = "${mabn}"
    model.backbone.norm = "${mabn}"
    model.roi_heads.box_head.conv_norm = "${mabn}"
    model.roi_heads.mask_head.conv_norm = "${mabn}"
    model.backbone.bottom_up.freeze_at = 0

Then ``instantiate(cfg.model)`` alone returns the model that
`mabn_det.modeling.prepare_mabn_model` has centred and checked, so any training loop, Detectron2's
own tools/lazyconfig_train_net.py included, trains MABN as the paper does. The interpolations
keep one set of MABN settings, overridden once (``mabn.buffer_size=8``); the model's keys stay
where they were (``model.backbone...``). Both nodes are plain LazyCalls, so the config survives
`LazyConfig.save` and loads back from its YAML.
"""
import copy
import dataclasses
import functools
from collections import abc
from typing import Callable

from detectron2.data import build_detection_train_loader
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils.registry import locate
from torch import nn

from .layers import MABN2d, MABNSettings
from .modeling import prepare_mabn_model
from .solver import mabn_optimizer_params

__all__ = ["as_mabn_model", "build_mabn_model", "is_lazy_config", "mabn_norm", "stock_lazy_config",
           "target_callable"]


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


def as_mabn_model(model: abc.MutableMapping) -> abc.MutableMapping:
    """Make the LazyConfig model node `model` (an omegaconf DictConfig) build a prepared MABN
    model, in place.

    Its ``_target_`` (a meta-architecture such as GeneralizedRCNN) moves to the key
    ``meta_architecture`` and `build_mabn_model` takes its place; the key ``centred_conv`` (True)
    is added. Every other key stays where it was, so ``model.backbone.bottom_up.freeze_at=0`` still
    overrides it. A node already made so is returned unchanged.

    Returns:
        `model`, for chaining.
    """
    if target_callable(model._target_) is build_mabn_model:
        return model
    target = model._target_
    model.meta_architecture = (target if isinstance(target, str)
                               else f"{target.__module__}.{target.__qualname__}")
    model.centred_conv = True
    model._target_ = build_mabn_model
    return model


def build_mabn_model(*, meta_architecture: str | Callable[..., nn.Module],
                     centred_conv: bool = True, **kwargs) -> nn.Module:
    """``meta_architecture(**kwargs)``, prepared by `prepare_mabn_model`: the ``_target_`` of a
    model node made by `as_mabn_model`.

    Args:
        meta_architecture: the model's class, or its dotted name (as a saved config holds it).
        centred_conv: see `prepare_mabn_model`.
        **kwargs: the meta-architecture's arguments (backbone, roi_heads, ...).
    """
    model = target_callable(meta_architecture)(**kwargs)
    return prepare_mabn_model(model, centred_conv=centred_conv)


def target_callable(target):
    """The callable of a LazyConfig ``_target_``, which may be its dotted name (as in a config
    saved and loaded back)."""
    return locate(target) if isinstance(target, str) else target


# mabn_det.engine's resumable loader, named rather than imported: the engine builds on this module.
_RESUMABLE_LOADER = "mabn_det.engine.sampler.build_resumable_train_loader"


def _qualified_name(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"


def is_lazy_config(config_file: str) -> bool:
    """Whether `config_file` is a LazyConfig: Python, or YAML with a lower-case ``model`` node (as
    `LazyConfig.save` writes it) where a YAML config of Detectron2's `CfgNode` has ``MODEL``."""
    if config_file.endswith(".py"):
        return True
    with open(config_file) as f:
        # Top-level keys only: a saved LazyConfig may hold python tags (a ShapeSpec).
        return "model" in (line.split(":", 1)[0] for line in f if line[:1].isalpha())


def stock_lazy_config(cfg: abc.MutableMapping) -> abc.MutableMapping:
    """A copy of the LazyConfig `cfg` (an omegaconf DictConfig) that stock Detectron2
    instantiates without mabn_det.

    In ``cfg.model``, every `mabn_norm` node (written in place or as "${mabn}") becomes
    "FrozenBN", and a node made by `as_mabn_model` gets its meta-architecture back as
    ``_target_``; the top-level ``mabn`` node is removed, an ``optimizer.params`` node of
    `mabn_det.solver.mabn_optimizer_params` becomes Detectron2's `get_default_optimizer_params`,
    and a ``dataloader.train`` of `mabn_det.engine.build_resumable_train_loader` Detectron2's
    `build_detection_train_loader` (the same arguments).
    Weights converted by `mabn_det.layers.convert_to_inference_form` load into the model it builds.
    """
    stock = copy.deepcopy(cfg)
    _replace_mabn_norms(stock.model)
    if target_callable(stock.model._target_) is build_mabn_model:
        stock.model._target_ = stock.model.pop("meta_architecture")
        stock.model.pop("centred_conv")
    stock.pop("mabn", None)
    params = stock.get("optimizer", {}).get("params", {})
    if target_callable(params.get("_target_")) is mabn_optimizer_params:
        params._target_ = get_default_optimizer_params  # the same groups without MABN layers
    train_loader = stock.get("dataloader", {}).get("train", {})
    if _qualified_name(target_callable(train_loader.get("_target_"))) == _RESUMABLE_LOADER:
        train_loader._target_ = build_detection_train_loader
    return stock


def _replace_mabn_norms(node: abc.MutableMapping | abc.MutableSequence) -> None:
    for key in (node.keys() if isinstance(node, abc.Mapping) else range(len(node))):
        value = node[key]  # an interpolation such as "${mabn}" resolves to its node here
        if isinstance(value, abc.Mapping) and target_callable(value.get("_target_")) is mabn_norm:
            node[key] = "FrozenBN"
        elif isinstance(value, (abc.Mapping, abc.MutableSequence)):
            _replace_mabn_norms(value)
