#!/usr/bin/env python
"""The demo behind `make demo`: MABN Mask R-CNN trained from scratch on synthetic shapes.

Generates the "demo" shapes style under $DETECTRON2_DATASETS/shapes if it is missing (a second run
reuses it), trains on the GPU when there is one (with the longer GPU schedule) or else on the CPU,
evaluates COCO box and mask AP, and writes output/demo/. Running it again trains again from scratch
and replaces output/demo/; `--eval-only` evaluates and draws the model already there instead.
"""
import argparse
import os

import torch

from mabn_experiments.demo import run_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONFIG = os.path.join(REPO, "configs", "tiny", "demo_mabn_R18_FPN_shapes.yaml")
GPU_CONFIG = os.path.join(REPO, "configs", "tiny", "demo_mabn_R18_FPN_shapes_gpu.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=None,
                        help=f"default: {os.path.relpath(GPU_CONFIG, REPO)} with CUDA, else "
                             f"{os.path.relpath(CPU_CONFIG, REPO)}")
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate and draw OUTPUT/model_final.pth instead of training")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    config_file = args.config_file or (GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG)
    run_demo(config_file, args.output, num_train=args.train_images, num_val=args.val_images,
             eval_only=args.eval_only, opts=args.opts)


if __name__ == "__main__":
    main()
