#!/usr/bin/env python
"""Train or evaluate a Detectron2 model whose configs may use NORM: "MABN".

Same arguments as Detectron2's tools/train_net.py, plus --register-coco NAME JSON IMAGE_DIR:

    python tools/train_net.py --config-file configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml \
        --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    # the same, with MABN's running_var re-estimated over 200 training batches for this evaluation:
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth \
        TEST.PRECISE_BN.ENABLED True TEST.PRECISE_BN.NUM_ITER 200

On a signal of SOLVER.PREEMPTION_SIGNALS (SIGUSR1) training stops after the current step with a
checkpoint, asks SLURM to requeue the job, and exits with status 75; --resume continues it.
"""
import argparse
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from mabn_det.config import load_config
from mabn_det.engine import MissingDatasetError, Trainer, check_datasets_on_disk
from mabn_det.engine.checkpointing import launch_preemptible, listen_for_preemption


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
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mabn_det")
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
        results = Trainer.test(cfg, model)  # with TEST.PRECISE_BN: re-estimated for this test
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    listen_for_preemption(Trainer.preemption_signals(cfg))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main(main_func=main) -> None:
    """Run `main_func` (`main`; tests pass it with a seam) in the processes the command line asks
    for, after checking that the datasets are on disk; exit with status 75 when training stopped
    for preemption."""
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    cfg = load_config(args.config_file, args.opts)
    # --eval-only reads training images only for PreciseBN.
    reads_train = not args.eval_only or cfg.TEST.PRECISE_BN.ENABLED
    try:
        check_datasets_on_disk([*(cfg.DATASETS.TRAIN if reads_train else ()), *cfg.DATASETS.TEST])
    except MissingDatasetError as e:
        raise SystemExit(str(e))
    launch_preemptible(main_func, () if args.eval_only else Trainer.preemption_signals(cfg),
                       args.num_gpus, num_machines=args.num_machines,
                       machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
