"""The Trainer behind tools/train_net.py (and the demo and norm study beside the package)."""
import contextlib
import logging
import os
import random
import time
import weakref
from typing import Any, Dict, List, NamedTuple, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..config import check_mabn_config
from ..layers import MABN2d
from ..solver import build_mabn_optimizer
from .hooks import MABNDiagnostics, PreciseMABN
from .sampler import ResumableTrainingSampler

__all__ = ["GradientAccumulationTrainer", "Trainer", "TrainingSettings", "resumable_sampler"]


class GradientAccumulationTrainer(SimpleTrainer):
    """One optimizer step over the summed gradients of several micro-batches.

    This is how one process reproduces k GPUs that normalise their own small batches without
    synchronisation: each micro-batch is normalised on its own, the update uses all of them.
    Losses are averaged over the micro-batches; DDP all-reduces only on the last one.
    """

    def __init__(self, model, data_loader, optimizer, accumulation_steps: int):
        super().__init__(model, data_loader, optimizer)
        self.accumulation_steps = accumulation_steps

    def run_step(self):
        assert self.model.training, "[GradientAccumulationTrainer] model was changed to eval mode!"
        self.optimizer.zero_grad()
        steps = self.accumulation_steps
        data_time, mean_losses = 0.0, {}
        for micro_step in range(steps):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            defer_sync = micro_step < steps - 1 and isinstance(self.model, DistributedDataParallel)
            with self.model.no_sync() if defer_sync else contextlib.nullcontext():
                loss_dict = self.model(data)
                (sum(loss_dict.values()) / steps).backward()
            for name, value in loss_dict.items():
                mean_losses[name] = mean_losses.get(name, 0.0) + value.detach() / steps
        self.after_backward()
        self._write_metrics(mean_losses, data_time)
        self.optimizer.step()


class TrainingSettings(NamedTuple):
    """What the Trainer reads from a config besides the model, optimizer, data and schedule."""

    output_dir: str
    weights: str  # loaded when not resuming; "" for none
    max_iter: int
    accumulation_steps: int  # micro-batches per optimizer step
    amp: bool
    ddp: Dict[str, Any]  # create_ddp_model keyword arguments
    log_period: int  # MABN diagnostics; 0 for none
    seed: int | None


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer, made for MABN models trained from scratch.

    On top of DefaultTrainer it: checks the MABN config before building anything; gives MABN2d
    parameters the norm weight decay; accumulates gradients over `SOLVER.GRAD_ACCUMULATION_STEPS`
    micro-batches; logs MABN diagnostics every `MODEL.MABN.LOG_PERIOD` iterations; evaluates with
    COCO AP (boxes, and masks when MASK_ON); re-estimates MABN's inference statistics before each
    evaluation with `TEST.PRECISE_BN` (see `PreciseMABN`); and resumes exactly where it stopped: the
    data stream restarts at the right image and (on rank 0) the random generators are checkpointed.
    Resume is bit-exact with `DATALOADER.NUM_WORKERS 0` and a fixed `SEED`; with loader workers their
    augmentation randomness restarts.

    A subclass for another kind of config (`LazyTrainer`) overrides `training_settings` and the
    ``build_*`` methods.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except that DDP gets no device_ids on CPU (gloo), and that the
        # inner loop accumulates gradients when asked to.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        settings = self.training_settings(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_gpu = next(model.parameters()).device.type == "cuda"
        model = create_ddp_model(model, **settings.ddp,
                                 device_ids=[comm.get_local_rank()] if on_gpu else None)
        if settings.accumulation_steps > 1:
            self._trainer = GradientAccumulationTrainer(model, data_loader, optimizer,
                                                        settings.accumulation_steps)
        else:
            self._trainer = (AMPTrainer if settings.amp else SimpleTrainer)(
                model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, settings.output_dir,
                                                  trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = settings.max_iter
        self.cfg = cfg
        self.settings = settings
        self._pending_rng_state: dict | None = None
        self.register_hooks(self.build_hooks())

    @classmethod
    def training_settings(cls, cfg: CfgNode) -> TrainingSettings:
        """The settings that `cfg` (a YAML config with `cfg.MODEL.MABN`) gives the Trainer."""
        return TrainingSettings(
            output_dir=cfg.OUTPUT_DIR, weights=cfg.MODEL.WEIGHTS, max_iter=cfg.SOLVER.MAX_ITER,
            accumulation_steps=cfg.SOLVER.GRAD_ACCUMULATION_STEPS, amp=cfg.SOLVER.AMP.ENABLED,
            ddp=dict(broadcast_buffers=False), log_period=cfg.MODEL.MABN.LOG_PERIOD,
            seed=cfg.SEED if cfg.SEED >= 0 else None)

    @classmethod
    def build_model(cls, cfg):
        check_mabn_config(cfg)
        return super().build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_mabn_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        """Micro-batches of IMS_PER_BATCH / GRAD_ACCUMULATION_STEPS images (all GPUs together),
        starting at iteration `start_iter` of the data stream."""
        micro_cfg = cfg.clone()
        micro_cfg.defrost()
        micro_cfg.SOLVER.IMS_PER_BATCH //= cfg.SOLVER.GRAD_ACCUMULATION_STEPS
        kwargs = build_detection_train_loader.from_config(micro_cfg)
        if cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler":
            kwargs["sampler"] = resumable_sampler(len(kwargs["dataset"]), cfg.SOLVER.IMS_PER_BATCH,
                                                  cls.training_settings(cfg).seed, start_iter)
        return build_detection_train_loader(**kwargs)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)

    @classmethod
    def build_precise_bn_loader(cls, cfg: CfgNode):
        """Training batches for PreciseBN: a loader of its own without workers, as DefaultTrainer
        builds for its PreciseBN."""
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0
        return cls.build_train_loader(cfg)

    def build_hooks(self):
        precise = self.cfg.TEST.PRECISE_BN
        return self.with_mabn_hooks(
            super().build_hooks(),
            (self.cfg.TEST.EVAL_PERIOD, precise.NUM_ITER) if precise.ENABLED else None)

    def with_mabn_hooks(self, ret: List[hooks.HookBase], precise_bn: Tuple[int, int] | None):
        """`ret` with the MABN diagnostics before the PeriodicWriter (each report is then written in
        the same iteration) and, for `precise_bn` = (period, batches) and a model with MABN2d,
        `PreciseMABN` after the LRScheduler (before checkpointing and evaluation, where Detectron2
        puts its PreciseBN)."""
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        if not any(isinstance(m, MABN2d) for m in model.modules()):
            return ret
        if self.settings.log_period:
            diagnostics = MABNDiagnostics(model, self.settings.log_period,
                                          fail_on_nonfinite=not self.settings.amp)
            writer_at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)),
                             len(ret))
            ret.insert(writer_at, diagnostics)
        if precise_bn is not None:
            period, num_iter = precise_bn
            scheduler_at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler))
            ret.insert(scheduler_at + 1, PreciseMABN(
                period, model, self.build_precise_bn_loader(self.cfg), num_iter))
        return ret

    def train(self):
        """Train; returns the last evaluation results (as DefaultTrainer documents), or None."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    def resume_or_load(self, resume=True):
        """Resume from the last checkpoint in the output directory if `resume` and there is one (the
        data stream and random generators included), else load the settings' weights."""
        self.checkpointer.resume_or_load(self.settings.weights, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            # The checkpoint holds the iteration that just finished.
            self.start_iter = self.iter + 1
        rng_state, self._pending_rng_state = self._pending_rng_state, None
        if self.start_iter > 0:
            def resumed_loader():
                loader = self.build_train_loader(self.cfg, start_iter=self.start_iter)
                return loader if rng_state is None else _ResumedDataStream(loader, rng_state)
            self._trainer.reset_data_loader(resumed_loader)
        if rng_state is not None:
            _set_rng_state(rng_state)

    def state_dict(self):
        ret = super().state_dict()
        ret["rng"] = _get_rng_state()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Other ranks keep their own, differently seeded generators.
        if "rng" in state_dict and comm.is_main_process():
            self._pending_rng_state = state_dict["rng"]


def resumable_sampler(dataset_size: int, images_per_step: int, seed: int | None,
                      start_iter: int) -> ResumableTrainingSampler:
    """The training sampler of this process, positioned at optimizer step `start_iter`.

    Args:
        images_per_step: images per optimizer step, all processes together.
    """
    per_rank_images = images_per_step // comm.get_world_size()
    return ResumableTrainingSampler(dataset_size, seed=seed, start=start_iter * per_rank_images)


class _ResumedDataStream:
    """Iterates `loader` and sets torch's generator to the checkpointed state once the first batch
    is fetched: starting a DataLoader draws from that generator, which the uninterrupted run did at
    iteration 0, long before the checkpoint. (Batches use only numpy's generator, restored earlier.)
    """

    def __init__(self, loader, rng_state: dict):
        self._loader = loader
        self._rng_state = rng_state

    def __iter__(self):
        iterator = iter(self._loader)
        first = next(iterator)
        torch.set_rng_state(self._rng_state["torch"])
        yield first
        yield from iterator


def _get_rng_state() -> dict:
    """The generators' states in types that `torch.load(weights_only=True)` accepts."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
