"""The Trainer for Detectron2 LazyConfig (Python) configs, behind tools/lazyconfig_train_net.py."""
import copy
import logging

from detectron2.config import instantiate
from detectron2.engine import TrainerBase, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver import LRMultiplier
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils import comm
from detectron2.utils.registry import locate

from ..config import check_grad_accumulation
from ..lazy import prepare_mabn_model
from ..solver import mabn_optimizer_params
from .trainer import Trainer, TrainingSettings, resumable_sampler

__all__ = ["LazyTrainer"]


def _callable(target):
    """A LazyConfig ``_target_``: the callable, or its dotted name once saved and reloaded."""
    return locate(target) if isinstance(target, str) else target


class LazyTrainer(Trainer):
    """`Trainer` (gradient accumulation, exact resume, MABN diagnostics and weight decay, PreciseBN
    for MABN, evaluation) for a LazyConfig laid out as Detectron2's ``configs/common``:
    ``model``, ``optimizer``, ``lr_multiplier``, ``dataloader.{train,test,evaluator}`` and ``train``
    (output_dir, init_checkpoint, max_iter, amp.enabled, ddp, checkpointer, eval_period,
    log_period, device, and optionally seed).

    Optional ``train`` keys, with their defaults when absent (so a stock config trains as is):

    - ``grad_accumulation_steps`` (1): micro-batches per optimizer step;
      ``dataloader.train.total_batch_size`` stays the images per optimizer step.
    - ``mabn_log_period`` (20): iterations between MABN diagnostics; 0 turns them off.
    - ``precise_bn`` (off): ``dict(enabled=True, num_iter=200)`` re-estimates MABN's running_var
      before each evaluation (`PreciseMABN`).

    The model goes through `prepare_mabn_model` after `instantiate`, and an ``optimizer.params``
    node built by Detectron2's `get_default_optimizer_params` is built by `mabn_optimizer_params`
    (the same groups, MABN2d's γ and β counted as norm parameters). Exact resume needs
    ``dataloader.train`` to be a `build_detection_train_loader` without a ``sampler`` of its own.
    """

    @staticmethod
    def auto_scale_workers(cfg, num_workers: int):
        """A LazyConfig states its own batch size and schedule; nothing is rescaled."""
        return cfg

    @classmethod
    def training_settings(cls, cfg) -> TrainingSettings:
        """Raises: ValueError naming the ``train`` key that cannot work with the rest."""
        train = cfg.train
        steps = train.get("grad_accumulation_steps", 1)
        check_grad_accumulation(
            steps=("train.grad_accumulation_steps", steps),
            images_per_step=("dataloader.train.total_batch_size",
                             cfg.dataloader.train.total_batch_size),
            amp=("train.amp.enabled", train.amp.enabled))
        seed = train.get("seed", -1)
        return TrainingSettings(
            output_dir=train.output_dir, weights=train.init_checkpoint, max_iter=train.max_iter,
            accumulation_steps=steps, amp=train.amp.enabled, ddp=dict(train.ddp),
            log_period=train.get("mabn_log_period", 20), seed=seed if seed >= 0 else None)

    @classmethod
    def build_model(cls, cfg):
        model = prepare_mabn_model(instantiate(cfg.model))
        model.to(cfg.train.device)
        logging.getLogger(__name__).info(f"Model:\n{model}")
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        optimizer = copy.deepcopy(cfg.optimizer)
        if _callable(optimizer.params._target_) is get_default_optimizer_params:
            optimizer.params._target_ = mabn_optimizer_params
        optimizer.params.model = model
        return instantiate(optimizer)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), cfg.train.max_iter)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        """Micro-batches of total_batch_size / grad_accumulation_steps images (all processes
        together), starting at iteration `start_iter` of the data stream."""
        node = cfg.dataloader.train
        kwargs = {key: instantiate(value) for key, value in node.items() if key != "_target_"}
        images_per_step = kwargs["total_batch_size"]
        settings = cls.training_settings(cfg)
        kwargs["total_batch_size"] = images_per_step // settings.accumulation_steps
        if kwargs.get("sampler") is None:
            kwargs["sampler"] = resumable_sampler(len(kwargs["dataset"]), images_per_step,
                                                  settings.seed, start_iter)
        return _callable(node._target_)(**kwargs)

    def build_hooks(self):
        train = self.cfg.train
        main = comm.is_main_process()
        ret = [
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            hooks.PeriodicCheckpointer(self.checkpointer, **train.checkpointer) if main else None,
            hooks.EvalHook(train.eval_period, self._test_and_save_results),
            hooks.PeriodicWriter(default_writers(train.output_dir, self.max_iter),
                                 period=train.log_period) if main else None,
        ]
        precise = train.get("precise_bn", {})
        return self.with_mabn_hooks(
            ret, (train.eval_period, precise.num_iter) if precise.get("enabled", False) else None)

    @classmethod
    def build_precise_bn_loader(cls, cfg):
        cfg = copy.deepcopy(cfg)
        cfg.dataloader.train.num_workers = 0
        return cls.build_train_loader(cfg)

    def _test_and_save_results(self):
        self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate `model` on ``dataloader.test`` with ``dataloader.evaluator`` (e.g. COCO AP).

        Returns:
            The evaluator's results; {} when the config has no evaluator.
        """
        if "evaluator" not in cfg.dataloader:
            return {}
        results = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                                       instantiate(cfg.dataloader.evaluator))
        if comm.is_main_process():
            print_csv_format(results)
        return results

    def train(self):
        """Train; returns the last evaluation results, or None."""
        TrainerBase.train(self, self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", None)
