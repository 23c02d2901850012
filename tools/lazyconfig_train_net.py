#!/usr/bin/env python
"""Train or evaluate a model described by a Detectron2 LazyConfig (Python) config, MABN or not.

Detectron2's tools/lazyconfig_train_net.py (same arguments, overrides as key=value), with the
features of tools/train_net.py: gradient accumulation, exact resume, MABN diagnostics, MABN weight
decay, MABN statistics averaged over processes before checkpoints and evaluations, and PreciseBN
for MABN at evaluation (see mabn_det.engine.lazy_training for the ``train`` keys). With
``train.device="cpu"`` the model trains in several processes too (DDP without device_ids). On a
signal of ``train.preemption_signals`` (SIGUSR1) training stops after the current step with a
checkpoint, asks SLURM to requeue the job, and exits with status 75; --resume continues it.

    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file configs/lazy/mask_rcnn_R_50_FPN_100ep_LSJ_mabn.py
    python tools/lazyconfig_train_net.py --config-file ... --eval-only \
        train.init_checkpoint=output/model_final.pth
"""
import argparse
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (AMPTrainer, SimpleTrainer, default_argument_parser, default_setup,
                               default_writers, hooks)
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from mabn_det.engine import (GradientAccumulationTrainer, MissingDatasetError, ProcessStates,
                             check_datasets_on_disk)
from mabn_det.engine.checkpointing import (RotatingCheckpointer, launch_preemptible,
                                           listen_for_preemption)
from mabn_det.engine.lazy_training import (accumulation_steps, build_lazy_model,
                                           build_lazy_optimizer, build_lazy_train_loader,
                                           check_lazy_training, evaluate_lazy, mabn_log_period,
                                           preemption_signals)
from mabn_det.engine.sampler import shared_data_seed
from mabn_det.engine.trainer import unwrap, with_mabn_hooks


def do_test(cfg, model, seed: int = -1):
    """Evaluate `model` with ``dataloader.test`` and ``dataloader.evaluator``; PreciseBN for MABN
    (``train.precise_bn``) draws its batches from the data stream of `seed` (< 0: a random one)."""
    return evaluate_lazy(cfg, model, shared_data_seed(seed))


def ddp_model(cfg, model):
    """`model` in DDP with ``train.ddp``'s arguments when there are several processes; a CPU model
    gets no device_ids (which DDP refuses for it) unless ``train.ddp`` names them."""
    ddp = dict(cfg.train.ddp)
    if cfg.train.device == "cpu":
        ddp.setdefault("device_ids", None)
    return create_ddp_model(model, **ddp)


def do_train(args: argparse.Namespace, cfg):
    """Train as `cfg` describes, resuming with --resume; returns the last evaluation results."""
    check_lazy_training(cfg)
    steps = accumulation_steps(cfg)
    model = build_lazy_model(cfg)
    optimizer = build_lazy_optimizer(cfg, model)
    seed = shared_data_seed(cfg.train.get("seed", -1))
    train_loader = build_lazy_train_loader(cfg, seed)

    model = ddp_model(cfg, model)
    if steps > 1:
        trainer = GradientAccumulationTrainer(model, train_loader, optimizer, steps)
    else:
        trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
            model, train_loader, optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    process_states = ProcessStates(
        unwrap(model), (cfg.train.checkpointer.period, cfg.train.eval_period), seed)
    last_results = {}

    def test_and_keep_results():
        last_results.update(do_test(cfg, model, process_states.data_seed))
        return last_results

    trainer.register_hooks(with_mabn_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        RotatingCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep_results),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ], process_states, unwrap(model), mabn_log_period(cfg),
        amp=cfg.train.amp.enabled, checkpointer=checkpointer,
        preemption_signals=preemption_signals(cfg)))

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if start_iter > 0:
        # The checkpoint's data order, from the position after its iteration.
        trainer.reset_data_loader(
            lambda: build_lazy_train_loader(cfg, process_states.data_seed, start_iter))
    trainer.train(start_iter, cfg.train.max_iter)
    return last_results or None


def main(args: argparse.Namespace):
    """Train (or with --eval-only, evaluate) as described by `args`; runs once per process."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="mabn_det")
    if cfg.train.device == "cpu" and comm.get_local_size() > 1:
        # Processes sharing the CPU would otherwise each start a thread per core and stall.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    if args.eval_only:
        model = ddp_model(cfg, build_lazy_model(cfg))
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model, cfg.train.get("seed", -1))
    listen_for_preemption(preemption_signals(cfg))
    return do_train(args, cfg)


def dataset_names(cfg, eval_only: bool):
    """The dataset names a run reads: ``dataloader.test``'s, and ``dataloader.train``'s unless
    it only evaluates without PreciseBN."""
    precise = cfg.train.get("precise_bn", {}).get("enabled", False)
    names = []
    for split in ("train", "test") if precise or not eval_only else ("test",):
        node = cfg.dataloader.get(split, {}).get("dataset", {}).get("names", [])
        names += [node] if isinstance(node, str) else list(node)
    return names


def invoke_main() -> None:
    """Run `main` in the processes the command line asks for, after checking that the datasets
    are on disk; exit with status 75 when training stopped for preemption."""
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    try:
        check_datasets_on_disk(dataset_names(cfg, args.eval_only))
    except MissingDatasetError as e:
        raise SystemExit(str(e))
    launch_preemptible(main, () if args.eval_only else preemption_signals(cfg), args.num_gpus,
                       num_machines=args.num_machines, machine_rank=args.machine_rank,
                       dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
