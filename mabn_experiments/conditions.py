"""The conditions of the norm study: on which data, with which model and schedule, the arms are
compared, and how each condition's data is made and registered.

Each condition keeps its run records in `RESULTS/<name>/runs/`. A comparison of norms has its own
calibration: BN@16 must learn the task (at least `calibration_target` box AP) and BN@2 must trail it
by at least `CALIBRATION_GAP`, else the report says that the condition cannot rank norms.
"""
import os
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

from .shapes import generate_shapes_dataset, register_shapes_split, shapes_dataset_exists
from .trees import build_trees_dataset, register_trees_split, trees_dataset_exists

__all__ = ["CALIBRATION_GAP", "CONDITIONS", "Condition", "TINY_OPTS", "prepare_dataset",
           "register_dataset"]

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "tiny")
ALL_ARMS = ("BN@16", "BN@2", "GN@2", "MABN@2", "MABN@2-buffer1")
PAPER_ARMS = ("BN@16", "BN@2", "GN@2", "MABN@2")
PRETRAINED_ARMS = ("FrozenBN", "FrozenBN+MABN@2", "MABN@2-converted", "MABN@2-centred",
                   "BN@2-pretrained")
# BN@2 must trail BN@16 by at least this much box AP for a condition to rank norms.
CALIBRATION_GAP = 3.0
# The shapes sets: generator seed and (train, val) images, full size and tiny.
SHAPES_SEED = 1
SHAPES_IMAGES = (3000, 300)
SHAPES_IMAGES_TINY = (24, 6)


@dataclass(frozen=True)
class Condition:
    """One setting in which every arm of `arms` trains with every seed of `seeds`.

    Attributes:
        name: the directory of its records under the results folder, and its CLI name.
        title: one line for the report.
        data: "trees", or the shapes style to generate ("study", "demo").
        config_file: the model, input size and schedule, relative to configs/tiny.
        opts: KEY VALUE overrides of the config, applied after the arm's settings.
        precise_bn_batches: training batches of the extra PreciseBN evaluation of MABN arms, 0
            for none.
        calibration_target: box AP that BN@16 must reach for the condition to rank norms; None
            for a condition that is no such comparison.
        calibrated_by: the condition on the same data whose BN@16 and BN@2 calibrate this one,
            which runs no BN@2 of its own.
        pretrained_from: the condition whose BN@16 seed-0 run gives the pretrained BN backbone of
            the arms that start from one.
        beside: (condition, arms) whose runs the report shows beside this condition's.
    """

    name: str
    title: str
    data: str
    config_file: str
    arms: Tuple[str, ...]
    seeds: Tuple[int, ...]
    opts: Tuple[str, ...] = ()
    precise_bn_batches: int = 0
    calibration_target: float | None = 40.0
    calibrated_by: str | None = None
    pretrained_from: str | None = None
    beside: Tuple[str, Tuple[str, ...]] | None = None

    @property
    def config_path(self) -> str:
        return os.path.join(_CONFIGS, self.config_file)

    @property
    def has_masks(self) -> bool:
        return self.data != "trees"


_SHAPES_CONFIG = "study_R18_FPN_shapes.yaml"
CONDITIONS: Dict[str, Condition] = {c.name: c for c in (
    Condition("photometric", "synthetic shapes, strong per-image photometry, 800 steps",
              "study", _SHAPES_CONFIG, ALL_ARMS, (0, 1, 2), precise_bn_batches=100),
    Condition("photometric_paper_warmup", "as photometric, MABN with the paper's absolute "
              "warm-ups (100 and 1000 steps: no renormalisation within 800 steps)",
              "study", _SHAPES_CONFIG, ("MABN@2",), (0,), precise_bn_batches=100,
              opts=("MODEL.MABN.WARMUP_ITERS", "800", "MODEL.MABN.RENORM_WARMUP_ITERS", "8000"),
              calibrated_by="photometric"),
    Condition("plain", "the same synthetic scenes without per-image photometry, 800 steps",
              "demo", _SHAPES_CONFIG, PAPER_ARMS, (0, 1, 2)),
    Condition("photometric_long", "as photometric, 3x longer: 2400 steps, learning-rate steps "
              "at 1920 and 2220", "study", _SHAPES_CONFIG, ("BN@16", "GN@2", "MABN@2"), (0, 1),
              opts=("SOLVER.MAX_ITER", "2400", "SOLVER.STEPS", "(1920, 2220)",
                    "TEST.EVAL_PERIOD", "200", "SOLVER.CHECKPOINT_PERIOD", "200"),
              calibrated_by="photometric"),
    Condition("trees", "real aerial images: deepforest's tree crowns, 128 px tiles, box-only "
              "Faster R-CNN, 800 steps", "trees", "study_R18_FPN_trees.yaml", PAPER_ARMS,
              (0, 1, 2), calibration_target=20.0),
    Condition("standard_pretraining", "BN@16 on the \"standard\" shapes style (six classes told "
              "apart by outline, clutter, photometry), 800 steps: the pretrained BN backbone of "
              "the pretrained condition", "standard", _SHAPES_CONFIG, ("BN@16",), (0,),
              opts=("MODEL.ROI_HEADS.NUM_CLASSES", "6"), calibration_target=None),
    Condition("pretrained", "from the BN backbone of standard_pretraining, fine-tuned at 2 "
              "images per statistic on the photometric condition's data and schedule",
              "study", _SHAPES_CONFIG, PRETRAINED_ARMS, (0, 1), calibration_target=None,
              pretrained_from="standard_pretraining", beside=("photometric", ("BN@16", "MABN@2"))),
)}

# Every condition in a minute: a few iterations on tiny images (checks the pipeline, ranks nothing).
TINY_OPTS = ("SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2",
             "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
             "MODEL.MABN.WARMUP_ITERS", "1", "MODEL.MABN.RENORM_WARMUP_ITERS", "2",
             "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
             "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64")


def prepare_dataset(condition: Condition, datasets_dir: str, tiny: bool = False) -> str:
    """Generate (or find, if complete) the data of `condition` under `datasets_dir`; returns its
    directory. The name says what the data is, so conditions on the same data share it."""
    if condition.data == "trees":
        dataset_dir = os.path.join(datasets_dir, "trees_deepforest_128px")
        if not trees_dataset_exists(dataset_dir):
            build_trees_dataset(dataset_dir)
        return dataset_dir
    num_train, num_val = SHAPES_IMAGES_TINY if tiny else SHAPES_IMAGES
    image_size = 64 if tiny else 96
    dataset_dir = os.path.join(
        datasets_dir, f"{condition.data}_{num_train}_{image_size}px_seed{SHAPES_SEED}")
    if not shapes_dataset_exists(dataset_dir, num_train=num_train, num_val=num_val,
                                 image_size=image_size, seed=SHAPES_SEED, style=condition.data):
        generate_shapes_dataset(dataset_dir, num_train, num_val, image_size, seed=SHAPES_SEED,
                                style=condition.data)
    return dataset_dir


def register_dataset(data: str, dataset_dir: str, names: Sequence[str]) -> None:
    """Register the train and val splits of `dataset_dir` (made for `Condition.data` == `data`)
    as `names` (train name, val name)."""
    register: Callable = register_trees_split if data == "trees" else register_shapes_split
    for name, split in zip(names, ("train", "val")):
        register(name, dataset_dir, split)
