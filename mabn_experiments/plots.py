"""Pictures of a training run: curves from Detectron2's metrics.json and predictions on images."""
import json
import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer
# A bare Figure renders to files without pyplot, so no GUI backend is chosen for the process.
from matplotlib.figure import Figure

__all__ = ["bar_chart", "read_metrics", "plot_training_curves", "save_predictions"]


def read_metrics(output_dir: str) -> List[Dict]:
    """The records of `output_dir/metrics.json` (one JSON object per line, as JSONWriter writes)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: List[Dict], key: str):
    points = [(r["iteration"], r[key]) for r in records if key in r]
    return tuple(np.array(v) for v in zip(*points)) if points else (np.array([]), np.array([]))


def plot_training_curves(runs: Dict[str, str], png_path: str, title: str = "") -> None:
    """Loss and COCO AP against iteration for one or several runs.

    Args:
        runs: label → output directory holding a metrics.json.
        png_path: where to write the figure.
    """
    fig = Figure(figsize=(11, 4))
    loss_ax, ap_ax = fig.subplots(1, 2)
    for label, output_dir in runs.items():
        records = read_metrics(output_dir)
        line, = loss_ax.plot(*_series(records, "total_loss"), label=label, alpha=0.85)
        for key, style in (("bbox/AP", "-o"), ("segm/AP", "--s")):
            it, ap = _series(records, key)
            if len(it):
                ap_ax.plot(it, ap, style, color=line.get_color(), label=f"{label} {key}")
    loss_ax.set(xlabel="iteration", ylabel="total loss (median of 20 iterations)", yscale="log")
    ap_ax.set(xlabel="iteration", ylabel="COCO AP (val)")
    for ax in (loss_ax, ap_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def save_predictions(cfg, dataset_name: str, out_dir: str, count: int = 6,
                     score_threshold: float = 0.3) -> List[str]:
    """Draw the model's predictions on the first `count` images of `dataset_name`.

    Args:
        cfg: a config whose MODEL.WEIGHTS points at the trained model.

    Returns:
        The paths of the written PNGs.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(dataset_name)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for record in DatasetCatalog.get(dataset_name)[:count]:
        image = read_image(record["file_name"], format="BGR")
        with torch.no_grad():
            instances = predictor(image)["instances"].to("cpu")
        # Three times the size: the shapes images are small.
        drawn = Visualizer(image[:, :, ::-1], metadata, scale=3.0).draw_instance_predictions(instances)
        path = os.path.join(out_dir, os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png")
        drawn.save(path)
        paths.append(path)
    return paths


def bar_chart(labels: Sequence[str], means: Sequence[float], stds: Sequence[float], ylabel: str,
              png_path: str, title: str = "", zoom: bool = False) -> None:
    """A bar per label with a ±std error bar.

    Args:
        zoom: start the axis just below the smallest bar instead of at 0, for values that differ
            by a few percent (accuracies).
    """
    fig = Figure(figsize=(1.4 * len(labels) + 2, 3.6))
    ax = fig.subplots()
    ax.bar(labels, means, yerr=stds, capsize=6, color="#4C72B0")
    if zoom:
        ax.set_ylim(min(means) - 5, max(means) + 3)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
