"""Export a trained MABN model for stock Detectron2 (no mabn_det needed to run it)."""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from .config import stock_inference_config
from .layers import convert_to_inference_form

__all__ = ["export_for_stock_detectron2"]


def export_for_stock_detectron2(cfg: CfgNode, weights: str, output_dir: str) -> str:
    """Write `output_dir/model_final.pth` and `output_dir/config.yaml` for stock Detectron2.

    The weights are the inference form of `weights` (MABN2d → FrozenBatchNorm2d with running_mean 0,
    weight-centred convs → plain convs holding centred weights); the config builds the same
    architecture with NORM "FrozenBN" and points MODEL.WEIGHTS at the new weights.

    Args:
        cfg: the training config (with `cfg.MODEL.MABN`).
        weights: a checkpoint of a model built from `cfg`.
        output_dir: created if missing.

    Returns:
        The path of the written config.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    convert_to_inference_form(model, inplace=True)

    os.makedirs(output_dir, exist_ok=True)
    weights_out = os.path.join(output_dir, "model_final.pth")
    torch.save({"model": model.state_dict()}, weights_out)
    stock = stock_inference_config(cfg)
    stock.MODEL.WEIGHTS = os.path.abspath(weights_out)
    config_out = os.path.join(output_dir, "config.yaml")
    with open(config_out, "w") as f:
        f.write(stock.dump())
    return config_out
