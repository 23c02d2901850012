"""`make demo`: generate the shapes set, train a small MABN Mask R-CNN from scratch, evaluate, draw."""
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import time
from typing import Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.logger import setup_logger

from mabn_det.config import load_config
from mabn_det.engine import Trainer

from .plots import MASK_RCNN_LOSSES, plot_training_curves, save_predictions
from .shapes import (
    SCENE_STYLES,
    default_shapes_dir,
    generate_shapes_dataset,
    register_shapes_datasets,
    shapes_dataset_exists,
)

__all__ = ["STALE_OUTPUTS", "run_demo"]

logger = logging.getLogger(__name__)


# Files of an earlier demo run in the same output directory that a new run replaces rather than
# extends (Detectron2's JSONWriter appends to metrics.json, which would mix two runs' curves).
STALE_OUTPUTS = ("metrics.json", "model_final.pth", "last_checkpoint", "results.json",
                 "training_curves.png")


def run_demo(config_file: str, output_dir: str, *, num_train: int, num_val: int,
             seed: int = 0, style: str = "demo", eval_only: bool = False,
             opts: Sequence[str] = ()) -> dict:
    """Train `config_file` on the shapes set (generated first if missing) and report.

    The shapes images are generated at the config's INPUT.MIN_SIZE_TEST, so the network sees them
    at their own size. A second call reuses the generated set; it trains again from scratch and
    replaces the earlier run's files in `output_dir`, unless `eval_only`, which evaluates and
    draws the `output_dir/model_final.pth` already there.

    Writes to `output_dir`: Detectron2's logs, metrics.json and checkpoints; `results.json` (COCO AP
    for boxes and masks, timing, device); `training_curves.png` (each loss and the AP points);
    `predictions/*.png` (ground truth and prediction side by side).

    Args:
        config_file: a config training on shapes_train and testing on shapes_val.
        num_train, num_val, seed, style: the shapes set to use (or generate).
        eval_only: evaluate the trained model in `output_dir` instead of training.
        opts: KEY VALUE overrides applied last.

    Returns:
        The evaluation results, {"bbox": {"AP": ...}, "segm": {...}}.
    """
    cfg = load_config(config_file)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.OUTPUT_DIR = output_dir
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    _check_classes(cfg, style)
    image_size = cfg.INPUT.MIN_SIZE_TEST
    dataset_dir = default_shapes_dir()
    if not shapes_dataset_exists(dataset_dir, num_train=num_train, num_val=num_val,
                                 image_size=image_size, seed=seed, style=style):
        generate_shapes_dataset(dataset_dir, num_train, num_val, image_size, seed, style=style)
    register_shapes_datasets()

    os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir)
    setup_logger(output_dir, name="mabn_det")
    weights = os.path.join(output_dir, "model_final.pth")
    if eval_only:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"eval_only needs a trained model at {weights}; there is none "
                                    "(run the demo without --eval-only first)")
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model).load(weights)
        results = Trainer.test(cfg, model)
        seconds = None
    else:
        for name in STALE_OUTPUTS:
            if os.path.exists(os.path.join(output_dir, name)):
                logger.info("%s holds an earlier demo run: training again from scratch and "
                            "replacing it (`tools/demo.py --eval-only` evaluates it instead)",
                            output_dir)
                break
        for name in STALE_OUTPUTS:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, name))
        shutil.rmtree(os.path.join(output_dir, "predictions"), ignore_errors=True)
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        start = time.perf_counter()
        results = trainer.train()
        seconds = round(time.perf_counter() - start, 1)
        plot_training_curves({"MABN": output_dir}, os.path.join(output_dir, "training_curves.png"),
                             title=f"{os.path.basename(config_file)} on shapes ({cfg.MODEL.DEVICE})",
                             losses=MASK_RCNN_LOSSES)

    trained = cfg.clone()
    trained.defrost()
    trained.MODEL.WEIGHTS = weights
    save_predictions(trained, cfg.DATASETS.TEST[0], os.path.join(output_dir, "predictions"))
    summary = {
        # JSON has no NaN: metrics COCO cannot compute (no object of that size or class) are null.
        "results": {task: {k: None if math.isnan(v) else v for k, v in metrics.items()}
                    for task, metrics in results.items()},
        "train_seconds": seconds,
        "iterations": cfg.SOLVER.MAX_ITER,
        "images_per_iteration": cfg.SOLVER.IMS_PER_BATCH,
        "device": torch.cuda.get_device_name() if cfg.MODEL.DEVICE == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "config_file": config_file,
    }
    with open(os.path.join(output_dir, "results.json" if seconds is not None else
                           "results_eval_only.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("box AP %.1f, mask AP %.1f%s; pictures in %s", results["bbox"]["AP"],
                results["segm"]["AP"],
                "" if seconds is None else f" after {seconds:.0f} s of training", output_dir)
    return results


def _check_classes(cfg, style: str) -> None:
    """Raise unless the model has an output for every class that `style` draws."""
    if style not in SCENE_STYLES:
        raise ValueError(f"style must be one of {sorted(SCENE_STYLES)}, got {style!r}")
    drawn = SCENE_STYLES[style].num_classes
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES < drawn:
        raise ValueError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}, but "
                         f"the {style!r} shapes style draws {drawn} classes; expected ≥ {drawn}")
