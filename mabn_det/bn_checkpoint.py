"""Convert a BatchNorm checkpoint into one that an MABN model loads and computes the same function
with: ImageNet- or COCO-pretrained weights for a model with NORM "MABN" everywhere.

Sources: a Detectron2 checkpoint (``.pth`` with BN, SyncBN or FrozenBN; ``{"model": ...}`` or a bare
state dict), a Detectron2 MSRA/Caffe2 ``.pkl`` (``R-50.pkl``, FrozenBN as scale and bias), or a
torchvision ResNet state dict. Each is loaded by Detectron2's own checkpointer into the BN twin of
the MABN model (the same config with every "MABN" read as "FrozenBN", see
`mabn_det.modeling.stock_inference_config`), so names, Caffe2 renaming and FrozenBN's defaults are
Detectron2's; then every conv → FrozenBN pair of the twin becomes the model's conv → MABN2d:

- MABN2d: γ and β as loaded, running_var = σ² + ε_BN − ε_MABN, so that its eval map
  γ·z/√(running_var + ε_MABN) + β divides by BN's √(σ² + ε_BN).
- The conv, a CentredConv2d, keeps the loaded filters W and gets a `PretrainedOffset`: each filter's
  mean and the bias −μ (BN's running mean), added back in its forward. In eval mode the model then
  computes γ·(conv(x, W) − μ)/√(σ² + ε) + β, the BN model's function; the offset fades to zero over
  ``fade_iters`` training forwards, after which the conv is a plain CentredConv2d. (A conv that is
  not centred, MODEL.MABN.CENTRED_CONV False, needs no offset: μ goes into β as below.)
- ``centre_filters=True`` is the authors' approach instead (it gave 19.6 box AP, megvii-model/MABN
  issue #2): no offset, so the filters are centred from the start, and μ is folded into β
  (β − γ·μ/√(σ² + ε)). Not exact: centring changes each conv by −mean(W)·(window sum of its input).

For each converted layer the written checkpoint holds the conv, its offset and the whole MABN2d
(its rings empty and counters at 0, as in a fresh model), so fine-tune with the MABN settings it was
converted with: MABN2d refuses another buffer size by name, and running_var holds MODEL.MABN.EPS.
Whatever the source does not hold (an ImageNet checkpoint's FPN and heads) is left out, for the
fine-tuning run to initialise, as with Detectron2's own ImageNet weights.
"""
import logging
import re
from collections import abc
from typing import Dict, Iterable, Set

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, instantiate
from detectron2.layers import CNNBlockBase, Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BottleneckBlock
from torch import nn

from .modeling import stock_inference_config
from .layers import CentredConv2d, MABN2d, PretrainedOffset
from .lazy import stock_lazy_config

__all__ = ["DEFAULT_FADE_ITERS", "convert_bn_checkpoint", "torchvision_to_detectron2_names"]

logger = logging.getLogger(__name__)

# Training forwards over which the offsets fade: Detectron2's default SOLVER.WARMUP_ITERS and the
# paper's MABN renormalisation warm-up. Not tuned.
DEFAULT_FADE_ITERS = 1000

# The conv → norm tensors of a pair: the conv's weight, then the norm's.
_PAIR_KEYS = ("weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var")
# What torchvision's ImageNet ResNets expect (RGB in [0, 255], normalised as torchvision does).
_TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)


def torchvision_to_detectron2_names(state: abc.Mapping) -> Dict[str, torch.Tensor]:
    """A torchvision ResNet state dict renamed as Detectron2's ResNet names its tensors.

    ``conv1``/``bn1`` → ``stem.conv1``/``stem.conv1.norm``; ``layer{i}.{j}.conv{k}``/``bn{k}`` →
    ``res{i+1}.{j}.conv{k}``/``conv{k}.norm``; ``downsample.0``/``.1`` → ``shortcut``/
    ``shortcut.norm``. The classifier (``fc``) and BN's ``num_batches_tracked`` are dropped. The
    names carry no ``backbone.bottom_up.`` prefix: Detectron2's matching heuristics place them.
    """
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        name = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", key)
        name = re.sub(r"^conv1\.", "stem.conv1.", name)
        name = re.sub(r"^bn1\.", "stem.conv1.norm.", name)
        name = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", name)
        name = name.replace(".downsample.0.", ".shortcut.")
        name = name.replace(".downsample.1.", ".shortcut.norm.")
        renamed[name] = value
    return renamed


def _is_torchvision_resnet(state: abc.Mapping) -> bool:
    return ("conv1.weight" in state and "bn1.running_var" in state
            and any(key.startswith("layer1.") for key in state))


class _BNCheckpointLoader(DetectionCheckpointer):
    """Detectron2's checkpointer, also reading torchvision ResNets, that keeps what it found.

    Attributes (after `load`):
        source_format: "detectron2", "caffe2" or "torchvision".
        source_keys: the tensor names in the file (torchvision's renamed).
        incompatible: fvcore's missing keys, unexpected keys and incorrect shapes of the load.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.source_format: str | None = None
        self.source_keys: Set[str] = set()
        self.incompatible = None

    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        weights = loaded["model"]
        if loaded.get("__author__") == "Caffe2":
            self.source_format = "caffe2"
            group_norms = sorted(key for key in weights if "_gn_" in key)
            if group_norms:
                raise ValueError(f"{filename} holds GroupNorm layers ({group_norms[0]}, ...), "
                                 "which have no running statistics to convert; expected a BN "
                                 "checkpoint")
        elif _is_torchvision_resnet(weights):
            self.source_format = "torchvision"
            loaded = {"model": torchvision_to_detectron2_names(weights),
                      "matching_heuristics": True}
        else:
            self.source_format = "detectron2"
            # FrozenBatchNorm2d keeps no batch counter: dropped here rather than reported unused.
            for key in [key for key in weights if key.endswith("num_batches_tracked")]:
                del weights[key]
        self.source_keys = set(loaded["model"])
        return loaded

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _build_models(cfg: CfgNode | abc.MutableMapping):
    """(the MABN model of `cfg`, its BN twin), on the CPU."""
    if isinstance(cfg, CfgNode):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        return build_model(cfg), build_model(stock_inference_config(cfg))
    return instantiate(cfg.model), instantiate(stock_lazy_config(cfg).model)


def _loaded_keys(twin: nn.Module, loader: _BNCheckpointLoader, source: str) -> Set[str]:
    """The twin's tensors that the checkpoint provided; refuses wrong shapes, a partial ResNet."""
    incompatible = loader.incompatible
    if incompatible.incorrect_shapes:
        shapes = "; ".join(f"{key}: {tuple(ckpt)} in the checkpoint, {tuple(model)} in the model"
                           for key, ckpt, model in incompatible.incorrect_shapes)
        raise ValueError(f"{source} does not fit the config's model: {shapes}")
    loaded = set(twin.state_dict()) - set(incompatible.missing_keys)
    for name, m in twin.named_modules():
        # Detectron2's FrozenBatchNorm2d fills absent running statistics (0 and 1) whenever the
        # checkpoint is unversioned: they come from the checkpoint only with the norm's affine.
        if isinstance(m, FrozenBatchNorm2d) and f"{name}.weight" not in loaded:
            loaded -= {f"{name}.running_mean", f"{name}.running_var"}
    resnet = [f"{name}.{key}" for name, m in twin.named_modules() if isinstance(m, CNNBlockBase)
              for key in m.state_dict()]
    absent = [key for key in resnet if key not in loaded]
    if absent:
        unused = sorted(incompatible.unexpected_keys)
        raise ValueError(
            f"{source} holds no tensor (or one of another shape) for {len(absent)} of the "
            f"{len(resnet)} tensors of the config's ResNet, e.g. {absent[0]}; the config must "
            f"describe the checkpoint's ResNet (depth, widths). Unused checkpoint tensors: "
            f"{unused[:5]}{' ...' if len(unused) > 5 else ''}")
    return loaded


def _check_torchvision_conventions(twin: nn.Module) -> None:
    """torchvision's Bottleneck strides in its 3×3 conv; its inputs are RGB, normalised."""
    strided_1x1 = [name for name, m in twin.named_modules()
                   if isinstance(m, BottleneckBlock) and m.conv1.stride != (1, 1)]
    if strided_1x1:
        raise ValueError(
            f"torchvision's ResNets stride in the 3x3 conv, but the config strides in the 1x1 conv "
            f"({strided_1x1[0]}.conv1): set MODEL.RESNETS.STRIDE_IN_1X1 False (LazyConfig: "
            "model.backbone.bottom_up.stages.stride_in_1x1=False), got True")
    pixel_std = tuple(twin.pixel_std.flatten().tolist())
    if (getattr(twin, "input_format", None) != "RGB"
            or not torch.allclose(torch.tensor(pixel_std), torch.tensor(_TORCHVISION_PIXEL_STD))):
        logger.warning(
            "torchvision's ResNets were trained on RGB inputs normalised by mean "
            "[123.675, 116.28, 103.53] and std [58.395, 57.12, 57.375]; the config has format "
            f"{getattr(twin, 'input_format', None)!r} and std {list(pixel_std)}. The conversion is "
            "exact either way, but fine-tune with INPUT.FORMAT RGB and those MODEL.PIXEL_MEAN/STD")


@torch.no_grad()
def _convert_pair(conv: Conv2d, bn_conv: Conv2d, fade_iters: int, centre_filters: bool) -> None:
    """The model's conv → MABN2d from the twin's bn_conv → FrozenBatchNorm2d (module docstring)."""
    bn, mabn = bn_conv.norm, conv.norm
    var = bn.running_var.double()
    conv.weight.copy_(bn_conv.weight)
    mabn.weight.copy_(bn.weight)
    mabn.running_var.copy_(var + (bn.eps - mabn.eps))
    if isinstance(conv, CentredConv2d) and not centre_filters:
        mabn.bias.copy_(bn.bias)
        offset = PretrainedOffset(conv.out_channels)
        offset.fill_(bn_conv.weight.mean(dim=(1, 2, 3), keepdim=True), -bn.running_mean,
                     fade_iters)
        conv.add_module("pretrained_offset", offset)
    else:
        # γ(z − μ)/σ + β = γz/σ + (β − γμ/σ): exact for an uncentred conv (MODEL.MABN.CENTRED_CONV
        # False); with centre_filters only the centring then changes the function.
        mabn.bias.copy_(bn.bias - bn.weight.double() * bn.running_mean / torch.sqrt(var + bn.eps))


def _mabn_pairs(model: nn.Module) -> Iterable[tuple[str, Conv2d]]:
    for name, m in model.named_modules():
        if isinstance(m, Conv2d) and isinstance(m.norm, MABN2d):
            yield name, m


@torch.no_grad()
def convert_bn_checkpoint(cfg: CfgNode | abc.MutableMapping, source: str, *,
                          fade_iters: int = DEFAULT_FADE_ITERS,
                          centre_filters: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict, for ``torch.save({"model": ...})``, of `source` converted for `cfg`'s model.

    Args:
        cfg: the MABN config the checkpoint is for: a YAML config with `cfg.MODEL.MABN`, or a
            LazyConfig (an omegaconf DictConfig).
        source: a path or URL that Detectron2's checkpointer reads: a Detectron2 ``.pth``, an
            MSRA/Caffe2 ``.pkl``, or a torchvision ResNet state dict.
        fade_iters: training forwards over which each conv's `PretrainedOffset` fades to zero.
        centre_filters: no offsets, the filters centred from the start (the authors' approach;
            not exact, see the module docstring).

    Returns:
        Every tensor that `source` determines, named as `cfg`'s model names them; the
        `PretrainedOffset` buffers of each converted CentredConv2d included.

    Raises:
        ValueError: naming the checkpoint tensor or model module that does not fit: a wrong shape,
            a ResNet tensor missing, a conv whose norm is only partly in the checkpoint, a norm
            without running statistics (GroupNorm), a tensor with no counterpart in the MABN
            model, or (torchvision) STRIDE_IN_1X1 True.
    """
    model, twin = _build_models(cfg)
    loader = _BNCheckpointLoader(twin)
    loader.load(source)
    loaded = _loaded_keys(twin, loader, source)
    if loader.source_format == "torchvision":
        _check_torchvision_conventions(twin)

    twin_modules = dict(twin.named_modules())
    written, consumed = set(), set()
    for name, conv in _mabn_pairs(model):
        keys = {f"{name}.{key}" for key in _PAIR_KEYS}
        if not keys & loaded:
            continue
        if not keys <= loaded:
            raise ValueError(f"{source} holds only part of conv {name} and its norm: "
                             f"{sorted(keys & loaded)}; missing {sorted(keys - loaded)}")
        if (loader.source_format == "detectron2"
                and f"{name}.norm.running_var" not in loader.source_keys):
            raise ValueError(f"{source} has no running statistics for {name}.norm (a GroupNorm or "
                             "another norm without them?); expected BN, SyncBN or FrozenBN")
        _convert_pair(conv, twin_modules[name], fade_iters, centre_filters)
        consumed |= keys
        written |= {f"{name}.{key}" for key in conv.state_dict()}  # weight, MABN2d, offset

    model_state, twin_state = model.state_dict(), twin.state_dict()
    for key in sorted(loaded - consumed):
        if key not in model_state or model_state[key].shape != twin_state[key].shape:
            raise ValueError(f"{source}: {key} has no counterpart in the config's MABN model (no "
                             "conversion exists for the layer it belongs to)")
        model_state[key].copy_(twin_state[key])
        written.add(key)

    offsets = sum("pretrained_offset" in conv._modules for _, conv in _mabn_pairs(model))
    how = ("with their filters centred from the start (not exact)" if centre_filters else
           f"exactly, {offsets} with an offset fading over {fade_iters} training forwards")
    logger.info(
        f"Converted {len(consumed) // len(_PAIR_KEYS)} conv → BN pairs to conv → MABN {how}, and "
        f"copied {len(loaded - consumed)} other tensors, from {source} ({loader.source_format} "
        f"format); {len(model_state) - len(written)} of the model's {len(model_state)} tensors "
        "are not in the checkpoint (the fine-tuning run initialises them)")
    return {key: value for key, value in model.state_dict().items() if key in written}
