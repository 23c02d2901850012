"""The Trainer behind tools/train_net.py (and the demo and norm study beside the package)."""
import contextlib
import os
import signal
from typing import List, Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, hooks
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import RESUMABLE_SAMPLER, check_training_config
from ..layers import MABN2d
from ..modeling import check_mabn_config
from ..solver import build_mabn_optimizer
from .checkpointing import PreemptionCheckpointer, RotatingCheckpointer, parse_signals
from .evaluation import build_dataset_evaluator
from .hooks import MABNDiagnostics, precise_mabn_statistics
from .sampler import build_resumable_train_loader, shared_data_seed
from .state import ProcessStates, preserved_rng

__all__ = ["AccumulatedLosses", "GradientAccumulationTrainer", "Trainer", "has_mabn", "unwrap",
           "with_mabn_hooks"]


class GradientAccumulationTrainer(SimpleTrainer):
    """One optimizer step over the summed gradients of several micro-batches.

    This is how one process reproduces k GPUs that normalise their own small batches without
    synchronisation: each micro-batch is normalised on its own, the update uses all of them.
    Losses and gradients are the means over the micro-batches; DDP all-reduces only on the last.

    The step is SimpleTrainer's own (`run_step`: zeroing, metrics, after_backward hooks,
    ``async_write_metrics``), as its comments suggest: the data loader is wrapped to yield the
    k micro-batches of a step together, and the model to take them (`AccumulatedLosses`), with
    the gradients zeroed before the forward. So ``trainer.model`` is that wrapper; `unwrap`
    removes it.

    Args:
        model, data_loader, optimizer: as SimpleTrainer's; `data_loader` yields micro-batches.
        accumulation_steps: micro-batches per optimizer step.
        **kwargs: SimpleTrainer's other arguments, but zero_grad_before_forward.
    """

    def __init__(self, model, data_loader, optimizer, accumulation_steps: int, **kwargs):
        self.accumulation_steps = accumulation_steps
        super().__init__(AccumulatedLosses(model, accumulation_steps),
                         _MicroBatchesOfSteps(data_loader, accumulation_steps), optimizer,
                         zero_grad_before_forward=True, **kwargs)

    def reset_data_loader(self, data_loader_builder):
        """SimpleTrainer's, with the micro-batches of the new loader grouped by step."""
        super().reset_data_loader(
            lambda: _MicroBatchesOfSteps(data_loader_builder(), self.accumulation_steps))


class AccumulatedLosses(nn.Module):
    """In training, `model` on the k micro-batches of one step: each but the last is
    back-propagated here (under DDP's ``no_sync``); the last one's losses are returned for the
    trainer to back-propagate, each plus the others' values as constants. Every returned loss is
    thus the mean over the micro-batches, and so is the gradient once the trainer's backward has
    run (each micro-batch's losses are divided by k). In eval mode it is `model`.

    Args:
        model: a model (or DDP) returning a dict of losses in training.
        steps: micro-batches per step.
    """

    def __init__(self, model: nn.Module, steps: int):
        super().__init__()
        self.module = model
        self.steps = steps

    def forward(self, micro_batches):
        if not self.training:
            return self.module(micro_batches)
        *early, last = micro_batches
        defer_sync = isinstance(self.module, DistributedDataParallel)
        carried = {}
        for batch in early:
            with self.module.no_sync() if defer_sync else contextlib.nullcontext():
                losses = self.module(batch)
                (sum(losses.values()) / self.steps).backward()
            for name, value in losses.items():
                carried[name] = carried.get(name, 0.0) + value.detach() / self.steps
        losses = {name: value / self.steps for name, value in self.module(last).items()}
        return {name: losses.get(name, 0.0) + carried.get(name, 0.0)
                for name in dict.fromkeys([*losses, *carried])}


class _MicroBatchesOfSteps:
    """The batches of `loader` in tuples of `steps` consecutive ones."""

    def __init__(self, loader, steps: int):
        self._loader = loader
        self._steps = steps

    def __iter__(self):
        return zip(*[iter(self._loader)] * self._steps)


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer, made for MABN models trained from scratch.

    On top of DefaultTrainer it: checks the MABN config before building anything; gives MABN2d
    parameters the norm weight decay; accumulates gradients over `SOLVER.GRAD_ACCUMULATION_STEPS`
    micro-batches; logs MABN diagnostics every `MODEL.MABN.LOG_PERIOD` iterations; evaluates with
    the evaluators of the dataset's ``evaluator_type`` (see `build_evaluator`); keeps the last
    `SOLVER.CHECKPOINT_MAX_TO_KEEP` periodic checkpoints in the output directory, those of the runs
    it resumed included (`RotatingCheckpointer`); and, in every process:

    - before every checkpoint and evaluation, averages MABN's running_var over the processes
      (`ProcessStates`: each process keeps training from that mean; its rings and counters stay
      its own), so the saved model and every process's evaluation use one statistic;
    - evaluates with `TEST.PRECISE_BN` statistics when enabled (`precise_mabn_statistics`), which
      serve that evaluation only: checkpoints hold the training state, and training continues
      bit-identically to a run without PreciseBN;
    - resumes where it stopped: with SEED < 0 one data-order seed is drawn for all processes at
      the start and kept in the checkpoint; with `DATALOADER.SAMPLER_TRAIN`
      "ResumableTrainingSampler" (`build_train_loader`) the data stream restarts at the next batch
      with the same augmentations, whatever `DATALOADER.NUM_WORKERS`; and every process gets back
      its own buffers and random-generator states, provided it resumes with as many processes.
      The resumed run then computes what the uninterrupted one would have; its results are
      bit-identical where the kernels are deterministic (CPU; on GPU, cuDNN and Detectron2's
      ROIAlign backward are not). Detectron2's samplers restart their own streams;
    - on one of `SOLVER.PREEMPTION_SIGNALS` (SLURM's ``--signal``), stops after the current step
      with a checkpoint from which ``--resume`` continues exactly, asks SLURM to requeue the job
      and exits with status 75 (`PreemptionCheckpointer`).

    With several processes the model must be on GPUs: Detectron2's DefaultTrainer wraps it in
    DDP with ``device_ids``, which DDP refuses for a CPU model (tools/lazyconfig_train_net.py,
    whose ``train.ddp`` is configurable, trains CPU models in several processes).
    """

    def __init__(self, cfg):
        check_training_config(cfg)
        # The data order's seed, decided before DefaultTrainer builds the loader.
        cfg = _with_seed(cfg, shared_data_seed(cfg.SEED))
        try:
            super().__init__(cfg)
        except ValueError as e:
            if cfg.MODEL.DEVICE != "cpu" or "device_ids" not in str(e):
                raise
            raise ValueError(
                f"Trainer cannot train MODEL.DEVICE 'cpu' in {comm.get_world_size()} processes: "
                "Detectron2's DefaultTrainer gives DistributedDataParallel device_ids, which it "
                "refuses for CPU models; use GPUs, one process, or tools/lazyconfig_train_net.py "
                "with train.ddp.device_ids=None") from e
        steps = cfg.SOLVER.GRAD_ACCUMULATION_STEPS
        if steps > 1:
            inner = self._trainer
            self._trainer = GradientAccumulationTrainer(
                inner.model, inner.data_loader, inner.optimizer, steps,
                gather_metric_period=inner.gather_metric_period,
                async_write_metrics=inner.async_write_metrics)

    @classmethod
    def build_model(cls, cfg):
        check_mabn_config(cfg)
        return super().build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_mabn_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        """Micro-batches of IMS_PER_BATCH / GRAD_ACCUMULATION_STEPS images (all GPUs together).

        With `DATALOADER.SAMPLER_TRAIN` "ResumableTrainingSampler" they come from the resumable
        stream (`build_resumable_train_loader`) whose order `cfg.SEED` decides (a negative SEED
        draws one), from iteration `start_iter` on; any other name is Detectron2's sampler, whose
        stream a resume restarts (`start_iter` is ignored).
        """
        micro_cfg = cfg.clone()
        micro_cfg.defrost()
        micro_cfg.SOLVER.IMS_PER_BATCH //= cfg.SOLVER.GRAD_ACCUMULATION_STEPS
        if cfg.DATALOADER.SAMPLER_TRAIN != RESUMABLE_SAMPLER:
            return build_detection_train_loader(micro_cfg)
        # Detectron2's arguments for everything but the sampler, which it cannot build by our
        # name: the name stands in for it.
        kwargs = build_detection_train_loader.from_config(micro_cfg, sampler=RESUMABLE_SAMPLER)
        del kwargs["sampler"]
        return build_resumable_train_loader(
            **kwargs, seed=shared_data_seed(cfg.SEED),
            start_batch=start_iter * cfg.SOLVER.GRAD_ACCUMULATION_STEPS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """`build_dataset_evaluator`, scoring boxes and, with MODEL.MASK_ON and
        MODEL.KEYPOINT_ON, masks and keypoints: every evaluation reports each (NaN when nothing
        was predicted)."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", *(("segm",) if cfg.MODEL.MASK_ON else ()),
                 *(("keypoints",) if cfg.MODEL.KEYPOINT_ON else ()))
        return build_dataset_evaluator(dataset_name, output_folder, tasks)

    @classmethod
    def build_precise_bn_loader(cls, cfg: CfgNode):
        """Training batches for PreciseBN: a loader of its own without workers, as DefaultTrainer
        builds for its PreciseBN."""
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0
        return cls.build_train_loader(cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test, with MABN's running_var re-estimated first when
        `TEST.PRECISE_BN.ENABLED` (restored afterwards), and taking nothing from the random
        generators."""
        precise = cfg.TEST.PRECISE_BN
        with preserved_rng(), contextlib.ExitStack() as statistics:
            if precise.ENABLED and has_mabn(model):
                statistics.enter_context(precise_mabn_statistics(
                    unwrap(model), cls.build_precise_bn_loader(cfg), precise.NUM_ITER))
            return super().test(cfg, model, evaluators)

    @classmethod
    def preemption_signals(cls, cfg: CfgNode) -> List[signal.Signals]:
        """The signals of `cfg.SOLVER.PREEMPTION_SIGNALS`.

        Raises:
            ValueError: naming the key and the name that is not a catchable signal.
        """
        return parse_signals(cfg.SOLVER.PREEMPTION_SIGNALS, "cfg.SOLVER.PREEMPTION_SIGNALS")

    def build_hooks(self):
        """DefaultTrainer's hooks, without its PreciseBN (ours runs inside `test`), with
        `ProcessStates` and the `PreemptionCheckpointer` of SOLVER.PREEMPTION_SIGNALS before the
        checkpointer, which keeps the last SOLVER.CHECKPOINT_MAX_TO_KEEP (`RotatingCheckpointer`),
        and MABN diagnostics before the writer."""
        cfg = self.cfg
        ret = [h for h in super().build_hooks() if not isinstance(h, hooks.PreciseBN)]
        keep = cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP
        ret = [RotatingCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD,
                                    max_to_keep=keep or None)
               if isinstance(h, hooks.PeriodicCheckpointer) else h for h in ret]
        self.process_states = ProcessStates(
            unwrap(self.model), (cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD), cfg.SEED)
        return with_mabn_hooks(ret, self.process_states, unwrap(self.model),
                               cfg.MODEL.MABN.LOG_PERIOD, amp=cfg.SOLVER.AMP.ENABLED,
                               checkpointer=self.checkpointer,
                               preemption_signals=self.preemption_signals(cfg))

    def train(self):
        """Train; returns the last evaluation results (as DefaultTrainer documents), or None."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    def resume_or_load(self, resume=True):
        """Resume from the last checkpoint in the output directory if `resume` and there is one
        (data order, data stream position, every process's buffers and random generators), else
        load MODEL.WEIGHTS."""
        super().resume_or_load(resume)
        if self.start_iter > 0:
            # The checkpoint's data order, whatever SEED drew this time.
            self.cfg = _with_seed(self.cfg, self.process_states.data_seed)
            self._trainer.reset_data_loader(
                lambda: self.build_train_loader(self.cfg, start_iter=self.start_iter))


def with_mabn_hooks(ret: List[hooks.HookBase], process_states: ProcessStates, model: nn.Module,
                    log_period: int, *, amp: bool, checkpointer: DetectionCheckpointer,
                    preemption_signals: Sequence[signal.Signals] = ()) -> List[hooks.HookBase]:
    """`ret` (Detectron2's hooks) with, right after the LR scheduler (before the checkpointer and
    evaluation), `process_states` and, when there are `preemption_signals`, the
    `PreemptionCheckpointer` saving with `checkpointer`; and, for a model with MABN2d and
    `log_period` > 0, the MABN diagnostics before the PeriodicWriter (each report is then written
    in the same iteration)."""
    ret = list(ret)
    scheduler_at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler))
    ret.insert(scheduler_at + 1, process_states)
    if preemption_signals:
        ret.insert(scheduler_at + 2,
                   PreemptionCheckpointer(checkpointer, process_states, preemption_signals))
    if log_period and has_mabn(model):
        writer_at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)),
                         len(ret))
        # Under AMP, the GradScaler produces infinite gradients by design.
        ret.insert(writer_at, MABNDiagnostics(model, log_period, fail_on_nonfinite=not amp))
    return ret


def has_mabn(model: nn.Module) -> bool:
    return any(isinstance(m, MABN2d) for m in model.modules())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and `AccumulatedLosses` wrappers, or `model`."""
    while isinstance(model, (DistributedDataParallel, AccumulatedLosses)):
        model = model.module
    return model


def _with_seed(cfg: CfgNode, seed: int) -> CfgNode:
    """`cfg` with SEED = `seed` (frozen as `cfg` was)."""
    if cfg.SEED == seed:
        return cfg
    cfg = cfg.clone()
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.SEED = seed
    if was_frozen:
        cfg.freeze()
    return cfg
