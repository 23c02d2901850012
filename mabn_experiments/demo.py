"""`make demo`: generate the shapes set, train a small MABN Mask R-CNN from scratch, evaluate, draw."""
import json
import logging
import math
import os
import platform
import time
from typing import Sequence

import torch
from detectron2.utils.logger import setup_logger

from mabn_det.config import load_config
from mabn_det.engine import Trainer

from .plots import plot_training_curves, save_predictions
from .shapes import (
    default_shapes_dir,
    generate_shapes_dataset,
    register_shapes_datasets,
    shapes_dataset_exists,
)

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def run_demo(config_file: str, output_dir: str, *, num_train: int, num_val: int,
             image_size: int = 128, seed: int = 0, style: str = "simple",
             opts: Sequence[str] = ()) -> dict:
    """Train `config_file` on the shapes set (generated first if missing) and report.

    Writes to `output_dir`: Detectron2's logs, metrics.json and checkpoints; `results.json` (COCO AP
    for boxes and masks, timing, device); `training_curves.png`; `predictions/*.png`.

    Args:
        config_file: a config training on shapes_train and testing on shapes_val.
        num_train, num_val, image_size, seed, style: the shapes set to use (or generate).
        opts: KEY VALUE overrides applied last.

    Returns:
        The evaluation results, {"bbox": {"AP": ...}, "segm": {...}}.
    """
    dataset_dir = default_shapes_dir()
    if not shapes_dataset_exists(dataset_dir, num_train=num_train, num_val=num_val,
                                 image_size=image_size, seed=seed, style=style):
        generate_shapes_dataset(dataset_dir, num_train, num_val, image_size, seed, style=style)
    register_shapes_datasets()

    cfg = load_config(config_file)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.OUTPUT_DIR = output_dir
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir)
    setup_logger(output_dir, name="mabn_det")
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    results = trainer.train()
    seconds = time.perf_counter() - start

    plot_training_curves({"MABN": output_dir}, os.path.join(output_dir, "training_curves.png"),
                         title=f"{os.path.basename(config_file)} on shapes ({cfg.MODEL.DEVICE})")
    trained = cfg.clone()
    trained.defrost()
    trained.MODEL.WEIGHTS = os.path.join(output_dir, "model_final.pth")
    save_predictions(trained, cfg.DATASETS.TEST[0], os.path.join(output_dir, "predictions"))
    summary = {
        # JSON has no NaN: metrics COCO cannot compute (no object of that size or class) are null.
        "results": {task: {k: None if math.isnan(v) else v for k, v in metrics.items()}
                    for task, metrics in results.items()},
        "train_seconds": round(seconds, 1),
        "iterations": cfg.SOLVER.MAX_ITER,
        "images_per_iteration": cfg.SOLVER.IMS_PER_BATCH,
        "device": torch.cuda.get_device_name() if cfg.MODEL.DEVICE == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "config_file": config_file,
    }
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("box AP %.1f, mask AP %.1f after %.0f s of training; pictures in %s",
                results["bbox"]["AP"], results["segm"]["AP"], seconds, output_dir)
    return results
