"""Pictures of a training run: curves from Detectron2's metrics.json and predictions on images."""
import json
import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import ColorMode, Visualizer
# A bare Figure renders to files without pyplot, so no GUI backend is chosen for the process.
from matplotlib.figure import Figure

__all__ = ["MASK_RCNN_LOSSES", "bar_chart", "plot_ap_curves", "plot_training_curves",
           "read_metrics", "save_predictions", "save_with_legends"]


def read_metrics(output_dir: str) -> List[Dict]:
    """The records of `output_dir/metrics.json` (one JSON object per line, as JSONWriter writes)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: List[Dict], key: str):
    points = [(r["iteration"], r[key]) for r in records if key in r]
    return tuple(np.array(v) for v in zip(*points)) if points else (np.array([]), np.array([]))


# The losses Detectron2's Mask R-CNN logs to metrics.json, the sum first.
MASK_RCNN_LOSSES = ("total_loss", "loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls",
                    "loss_rpn_loc")


def plot_training_curves(runs: Dict[str, str], png_path: str, title: str = "",
                         losses: Sequence[str] = ("total_loss",)) -> Figure:
    """Losses and COCO AP against iteration for one or several runs.

    Args:
        runs: label → output directory holding a metrics.json.
        png_path: where to write the figure.
        losses: metrics.json keys drawn in the loss panel, a line per run and key; keys a run
            did not log are skipped.

    Returns:
        The figure written: axes[0] the losses, axes[1] the AP points.
    """
    fig = Figure(figsize=(11, 4))
    loss_ax, ap_ax = fig.subplots(1, 2)
    for label, output_dir in runs.items():
        records = read_metrics(output_dir)
        lines = [loss_ax.plot(*_series(records, key), label=f"{label} {key}", alpha=0.85)[0]
                 for key in losses if _series(records, key)[0].size]
        colour = lines[0].get_color() if lines else None
        for key, style in (("bbox/AP", "-o"), ("segm/AP", "--s")):
            it, ap = _series(records, key)
            if len(it):
                ap_ax.plot(it, ap, style, color=colour, label=f"{label} {key}")
                for x, y in zip(it, ap):
                    ap_ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 5),
                                   ha="center", fontsize=7)
    loss_ax.set(xlabel="iteration", ylabel="loss (median of 20 iterations)", yscale="log")
    ap_ax.set(xlabel="iteration", ylabel="COCO AP (val)")
    return save_with_legends(fig, (loss_ax, ap_ax), png_path, title, legend_size=7)


def save_predictions(cfg, dataset_name: str, out_dir: str, count: int = 6,
                     score_threshold: float = 0.3) -> List[str]:
    """Draw ground truth and the model's predictions side by side on the first `count` images.

    Each picture has two panels of the same image: the annotated objects on the left, the
    predictions with score ≥ `score_threshold` on the right, each labelled with its class name
    (and score).

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
        # Four times the size: the shapes images are small. SEGMENTATION mode gives each class
        # one colour in both panels, so a class mix-up shows as a colour change.
        panels = [Visualizer(image[:, :, ::-1], metadata, scale=4.0,
                             instance_mode=ColorMode.SEGMENTATION) for _ in range(2)]
        truth = panels[0].draw_dataset_dict(record).get_image()
        predicted = panels[1].draw_instance_predictions(instances).get_image()
        fig = Figure(figsize=(2 * truth.shape[1] / 100, truth.shape[0] / 100 + 0.4))
        for ax, panel, heading in zip(
                fig.subplots(1, 2), (truth, predicted),
                ("ground truth", f"prediction (score ≥ {score_threshold:g})")):
            ax.imshow(panel)
            ax.set_title(heading, fontsize=10)
            ax.axis("off")
        fig.tight_layout(pad=0.3)
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = os.path.join(out_dir, stem + ".png")
        fig.savefig(path, dpi=100)
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


def plot_ap_curves(runs_by_label: Dict[str, List[List[Dict]]], png_path: str,
                   title: str = "") -> Figure:
    """Box AP (and mask AP, where every evaluation has it) against iterations: per label, the mean
    over its runs and their range.

    Args:
        runs_by_label: label → one list per run of evaluations, each a dict with "iteration",
            "bbox_AP" and possibly "segm_AP" (and, drawn dashed, "bbox_AP_precise_bn" and
            "segm_AP_precise_bn" where every evaluation has them). Iterations that not every run
            of a label reached are left out of its curve.
        png_path: where to write the figure.

    Returns:
        The figure written: axes[0] box AP, axes[1] mask AP if drawn.
    """
    evaluations = [e for runs in runs_by_label.values() for run in runs for e in run]
    tasks = [(key, name) for key, name in (("bbox_AP", "box AP"), ("segm_AP", "mask AP"))
             if all(key in e for e in evaluations)]
    fig = Figure(figsize=(5.5 * len(tasks), 4))
    axes = np.atleast_1d(fig.subplots(1, len(tasks)))
    for label, runs in runs_by_label.items():
        common = sorted(set.intersection(*({e["iteration"] for e in run} for run in runs)))
        for ax, (key, _) in zip(axes, tasks):
            values = np.array([[next(e[key] for e in run if e["iteration"] == it) for it in common]
                               for run in runs])
            line = ax.plot(common, values.mean(0), "-o", markersize=3,
                           label=f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")[0]
            if len(runs) > 1:
                ax.fill_between(common, values.min(0), values.max(0), color=line.get_color(),
                                alpha=0.2)
            precise_key = f"{key}_precise_bn"
            if all(precise_key in e for run in runs for e in run):
                precise = np.array([[next(e[precise_key] for e in run if e["iteration"] == it)
                                     for it in common] for run in runs])
                ax.plot(common, precise.mean(0), "--", color=line.get_color(),
                        label=f"{label}, PreciseBN statistics")
    for ax, (_, name) in zip(axes, tasks):
        ax.set(xlabel="iteration (optimizer step)", ylabel=f"COCO {name} (val)")
    return save_with_legends(fig, axes, png_path, title, legend_size=8)


def save_with_legends(fig, axes, png_path: str, title: str, legend_size: int):
    """Grid and legend on every axis of `axes`, `title` above them; `fig` saved to `png_path`."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return fig
