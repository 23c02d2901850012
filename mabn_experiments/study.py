"""The paper's comparison in miniature: the same detector, data, schedule and optimizer batch for
BN over 16 images, BN over 2, GN over 2 and MABN over 2 (buffer 8 ⇒ statistics of 16 images)."""
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.utils.logger import setup_logger

from mabn_det.config import MABN_NORM_SITES, load_config, set_key
from mabn_det.engine import Trainer

from .plots import bar_chart, plot_training_curves
from .runs import markdown_table, mean_and_std, run_in_processes, threads_per_job
from .shapes import register_shapes_split

__all__ = ["ARMS", "Arm", "configure_arm", "run_study", "summarise"]


@dataclass(frozen=True)
class Arm:
    """One normalisation setting of the study.

    Attributes:
        norm: the NORM of backbone, FPN, box and mask heads.
        micro_batches: forwards per optimizer step; each normalises SOLVER.IMS_PER_BATCH /
            micro_batches images on its own, as that many GPUs without synchronisation would.
        mabn_buffer: MODEL.MABN.BUFFER_SIZE (MABN arms only).
    """

    norm: str
    micro_batches: int
    mabn_buffer: int | None = None


ARMS: Dict[str, Arm] = {
    "BN@16": Arm("BN", micro_batches=1),
    "BN@2": Arm("BN", micro_batches=8),
    "GN@2": Arm("GN", micro_batches=8),
    "MABN@2": Arm("MABN", micro_batches=8, mabn_buffer=8),
}


# Images per optimizer step in every arm (8 GPUs × 2 images in the paper).
IMAGES_PER_STEP = 16


def configure_arm(cfg: CfgNode, arm: Arm) -> None:
    """Set `arm`'s norms and micro-batches in `cfg` (not frozen).

    MABN's warm-ups in the config count optimizer steps; the layer's counter advances once per
    forward, so they are multiplied by the number of micro-batches.
    """
    cfg.SOLVER.IMS_PER_BATCH = IMAGES_PER_STEP
    cfg.SOLVER.GRAD_ACCUMULATION_STEPS = arm.micro_batches
    for key in MABN_NORM_SITES:
        set_key(cfg, key, arm.norm)
    if arm.mabn_buffer:
        cfg.MODEL.MABN.BUFFER_SIZE = arm.mabn_buffer
        cfg.MODEL.MABN.WARMUP_ITERS *= arm.micro_batches
        cfg.MODEL.MABN.RENORM_WARMUP_ITERS *= arm.micro_batches


@dataclass(frozen=True)
class StudyRun:
    arm: str
    seed: int
    config_file: str
    dataset_dir: str
    output_dir: str
    opts: Sequence[str]
    threads: int


def _run_one(run: StudyRun) -> Dict:
    """Train and evaluate one (arm, seed) in the current (worker) process."""
    torch.set_num_threads(run.threads)
    for split in ("train", "val"):
        register_shapes_split(f"study_{split}", run.dataset_dir, split)
    cfg = load_config(run.config_file)
    configure_arm(cfg, ARMS[run.arm])
    cfg.merge_from_list(["DATASETS.TRAIN", "('study_train',)", "DATASETS.TEST", "('study_val',)",
                         "SEED", str(run.seed), "OUTPUT_DIR", run.output_dir,
                         "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu",
                         *run.opts])
    cfg.freeze()
    os.makedirs(run.output_dir, exist_ok=True)
    setup_logger(run.output_dir)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    # Detectron2 reports NaN when the model predicts nothing at all, which COCO would score 0.
    record = {"arm": run.arm, "seed": run.seed,
              **{f"{task}_AP": 0.0 if math.isnan(results[task]["AP"]) else results[task]["AP"]
                 for task in ("bbox", "segm")}}
    with open(os.path.join(run.output_dir, "result.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def run_study(config_file: str, dataset_dir: str, out_root: str, arms: Sequence[str],
              seeds: Sequence[int], opts: Sequence[str], jobs: int) -> List[Dict]:
    """Train every (arm, seed), `jobs` at a time, each in a fresh process; returns their records.

    Each run writes `out_root/<arm>/seed<k>/` (logs, metrics.json, result.json), so runs made in
    separate invocations merge in `summarise`.
    """
    runs = [StudyRun(arm, seed, config_file, dataset_dir,
                     os.path.join(out_root, arm, f"seed{seed}"),
                     list(opts), threads_per_job(jobs))
            for seed in seeds for arm in arms]
    return run_in_processes(_run_one, runs, jobs, desc="study runs")


def summarise(out_root: str, title: str) -> str:
    """Aggregate every `out_root/*/seed*/result.json`: Markdown table (also written to
    `out_root/results.md`), AP bar charts and loss/AP curves as PNGs. Returns the table."""
    records = []
    for arm in ARMS:
        arm_dir = os.path.join(out_root, arm)
        for seed_dir in sorted(os.listdir(arm_dir)) if os.path.isdir(arm_dir) else []:
            path = os.path.join(arm_dir, seed_dir, "result.json")
            if os.path.exists(path):
                with open(path) as f:
                    records.append(json.load(f))
    arms = [a for a in ARMS if any(r["arm"] == a for r in records)]
    rows, means = [], {}
    for arm in arms:
        runs = [r for r in records if r["arm"] == arm]
        cells = []
        for key in ("bbox_AP", "segm_AP"):
            mean, std = mean_and_std([r[key] for r in runs])
            means.setdefault(key, []).append((mean, std))
            cells.append(f"{mean:.1f} ± {std:.1f}")
        spec = ARMS[arm]
        per_norm = IMAGES_PER_STEP // spec.micro_batches * (spec.mabn_buffer or 1)
        rows.append([arm, spec.norm, per_norm, *cells, ", ".join(str(r["seed"]) for r in runs)])
    table = f"### {title}\n\n" + markdown_table(
        ["arm", "norm", "images per norm", "box AP", "mask AP", "seeds"], rows) + "\n"
    with open(os.path.join(out_root, "results.md"), "w") as f:
        f.write(table)
    for key, label in (("bbox_AP", "box AP"), ("segm_AP", "mask AP")):
        if key in means:
            bar_chart(arms, [m for m, _ in means[key]], [s for _, s in means[key]],
                      f"COCO {label} (mean ± std over seeds)",
                      os.path.join(out_root, f"{key}.png"), title)
    first_seed = {arm: os.path.join(out_root, arm, sorted(os.listdir(os.path.join(out_root, arm)))[0])
                  for arm in arms}
    plot_training_curves(first_seed, os.path.join(out_root, "curves.png"), title)
    return table
