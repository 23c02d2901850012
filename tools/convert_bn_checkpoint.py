#!/usr/bin/env python
"""Convert a BatchNorm checkpoint for a model with NORM "MABN", computing the same function.

    python tools/convert_bn_checkpoint.py --config-file MABN_CONFIG --input BN_CHECKPOINT \
        --output OUT.pth [--fade-iters N | --centre-filters] [KEY VALUE ... | key=value ...]

BN_CHECKPOINT: a Detectron2 checkpoint (.pth, BN/SyncBN/FrozenBN), an MSRA/Caffe2 .pkl such as
Detectron2's ImageNetPretrained/MSRA/R-50.pkl, or a torchvision ResNet state dict. MABN_CONFIG is
a YAML config (overrides as KEY VALUE) or a LazyConfig (overrides as key=value). Fine-tune with the
same config and MODEL.WEIGHTS OUT.pth (LazyConfig: train.init_checkpoint=OUT.pth); see
docs/pretrained.md.
"""
import argparse
import os

import torch
from detectron2.config import LazyConfig
from detectron2.utils.logger import setup_logger

from mabn_det.bn_checkpoint import DEFAULT_FADE_ITERS, convert_bn_checkpoint
from mabn_det.config import load_config
from mabn_det.lazy import is_lazy_config


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="MABN_CONFIG")
    parser.add_argument("--input", required=True, metavar="BN_CHECKPOINT",
                        help="path or URL of the BN checkpoint")
    parser.add_argument("--output", required=True, metavar="OUT.pth")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fade-iters", type=int, default=DEFAULT_FADE_ITERS, metavar="N",
                      help="training forwards over which the filter means and BN means that keep "
                           f"the conversion exact fade to zero (default {DEFAULT_FADE_ITERS})")
    mode.add_argument("--centre-filters", action="store_true",
                      help="centre the loaded filters from the start, as the MABN authors did: "
                           "NOT exact (the experiment arm of their failure mode)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides: KEY VALUE pairs (YAML) or key=value (LazyConfig)")
    return parser


def main(args: argparse.Namespace) -> str:
    """Write the converted checkpoint; returns its path."""
    setup_logger(name="mabn_det")
    setup_logger(name="detectron2")
    if is_lazy_config(args.config_file):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    else:
        cfg = load_config(args.config_file, args.opts)
    state = convert_bn_checkpoint(cfg, args.input, fade_iters=args.fade_iters,
                                  centre_filters=args.centre_filters)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": state}, args.output)
    return args.output


if __name__ == "__main__":
    print("Wrote", main(argument_parser().parse_args()))
