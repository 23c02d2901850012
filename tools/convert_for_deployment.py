#!/usr/bin/env python
"""Convert an MABN checkpoint into weights and a config for stock Detectron2.

    python tools/convert_for_deployment.py \
        --config-file configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml \
        --weights output/model_final.pth --output output/deploy
    # then, with any Detectron2 and no mabn_det:
    python detectron2/tools/train_net.py --config-file output/deploy/config.yaml --eval-only

A LazyConfig (.py, or the YAML that LazyConfig.save writes) works the same way; its export is a
LazyConfig saved as YAML, for Detectron2's tools/lazyconfig_train_net.py. Overrides follow the config: KEY VALUE pairs for a YAML config,
key=value for a LazyConfig.
"""
import argparse

from detectron2.config import LazyConfig

from mabn_det.config import load_config
from mabn_det.deploy import export_for_stock_detectron2
from mabn_det.lazy import is_lazy_config


def main(argv=None) -> str:
    """Export as the command line `argv` (default: sys.argv) asks; returns the config written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True,
                        help="the training config: YAML or LazyConfig")
    parser.add_argument("--weights", required=True, help="a checkpoint trained with that config")
    parser.add_argument("--output", required=True,
                        help="directory for model_final.pth and config.yaml")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE (YAML) or key=value (LazyConfig)")
    args = parser.parse_args(argv)
    if is_lazy_config(args.config_file):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    else:
        cfg = load_config(args.config_file, args.opts)
    config = export_for_stock_detectron2(cfg, args.weights, args.output)
    print("wrote", config)
    return config


if __name__ == "__main__":
    main()
