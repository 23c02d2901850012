"""`cfg.MODEL.MABN`, the training check, and the resolution of the string "MABN" into a layer
factory that Detectron2's constructors accept.

Which modules may read NORM "MABN", and the check of a model's config against them, live with those
modules in `mabn_det.modeling`.
"""
import dataclasses
import functools
from typing import Iterator, List, Sequence, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .layers import MABN2d, MABNSettings

__all__ = ["add_mabn_config", "check_training", "check_training_config", "get_key", "load_config",
           "mabn_norm_keys", "mabn_settings", "set_key", "with_mabn_norms", "MABN_LOG_PERIOD",
           "MABN_NORM", "RESUMABLE_SAMPLER"]

MABN_NORM = "MABN"

# The DATALOADER.SAMPLER_TRAIN of mabn_det's resumable training stream
# (mabn_det.engine.build_resumable_train_loader), which this repository's configs set; the names
# Detectron2 knows ("TrainingSampler", ...) keep their meaning.
RESUMABLE_SAMPLER = "ResumableTrainingSampler"

# Iterations between MABN diagnostics unless a config says otherwise: cfg.MODEL.MABN.LOG_PERIOD,
# and a LazyConfig's train.mabn_log_period.
MABN_LOG_PERIOD = 20


def add_mabn_config(cfg: CN) -> None:
    """Add `cfg.MODEL.MABN` (the paper's detection settings) and mabn_det's `cfg.SOLVER` keys
    (gradient accumulation, checkpoints kept, preemption signals)."""
    cfg.MODEL.MABN = CN()
    # The layer's settings: one key per field of mabn_det.layers.MABNSettings (BUFFER_SIZE is
    # buffer_size, ...) with its default; its docstring says what each means and allows.
    for field in dataclasses.fields(MABNSettings):
        cfg.MODEL.MABN[field.name.upper()] = field.default
    # Make every conv that feeds an MABN layer a CentredConv2d, whose filters have mean 0 (needed:
    # MABN drops the mean subtraction).
    cfg.MODEL.MABN.CENTRED_CONV = True
    # Every LOG_PERIOD iterations, MABN diagnostics go to the EventStorage; 0 turns them off.
    cfg.MODEL.MABN.LOG_PERIOD = MABN_LOG_PERIOD
    # Micro-batches per optimizer step. SOLVER.IMS_PER_BATCH stays the images per optimizer step;
    # each forward sees IMS_PER_BATCH / (GPUs · GRAD_ACCUMULATION_STEPS) images per GPU.
    cfg.SOLVER.GRAD_ACCUMULATION_STEPS = 1
    # Periodic checkpoints kept in OUTPUT_DIR, those of the runs it resumed included (the latest
    # ones; model_final.pth is extra); 0 keeps all.
    cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP = 3
    # Signals at which training stops after the current step with a checkpoint to resume from,
    # asks SLURM to requeue the job and exits with status 75 (SLURM's --signal sends SIGUSR1); ()
    # turns this off. Add "SIGTERM" where a scheduler preempts with it; scancel, which sends it
    # too, then requeues the job instead of ending it.
    cfg.SOLVER.PREEMPTION_SIGNALS = ("SIGUSR1",)


def load_config(config_file: str | None = None, opts: Sequence[str] = ()) -> CN:
    """Detectron2's defaults with `cfg.MODEL.MABN`, then `config_file`, then KEY VALUE `opts`.

    Returns:
        A config that is not frozen, so callers can still set what their tool decides.
    """
    cfg = get_cfg()
    add_mabn_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list([str(x) for x in opts])
    return cfg


def get_key(cfg: CN, dotted: str):
    """cfg.A.B.C for dotted = "A.B.C"."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def set_key(cfg: CN, dotted: str, value) -> None:
    """cfg.A.B.C = value for dotted = "A.B.C" (cfg must not be frozen)."""
    *path, leaf = dotted.split(".")
    get_key(cfg, ".".join(path))[leaf] = value


def _norm_keys(node: CN, prefix: str = "") -> Iterator[Tuple[str, object]]:
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _norm_keys(value, f"{prefix}{key}.")
        elif key == "NORM":
            yield prefix + key, value


def mabn_norm_keys(cfg: CN) -> List[str]:
    """The dotted keys of `cfg.MODEL` named NORM whose value is "MABN", e.g. "MODEL.FPN.NORM"."""
    return [key for key, value in _norm_keys(cfg.MODEL, "MODEL.") if value == MABN_NORM]


def mabn_settings(cfg: CN) -> MABNSettings:
    """The MABN2d settings in `cfg.MODEL.MABN`.

    Raises:
        TypeError, ValueError: naming the `cfg.MODEL.MABN` key and its bad value, or the missing
            `cfg.MODEL.MABN`.
    """
    if "MABN" not in cfg.MODEL:
        raise ValueError("cfg has no MODEL.MABN: call mabn_det.add_mabn_config(cfg) before "
                         "merging a config file")
    values = {field.name: cfg.MODEL.MABN[field.name.upper()]
              for field in dataclasses.fields(MABNSettings)}
    return MABNSettings.from_user(lambda field: f"cfg.MODEL.MABN.{field.upper()}", **values)


def check_training(steps: Tuple[str, int], images_per_step: Tuple[str, int],
                   amp: Tuple[str, bool], log_period: Tuple[str, int]) -> None:
    """Refuse training settings that cannot work, naming the keys as the config wrote them.

    A trainer runs it once, before building anything (`check_training_config` for a YAML config).
    Each argument is (the key as the user wrote it, its value), e.g.
    ``steps=("cfg.SOLVER.GRAD_ACCUMULATION_STEPS", 2)`` or ``("train.grad_accumulation_steps", 2)``.

    Args:
        steps: micro-batches per optimizer step; must be ≥ 1 and divide `images_per_step`.
        images_per_step: images per optimizer step, all processes together.
        amp: whether AMP is on; accumulation does not support it (its trainer,
            `mabn_det.engine.GradientAccumulationTrainer`, has no gradient scaler).
        log_period: iterations between MABN diagnostics; must be ≥ 0 (0 turns them off).

    Raises:
        ValueError: naming the offending key, its value and what to set instead.
    """
    (steps_key, n), (batch_key, batch), (amp_key, amp_on) = steps, images_per_step, amp
    if n < 1 or batch % n:
        raise ValueError(f"{steps_key} must be ≥ 1 and divide {batch_key} ({batch}), got {n}")
    if n > 1 and amp_on:
        raise ValueError(f"{steps_key} > 1 does not support {amp_key}; set one of them back "
                         f"(got accumulation {n} with AMP)")
    period_key, period = log_period
    if period < 0:
        raise ValueError(f"{period_key} must be ≥ 0, got {period!r}")


def check_training_config(cfg: CN) -> None:
    """`check_training` for the SOLVER and `cfg.MODEL.MABN` keys of a YAML config."""
    check_training(
        steps=("cfg.SOLVER.GRAD_ACCUMULATION_STEPS", cfg.SOLVER.GRAD_ACCUMULATION_STEPS),
        images_per_step=("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH),
        amp=("SOLVER.AMP.ENABLED", cfg.SOLVER.AMP.ENABLED),
        log_period=("cfg.MODEL.MABN.LOG_PERIOD", cfg.MODEL.MABN.LOG_PERIOD))


def with_mabn_norms(cfg: CN) -> CN:
    """A copy of `cfg` where every NORM equal to "MABN" is an MABN2d factory.

    Detectron2's `get_norm` is a closed table of strings but calls any callable it is given with the
    channel count, and every constructor we reuse passes its norm through `get_norm`; so the stock
    modules built from this copy hold MABN2d layers. Other values ("BN", "GN", "SyncBN", "", ...)
    are left for Detectron2 to resolve, so norms mix. `cfg` itself (and the config.yaml dumped from
    it) keeps the string.
    """
    factory = functools.partial(MABN2d, **dataclasses.asdict(mabn_settings(cfg)))
    resolved = cfg.clone()
    resolved.defrost()
    for key in mabn_norm_keys(cfg):
        set_key(resolved, key, factory)
    return resolved
