"""Command-line set-up and entry point behind tools/train_net.py."""
import argparse
import os

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from ..config import add_mabn_config
from .trainer import Trainer

__all__ = ["argument_parser", "setup", "main"]


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's arguments plus ``--register-coco NAME JSON IMAGE_DIR`` (repeatable)."""
    parser = default_argument_parser()
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[],
        metavar=("NAME", "JSON", "IMAGE_DIR"),
        help="register a COCO-format dataset under NAME, to be named in DATASETS.TRAIN/TEST",
    )
    return parser


def setup(args: argparse.Namespace) -> CfgNode:
    """A frozen config from the defaults, MODEL.MABN, the config file and KEY VALUE overrides."""
    for name, json_file, image_dir in args.register_coco:
        register_coco_instances(name, {}, json_file, image_dir)
    cfg = get_cfg()
    add_mabn_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args: argparse.Namespace):
    """Train (or with --eval-only, evaluate) as described by `args`; runs once per process."""
    cfg = setup(args)
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
        # Processes sharing the CPU would otherwise each start a thread per core and stall.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
