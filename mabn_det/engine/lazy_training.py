"""The pieces tools/lazyconfig_train_net.py builds from a Detectron2 LazyConfig (Python) config.

The config is laid out as Detectron2's ``configs/common``: ``model``, ``optimizer``,
``lr_multiplier``, ``dataloader.{train,test,evaluator}`` and ``train`` (output_dir,
init_checkpoint, max_iter, amp.enabled, ddp, checkpointer, eval_period, log_period, device, and
optionally seed). Optional ``train`` keys, with their defaults when absent (so a stock config trains
as is):

- ``grad_accumulation_steps`` (1): micro-batches per optimizer step;
  ``dataloader.train.total_batch_size`` stays the images per optimizer step.
- ``mabn_log_period`` (`mabn_det.config.MABN_LOG_PERIOD`): iterations between MABN diagnostics;
  0 turns them off.
- ``precise_bn`` (off): ``dict(enabled=True, num_iter=200)`` evaluates with MABN's running_var
  re-estimated over that many training batches (`precise_mabn_statistics`; training unchanged).
- ``checkpointer.max_to_keep`` (Detectron2's PeriodicCheckpointer argument; its
  ``common/train.py`` sets 100, this repository's recipes 3): periodic checkpoints kept in the
  output directory, those of the runs it resumed included (`RotatingCheckpointer`).
- ``preemption_signals`` (["SIGUSR1"]): signals at which training stops after the current step
  with a checkpoint to resume from, asks SLURM to requeue the job and exits with status 75
  (`PreemptionCheckpointer`); [] turns this off.
"""
import contextlib
import copy
import logging
import signal
from typing import List

from detectron2.config import instantiate
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils import comm

from ..config import MABN_LOG_PERIOD, check_training
from ..lazy import target_callable
from ..modeling import prepare_mabn_model
from ..solver import mabn_optimizer_params
from .checkpointing import parse_signals
from .hooks import precise_mabn_statistics
from .sampler import build_resumable_train_loader
from .state import preserved_rng
from .trainer import has_mabn, unwrap

__all__ = ["accumulation_steps", "build_lazy_model", "build_lazy_optimizer",
           "build_lazy_train_loader", "check_lazy_training", "evaluate_lazy", "mabn_log_period",
           "preemption_signals"]


def accumulation_steps(cfg) -> int:
    """``train.grad_accumulation_steps`` (1 when absent)."""
    return cfg.train.get("grad_accumulation_steps", 1)


def mabn_log_period(cfg) -> int:
    """``train.mabn_log_period`` (`mabn_det.config.MABN_LOG_PERIOD` when absent)."""
    return cfg.train.get("mabn_log_period", MABN_LOG_PERIOD)


def check_lazy_training(cfg) -> None:
    """`mabn_det.config.check_training` for the ``train`` and ``dataloader.train`` keys; the tool
    runs it once per trainer, before building anything.

    Raises:
        ValueError: naming the ``train`` key that cannot work with the rest.
    """
    check_training(
        steps=("train.grad_accumulation_steps", accumulation_steps(cfg)),
        images_per_step=("dataloader.train.total_batch_size",
                         cfg.dataloader.train.total_batch_size),
        amp=("train.amp.enabled", cfg.train.amp.enabled),
        log_period=("train.mabn_log_period", mabn_log_period(cfg)))


def preemption_signals(cfg) -> List[signal.Signals]:
    """The signals of ``train.preemption_signals`` (["SIGUSR1"] when absent).

    Raises:
        ValueError: naming the key and the name that is not a catchable signal.
    """
    return parse_signals(cfg.train.get("preemption_signals", ["SIGUSR1"]),
                         "train.preemption_signals")


def build_lazy_model(cfg):
    """``cfg.model`` instantiated, through `prepare_mabn_model`, on ``train.device``."""
    model = prepare_mabn_model(instantiate(cfg.model))
    model.to(cfg.train.device)
    logging.getLogger(__name__).info(f"Model:\n{model}")
    return model


def build_lazy_optimizer(cfg, model):
    """``cfg.optimizer`` for `model`; a ``params`` node built by Detectron2's
    `get_default_optimizer_params` is built by `mabn_optimizer_params` (the same groups, MABN2d's
    γ and β counted as norm parameters)."""
    optimizer = copy.deepcopy(cfg.optimizer)
    if target_callable(optimizer.params._target_) is get_default_optimizer_params:
        optimizer.params._target_ = mabn_optimizer_params
    optimizer.params.model = model
    return instantiate(optimizer)


def build_lazy_train_loader(cfg, seed: int, start_iter: int = 0, *, num_workers=None):
    """``dataloader.train`` in micro-batches of total_batch_size / grad_accumulation_steps images
    (all processes together).

    When its ``_target_`` is `build_resumable_train_loader` (as in this repository's recipes), the
    batches are the data stream of `seed` from iteration `start_iter` on; any other loader
    (Detectron2's `build_detection_train_loader`, say) is built as written, and a resume
    restarts its stream.

    Args:
        num_workers: overrides ``dataloader.train.num_workers`` when given.
    """
    node = cfg.dataloader.train
    kwargs = {key: instantiate(value) for key, value in node.items() if key != "_target_"}
    steps = accumulation_steps(cfg)
    kwargs["total_batch_size"] //= steps
    if num_workers is not None:
        kwargs["num_workers"] = num_workers
    build = target_callable(node._target_)
    if build is build_resumable_train_loader:
        kwargs.update(seed=seed, start_batch=start_iter * steps)
    return build(**kwargs)


def evaluate_lazy(cfg, model, seed: int):
    """Evaluate `model` on ``dataloader.test`` with ``dataloader.evaluator``, with PreciseBN for
    MABN when ``train.precise_bn.enabled`` (its batches from the data stream of `seed`), taking
    nothing from the random generators.

    Returns:
        The evaluator's results; {} when the config has no evaluator.
    """
    if "evaluator" not in cfg.dataloader:
        return {}
    precise = cfg.train.get("precise_bn", {})
    with preserved_rng(), contextlib.ExitStack() as statistics:
        if precise.get("enabled", False) and has_mabn(model):
            statistics.enter_context(precise_mabn_statistics(
                unwrap(model), build_lazy_train_loader(cfg, seed, num_workers=0), precise.num_iter))
        results = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                                       instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results
