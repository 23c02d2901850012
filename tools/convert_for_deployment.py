#!/usr/bin/env python
"""Convert an MABN checkpoint into weights and a config for stock Detectron2.

    python tools/convert_for_deployment.py --config-file configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml \
        --weights output/model_final.pth --output output/deploy
    # then, with any Detectron2 and no mabn_det:
    python detectron2/tools/train_net.py --config-file output/deploy/config.yaml --eval-only
"""
import argparse

from mabn_det.config import load_config
from mabn_det.deploy import export_for_stock_detectron2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, help="the training config")
    parser.add_argument("--weights", required=True, help="a checkpoint trained with that config")
    parser.add_argument("--output", required=True, help="directory for model_final.pth and config.yaml")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    cfg = load_config(args.config_file, args.opts)
    print("wrote", export_for_stock_detectron2(cfg, args.weights, args.output))


if __name__ == "__main__":
    main()
