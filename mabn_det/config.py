"""`cfg.MODEL.MABN`, the checks that make a config with NORM: "MABN" safe to build, and the
resolution of the string "MABN" into a layer factory that Detectron2's constructors accept."""
import dataclasses
import functools
from typing import Iterator, Sequence, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .layers import MABN2d, MABNSettings

__all__ = ["add_mabn_config", "check_grad_accumulation", "check_mabn_config", "get_key",
           "load_config", "mabn_settings", "set_key", "stock_inference_config", "with_mabn_norms",
           "MABN_NORM", "MABN_NORM_ALSO_READ_BY", "MABN_NORM_SITES", "META_ARCHS_READING",
           "RESUMABLE_SAMPLER", "STOCK_NAMES"]

MABN_NORM = "MABN"

# The DATALOADER.SAMPLER_TRAIN of mabn_det's resumable training stream
# (mabn_det.engine.build_resumable_train_loader), which this repository's configs set; the names
# Detectron2 knows ("TrainingSampler", ...) keep their meaning.
RESUMABLE_SAMPLER = "ResumableTrainingSampler"

# Where NORM: "MABN" may appear, and the registered names that can build it there.
MABN_NORM_SITES = {
    "MODEL.RESNETS.NORM": ("MODEL.BACKBONE.NAME",
                           ("build_mabn_resnet_backbone", "build_mabn_resnet_fpn_backbone",
                            "build_mabn_retinanet_resnet_fpn_backbone")),
    "MODEL.FPN.NORM": ("MODEL.BACKBONE.NAME",
                       ("build_mabn_resnet_fpn_backbone",
                        "build_mabn_retinanet_resnet_fpn_backbone")),
    "MODEL.ROI_BOX_HEAD.NORM": ("MODEL.ROI_BOX_HEAD.NAME", ("MABNFastRCNNConvFCHead",)),
    "MODEL.ROI_MASK_HEAD.NORM": ("MODEL.ROI_MASK_HEAD.NAME", ("MABNMaskRCNNConvUpsampleHead",)),
    "MODEL.RETINANET.NORM": ("MODEL.META_ARCHITECTURE", ("MABNRetinaNet",)),
    "MODEL.SEM_SEG_HEAD.NORM": ("MODEL.SEM_SEG_HEAD.NAME", ("MABNSemSegFPNHead",)),
}

# NORM keys that only some meta-architectures read. Elsewhere Detectron2 ignores them, and so does
# check_mabn_config, so that a config may set every NORM of MABN_NORM_SITES to "MABN".
META_ARCHS_READING = {
    "MODEL.RETINANET.NORM": ("RetinaNet", "MABNRetinaNet"),
    "MODEL.SEM_SEG_HEAD.NORM": ("SemanticSegmentor", "PanopticFPN"),
}

# Stock modules that read a NORM of MABN_NORM_SITES besides the one its name key names:
# norm key -> (name key, stock name, the meta-architectures that build that module).
# Res5ROIHeads (Detectron2's default ROI_HEADS.NAME) builds res5 from MODEL.RESNETS.NORM.
MABN_NORM_ALSO_READ_BY = {
    "MODEL.RESNETS.NORM": ("MODEL.ROI_HEADS.NAME", "Res5ROIHeads",
                           ("GeneralizedRCNN", "PanopticFPN")),
}

# The stock Detectron2 module each of our registered names extends.
STOCK_NAMES = {
    "build_mabn_resnet_backbone": "build_resnet_backbone",
    "build_mabn_resnet_fpn_backbone": "build_resnet_fpn_backbone",
    "build_mabn_retinanet_resnet_fpn_backbone": "build_retinanet_resnet_fpn_backbone",
    "MABNFastRCNNConvFCHead": "FastRCNNConvFCHead",
    "MABNMaskRCNNConvUpsampleHead": "MaskRCNNConvUpsampleHead",
    "MABNRes5ROIHeads": "Res5ROIHeads",
    "MABNRetinaNet": "RetinaNet",
    "MABNSemSegFPNHead": "SemSegFPNHead",
}

# What "MABN" becomes for stock Detectron2 where it is not "FrozenBN": RetinaNet's head is shared
# by the levels, and stock Detectron2 gives it per-level statistics only for "BN"
# (CycleBatchNormList, see mabn_det.layers.convert_to_inference_form).
_STOCK_INFERENCE_NORMS = {"MODEL.RETINANET.NORM": "BN"}


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
    cfg.MODEL.MABN.LOG_PERIOD = 20
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


def mabn_settings(cfg: CN) -> MABNSettings:
    """The MABN2d settings in `cfg.MODEL.MABN`.

    Raises:
        TypeError, ValueError: naming the `cfg.MODEL.MABN` key and its bad value.
    """
    values = {field.name: cfg.MODEL.MABN[field.name.upper()]
              for field in dataclasses.fields(MABNSettings)}
    return MABNSettings.from_user(lambda field: f"cfg.MODEL.MABN.{field.upper()}", **values)


def check_grad_accumulation(steps: Tuple[str, int], images_per_step: Tuple[str, int],
                            amp: Tuple[str, bool]) -> None:
    """Refuse a gradient accumulation that cannot work, naming the keys as the config wrote them.

    Each argument is (the key as the user wrote it, its value), e.g.
    ``steps=("cfg.SOLVER.GRAD_ACCUMULATION_STEPS", 2)`` or ``("train.grad_accumulation_steps", 2)``.

    Args:
        steps: micro-batches per optimizer step; must be ≥ 1 and divide `images_per_step`.
        images_per_step: images per optimizer step, all processes together.
        amp: whether AMP is on; accumulation does not support it (its trainer,
            `mabn_det.engine.GradientAccumulationTrainer`, has no gradient scaler).

    Raises:
        ValueError: naming the offending key, its value and what to set instead.
    """
    (steps_key, n), (batch_key, batch), (amp_key, amp_on) = steps, images_per_step, amp
    if n < 1 or batch % n:
        raise ValueError(f"{steps_key} must be ≥ 1 and divide {batch_key} ({batch}), got {n}")
    if n > 1 and amp_on:
        raise ValueError(f"{steps_key} > 1 does not support {amp_key}; set one of them back "
                         f"(got accumulation {n} with AMP)")


def check_mabn_config(cfg: CN) -> None:
    """Refuse, before anything is built, a config whose MABN settings cannot work as written.

    Raises:
        ValueError: naming the offending key, its value and the setting to use instead.
    """
    if "MABN" not in cfg.MODEL:
        raise ValueError("cfg has no MODEL.MABN: call mabn_det.add_mabn_config(cfg) before "
                         "merging a config file")
    mabn_settings(cfg)
    if cfg.MODEL.MABN.LOG_PERIOD < 0:
        raise ValueError(f"cfg.MODEL.MABN.LOG_PERIOD must be ≥ 0, got {cfg.MODEL.MABN.LOG_PERIOD!r}")
    check_grad_accumulation(
        steps=("cfg.SOLVER.GRAD_ACCUMULATION_STEPS", cfg.SOLVER.GRAD_ACCUMULATION_STEPS),
        images_per_step=("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH),
        amp=("SOLVER.AMP.ENABLED", cfg.SOLVER.AMP.ENABLED))

    for key, value in _norm_keys(cfg.MODEL, "MODEL."):
        if value != MABN_NORM:
            continue
        if key not in MABN_NORM_SITES:
            raise ValueError(f'cfg.{key} = "MABN" is not supported; MABN works in '
                             f"{', '.join(MABN_NORM_SITES)}")
        if key in META_ARCHS_READING and cfg.MODEL.META_ARCHITECTURE not in META_ARCHS_READING[key]:
            continue
        name_key, builders = MABN_NORM_SITES[key]
        if get_key(cfg, name_key) not in builders:
            raise ValueError(f'cfg.{key} = "MABN" needs cfg.{name_key} to be one of {builders}, '
                             f"got {get_key(cfg, name_key)!r}")
        if key in MABN_NORM_ALSO_READ_BY:
            name_key, stock_name, meta_archs = MABN_NORM_ALSO_READ_BY[key]
            if get_key(cfg, name_key) == stock_name and cfg.MODEL.META_ARCHITECTURE in meta_archs:
                ours = next(name for name, stock in STOCK_NAMES.items() if stock == stock_name)
                raise ValueError(f'cfg.{key} = "MABN" needs cfg.{name_key} to be {ours!r} '
                                 f"({stock_name} builds layers from {key}), got {stock_name!r}")
    if cfg.MODEL.RESNETS.NORM == MABN_NORM:
        if cfg.MODEL.BACKBONE.FREEZE_AT > 0:
            raise ValueError("MABN layers cannot be frozen: set cfg.MODEL.BACKBONE.FREEZE_AT to 0 "
                             f"(train from scratch), got {cfg.MODEL.BACKBONE.FREEZE_AT}")
        if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
            raise ValueError("cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE must be all False with MABN "
                             "(a deformable conv cannot be weight-centred), got "
                             f"{cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE}")


def with_mabn_norms(cfg: CN) -> CN:
    """A copy of `cfg` where every supported NORM equal to "MABN" is an MABN2d factory.

    Detectron2's `get_norm` is a closed table of strings but calls any callable it is given with the
    channel count, and every constructor we reuse passes its norm through `get_norm`; so the stock
    modules built from this copy hold MABN2d layers. Other values ("BN", "GN", "SyncBN", "", ...) are
    left for Detectron2 to resolve, so norms mix. `cfg` itself (and the config.yaml dumped from it)
    keeps the string.
    """
    factory = functools.partial(MABN2d, **dataclasses.asdict(mabn_settings(cfg)))
    resolved = cfg.clone()
    resolved.defrost()
    for key in MABN_NORM_SITES:
        if get_key(resolved, key) == MABN_NORM:
            set_key(resolved, key, factory)
    return resolved


def stock_inference_config(cfg: CN) -> CN:
    """The config of the same architecture for stock Detectron2, without mabn_det.

    Every NORM "MABN" becomes "FrozenBN" ("BN" for MODEL.RETINANET.NORM, evaluated in eval mode)
    and every mabn_det name its stock counterpart (`RESUMABLE_SAMPLER` "TrainingSampler"); the
    keys that `add_mabn_config` added are removed. Weights converted by
    `mabn_det.layers.convert_to_inference_form` load into the model it builds.
    """
    stock = cfg.clone()
    stock.defrost()
    for norm_key in MABN_NORM_SITES:
        if get_key(stock, norm_key) == MABN_NORM:
            set_key(stock, norm_key, _STOCK_INFERENCE_NORMS.get(norm_key, "FrozenBN"))
    name_keys = {name_key for name_key, _ in MABN_NORM_SITES.values()}
    name_keys |= {name_key for name_key, _, _ in MABN_NORM_ALSO_READ_BY.values()}
    for name_key in name_keys:
        name = get_key(stock, name_key)
        set_key(stock, name_key, STOCK_NAMES.get(name, name))
    if stock.DATALOADER.SAMPLER_TRAIN == RESUMABLE_SAMPLER:
        stock.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    del stock.MODEL["MABN"]
    del stock.SOLVER["GRAD_ACCUMULATION_STEPS"]
    del stock.SOLVER["CHECKPOINT_MAX_TO_KEEP"]
    del stock.SOLVER["PREEMPTION_SIGNALS"]
    return stock
