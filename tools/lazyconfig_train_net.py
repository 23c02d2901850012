#!/usr/bin/env python
"""Train or evaluate a model described by a Detectron2 LazyConfig (Python) config, MABN or not.

Same arguments as Detectron2's tools/lazyconfig_train_net.py (overrides as key=value), with the
features of tools/train_net.py: gradient accumulation, exact resume, MABN diagnostics, MABN weight
decay, PreciseBN for MABN and COCO evaluation (see mabn_det.engine.LazyTrainer for the keys).

    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file configs/lazy/mask_rcnn_R_50_FPN_100ep_LSJ_mabn.py
    python tools/lazyconfig_train_net.py --config-file ... --eval-only \
        train.init_checkpoint=output/model_final.pth
"""
import argparse

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.engine.defaults import create_ddp_model

from mabn_det.engine import LazyTrainer, update_mabn_stats


def do_test(cfg, model):
    """Evaluate `model` with ``dataloader.test`` and ``dataloader.evaluator``."""
    return LazyTrainer.test(cfg, model)


def do_train(args: argparse.Namespace, cfg):
    """Train `cfg.model` as `cfg` describes, resuming with --resume; returns the last results."""
    trainer = LazyTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(args: argparse.Namespace):
    """Train (or with --eval-only, evaluate) as described by `args`; runs once per process."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = create_ddp_model(LazyTrainer.build_model(cfg))
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        precise = cfg.train.get("precise_bn", {})
        if precise.get("enabled", False):
            # Re-estimate the MABN statistics of the checkpoint on training batches first.
            update_mabn_stats(model, LazyTrainer.build_precise_bn_loader(cfg), precise.num_iter)
        return do_test(cfg, model)
    return do_train(args, cfg)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
