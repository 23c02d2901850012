"""Export a trained MABN model for stock Detectron2 (no mabn_det needed to run it)."""
import os
from collections import abc

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.modeling import build_model

from .layers import convert_to_inference_form
from .lazy import stock_lazy_config
from .modeling import stock_inference_config

__all__ = ["export_for_stock_detectron2"]


def export_for_stock_detectron2(cfg: CfgNode | abc.MutableMapping, weights: str,
                                output_dir: str) -> str:
    """Write `output_dir/model_final.pth` and `output_dir/config.yaml` for stock Detectron2.

    The weights are the inference form of `weights` (MABN2d → FrozenBatchNorm2d with running_mean 0,
    weight-centred convs → plain convs holding centred weights); the config builds the same
    architecture with the norm "FrozenBN" and loads the new weights: MODEL.WEIGHTS of a YAML config
    (`stock_inference_config`), ``train.init_checkpoint`` of a LazyConfig, saved as YAML by
    `LazyConfig.save` (`mabn_det.lazy.stock_lazy_config`).

    Args:
        cfg: the training config: a YAML config with `cfg.MODEL.MABN`, or a LazyConfig (an
            omegaconf DictConfig).
        weights: a checkpoint of a model built from `cfg`.
        output_dir: created if missing.

    Returns:
        The path of the written config.
    """
    if isinstance(cfg, CfgNode):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
    else:
        model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(weights)
    convert_to_inference_form(model, inplace=True)

    os.makedirs(output_dir, exist_ok=True)
    weights_out = os.path.abspath(os.path.join(output_dir, "model_final.pth"))
    torch.save({"model": model.state_dict()}, weights_out)
    config_out = os.path.join(output_dir, "config.yaml")
    if isinstance(cfg, CfgNode):
        stock = stock_inference_config(cfg)
        stock.MODEL.WEIGHTS = weights_out
        with open(config_out, "w") as f:
            f.write(stock.dump())
    else:
        stock = stock_lazy_config(cfg)
        stock.train.init_checkpoint = weights_out
        LazyConfig.save(stock, config_out)
    return config_out
