#!/usr/bin/env python
"""The demo behind `make demo`: MABN Mask R-CNN trained from scratch on synthetic shapes.

Generates the shapes set under $DETECTRON2_DATASETS/shapes if it is missing, trains on the GPU when
there is one (else on the CPU), evaluates COCO box and mask AP, and writes output/demo/.
"""
import argparse
import os

from mabn_experiments.demo import run_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs", "tiny", "mabn_R18_FPN_shapes.yaml"))
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    run_demo(args.config_file, args.output, num_train=args.train_images, num_val=args.val_images,
             opts=args.opts)


if __name__ == "__main__":
    main()
