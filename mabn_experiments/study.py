"""The paper's comparison in miniature: the same detector, data, schedule and optimizer batch for
BN over 16 images, BN over 2, GN over 2, MABN over 2 (buffer 8 ⇒ statistics of 16 images) and MABN
over 2 with a buffer of 1 (no moving averages).

Each (arm, seed) trains in its own output directory, checkpointing at every evaluation, so an
interrupted run resumes exactly where it stopped; a finished run is summarised in one JSON file,
and the report (a Markdown table and a PNG of AP against iterations) is rebuilt from those files.
"""
import datetime
import glob
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase, hooks
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from mabn_det.config import load_config, set_key
from mabn_det.engine import Trainer
from mabn_det.engine.trainer import has_mabn
from mabn_det.modeling import supported_norm_keys

from .plots import plot_ap_curves, read_metrics
from .runs import code_commit, describe_machine, markdown_table, mean_and_std, run_as_completed
from .shapes import register_shapes_split

__all__ = ["ARMS", "Arm", "StudyRun", "configure_arm", "run_study", "train_run", "write_report"]

logger = logging.getLogger(__name__)


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

    @property
    def images_per_statistic(self) -> int:
        """Images whose activations make up one normalisation statistic (GN: each image alone)."""
        if self.norm == "GN":
            return 1
        return IMAGES_PER_STEP // self.micro_batches * (self.mabn_buffer or 1)


# Images per optimizer step in every arm (8 GPUs × 2 images in the paper).
IMAGES_PER_STEP = 16
ARMS: Dict[str, Arm] = {
    "BN@16": Arm("BN", micro_batches=1),  # what SyncBN computes over 8 GPUs × 2 images
    "BN@2": Arm("BN", micro_batches=8),
    "GN@2": Arm("GN", micro_batches=8),
    "MABN@2": Arm("MABN", micro_batches=8, mabn_buffer=8),
    # Centring and second-moment normalisation without the moving averages, the paper's idea.
    "MABN@2-buffer1": Arm("MABN", micro_batches=8, mabn_buffer=1),
}


def configure_arm(cfg: CfgNode, arm: Arm) -> None:
    """Set `arm`'s norms, micro-batches and MABN buffer in `cfg` (not frozen).

    MABN's warm-ups in the config count optimizer steps; the layer's counter advances once per
    forward, i.e. once per micro-batch, so they are multiplied by the micro-batches per step.
    """
    cfg.SOLVER.IMS_PER_BATCH = IMAGES_PER_STEP
    cfg.SOLVER.GRAD_ACCUMULATION_STEPS = arm.micro_batches
    for key in supported_norm_keys():
        set_key(cfg, key, arm.norm)
    if arm.mabn_buffer:
        cfg.MODEL.MABN.BUFFER_SIZE = arm.mabn_buffer
        cfg.MODEL.MABN.WARMUP_ITERS *= arm.micro_batches
        cfg.MODEL.MABN.RENORM_WARMUP_ITERS *= arm.micro_batches


EVALUATIONS_FILE = "evaluations.jsonl"


def coco_ap(results: Dict, task: str) -> float:
    """The COCO AP of `task` ("bbox" or "segm") in Detectron2's evaluation `results`."""
    # Detectron2 reports NaN when the model predicts nothing at all, which COCO would score 0.
    value = results[task]["AP"]
    return 0.0 if math.isnan(value) else round(float(value), 3)


class StudyEvaluation(HookBase):
    """COCO AP every `period` iterations and after the last, *before* that iteration's checkpoint,
    appended as one JSON line to `OUTPUT_DIR/evaluations.jsonl`: a checkpoint thus never precedes
    an evaluation it skipped, and a resumed run has every evaluation before its start.

    For a model with MABN2d and `precise_bn_batches` > 0, also the AP with PreciseBN statistics
    (`mabn_det.engine.precise_mabn_statistics`: evaluation only, the training is left untouched).
    """

    def __init__(self, cfg: CfgNode, precise_bn_batches: int):
        self._period = cfg.TEST.EVAL_PERIOD
        self._precise_cfg = None
        if precise_bn_batches:
            self._precise_cfg = cfg.clone()
            self._precise_cfg.defrost()
            self._precise_cfg.TEST.PRECISE_BN.ENABLED = True
            self._precise_cfg.TEST.PRECISE_BN.NUM_ITER = precise_bn_batches
            self._precise_cfg.freeze()

    def before_train(self):
        self._session = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._session_start = time.perf_counter()

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self._period and next_iter != self.trainer.max_iter:
            return
        cfg, model = self.trainer.cfg, self.trainer.model
        results = Trainer.test(cfg, model)
        record = {"iteration": next_iter, "bbox_AP": coco_ap(results, "bbox"),
                  "segm_AP": coco_ap(results, "segm")}
        if self._precise_cfg is not None and has_mabn(model):
            # Trainer.test restores every buffer and random generator after PreciseBN.
            precise = Trainer.test(self._precise_cfg, model)
            record.update(bbox_AP_precise_bn=coco_ap(precise, "bbox"),
                          segm_AP_precise_bn=coco_ap(precise, "segm"))
        self.trainer.storage.put_scalars(
            **{key.replace("_AP", "/AP"): value for key, value in record.items()
               if key != "iteration"}, smoothing_hint=False)
        record.update(session=self._session,
                      session_seconds=round(time.perf_counter() - self._session_start, 1))
        with open(os.path.join(cfg.OUTPUT_DIR, EVALUATIONS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class StudyTrainer(Trainer):
    """The Trainer with `StudyEvaluation` in place of Detectron2's EvalHook, before the
    checkpointer."""

    def __init__(self, cfg: CfgNode, precise_bn_batches: int):
        self.precise_bn_batches = precise_bn_batches  # build_hooks, called by __init__, reads it
        super().__init__(cfg)

    def build_hooks(self):
        ret = [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]
        at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer))
        ret.insert(at, StudyEvaluation(self.cfg, self.precise_bn_batches))
        return ret


@dataclass(frozen=True)
class StudyRun:
    """One (arm, seed) of the study and where it trains.

    Attributes:
        opts: KEY VALUE overrides applied after the arm's settings.
        threads: torch threads of the run's process.
        precise_bn_batches: training batches of the PreciseBN evaluation of MABN arms; 0 for none.
    """

    arm: str
    seed: int
    config_file: str
    dataset_dir: str
    output_dir: str
    opts: Sequence[str]
    threads: int
    precise_bn_batches: int

    @property
    def name(self) -> str:
        return f"{self.arm}_seed{self.seed}"


def study_config(run: StudyRun) -> CfgNode:
    """The frozen config of `run` (the study's datasets must be registered to build from it)."""
    cfg = load_config(run.config_file)
    configure_arm(cfg, ARMS[run.arm])
    cfg.merge_from_list(["DATASETS.TRAIN", "('study_train',)", "DATASETS.TEST", "('study_val',)",
                         "SEED", str(run.seed), "OUTPUT_DIR", run.output_dir,
                         "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu",
                         *run.opts])
    cfg.freeze()
    return cfg


def train_run(run: StudyRun) -> Dict:
    """Train and evaluate one (arm, seed) in the current (worker) process, resuming from the last
    checkpoint in its output directory if there is one; returns its record (see `run_record`)."""
    torch.set_num_threads(run.threads)
    for split in ("train", "val"):
        register_shapes_split(f"study_{split}", run.dataset_dir, split)
    cfg = study_config(run)
    os.makedirs(run.output_dir, exist_ok=True)
    setup_logger(run.output_dir)
    setup_logger(run.output_dir, name="mabn_det")
    with open(os.path.join(run.output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    # The weights' initialisation too depends on the seed alone (as Detectron2's default_setup
    # makes it).
    seed_all_rng(cfg.SEED)
    trainer = StudyTrainer(cfg, run.precise_bn_batches)
    trainer.resume_or_load(resume=True)
    trainer.train()
    return run_record(run, cfg)


def read_evaluations(output_dir: str) -> List[Dict]:
    """The evaluations of `output_dir/evaluations.jsonl` by iteration, the last of each iteration
    (a resumed run repeats those made after its checkpoint, with equal results)."""
    with open(os.path.join(output_dir, EVALUATIONS_FILE)) as f:
        by_iteration = {r["iteration"]: r for r in map(json.loads, filter(str.strip, f))}
    return [by_iteration[i] for i in sorted(by_iteration)]


# MABNDiagnostics scalars copied into the record at every evaluation of an MABN arm.
MABN_DIAGNOSTICS = ("mabn/renorm_mean", "mabn/renorm_clipped", "mabn/chi_ratio_max")


def run_record(run: StudyRun, cfg: CfgNode) -> Dict:
    """What one finished run contributes to the study: its AP at every evaluation, its time and
    settings. Everything but the command line (added by `run_study`)."""
    evaluations = read_evaluations(run.output_dir)
    sessions: Dict[str, float] = {}
    for record in evaluations:
        sessions[record["session"]] = max(sessions.get(record["session"], 0.0),
                                          record["session_seconds"])
    metrics = read_metrics(run.output_dir)
    eval_iterations = {r["iteration"] for r in evaluations}
    diagnostics = [{"iteration": m["iteration"] + 1, **{k: m[k] for k in MABN_DIAGNOSTICS}}
                   for m in metrics if m["iteration"] + 1 in eval_iterations
                   and all(k in m for k in MABN_DIAGNOSTICS)]
    arm = ARMS[run.arm]
    final = evaluations[-1]
    return {
        "arm": run.arm, "seed": run.seed, "norm": arm.norm, "micro_batches": arm.micro_batches,
        "mabn_buffer": arm.mabn_buffer, "images_per_statistic": arm.images_per_statistic,
        "images_per_step": IMAGES_PER_STEP, "iterations": cfg.SOLVER.MAX_ITER,
        **{k: v for k, v in final.items() if "_AP" in k},
        "evaluations": [{k: v for k, v in r.items() if k == "iteration" or "_AP" in k}
                        for r in evaluations],
        "mabn_diagnostics": diagnostics,
        # The sessions' times up to their last evaluation: what a resumed run did twice is counted
        # once, the time lost after an interrupted session's last evaluation not at all.
        "wall_seconds": round(sum(sessions.values()), 1),
        "seconds_per_iteration": round(statistics.median(m["time"] for m in metrics if "time" in m),
                                       3),
        "threads": run.threads,
        "machine": describe_machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "config_file": os.path.relpath(run.config_file, _REPO),
        "opts": list(run.opts),
        "dataset": os.path.basename(run.dataset_dir),
        "code_commit": code_commit(_REPO),
    }


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def result_path(results_dir: str, arm: str, seed: int) -> str:
    """Where the record of (arm, seed) is kept."""
    return os.path.join(results_dir, "runs", f"{arm}_seed{seed}.json")


def run_study(runs: Sequence[StudyRun], results_dir: str, jobs: int, command: str,
              on_result=None) -> List[Dict]:
    """Train every run of `runs` whose record is not in `results_dir` yet, `jobs` at a time, each in
    a fresh process; as each finishes, write its record (with `command`), rebuild the report and
    call `on_result(paths written)`. Returns the new records."""
    todo = [r for r in runs if not os.path.exists(result_path(results_dir, r.arm, r.seed))]
    for run in runs:
        if run not in todo:
            logger.info("%s: finished earlier (%s), skipped", run.name,
                        result_path(results_dir, run.arm, run.seed))
    records = []
    for index, record in run_as_completed(train_run, todo, jobs, desc="study runs"):
        record["command"] = command
        path = result_path(results_dir, record["arm"], record["seed"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        report = write_report(results_dir)
        if on_result is not None:
            on_result(record, [path, *report])
        records.append(record)
    return records


def read_records(results_dir: str) -> List[Dict]:
    """Every run record in `results_dir`, in ARMS then seed order."""
    records = []
    for path in glob.glob(os.path.join(results_dir, "runs", "*.json")):
        with open(path) as f:
            records.append(json.load(f))
    order = list(ARMS)
    return sorted(records, key=lambda r: (order.index(r["arm"]), r["seed"]))


def _mean_cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_and_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f} (1 seed)"


# BN@2 must trail BN@16 by at least this much box AP for the data to rank norms.
CALIBRATION_GAP = 3.0
CALIBRATION_TARGET = 40.0


def _calibration(by_arm: Dict[str, List[Dict]]) -> str:
    big, small = by_arm.get("BN@16", []), by_arm.get("BN@2", [])
    if not big or not small:
        return "Calibration: waiting for BN@16 and BN@2."
    big_ap, small_ap = (statistics.fmean(r["bbox_AP"] for r in rs) for rs in (big, small))
    reaches = big_ap >= CALIBRATION_TARGET
    separates = big_ap - small_ap >= CALIBRATION_GAP
    verdict = ("the data can rank norms" if reaches and separates else
               "the data cannot rank norms yet: " + (
                   f"BN@16 is below {CALIBRATION_TARGET:.0f} box AP" if not reaches else
                   f"BN@2 trails BN@16 by less than {CALIBRATION_GAP:.0f} box AP"))
    return (f"Calibration (BN@16 ≥ {CALIBRATION_TARGET:.0f} box AP, BN@2 ≥ "
            f"{CALIBRATION_GAP:.0f} below it): BN@16 {big_ap:.1f}, BN@2 {small_ap:.1f} box AP "
            f"(means over {len(big)} and {len(small)} seeds): {verdict}.")


def _precise_bn_effect_table(by_arm: Dict[str, List[Dict]], iterations: Sequence[int]) -> str:
    rows = []
    for arm, runs in by_arm.items():
        effects: Dict[int, List[float]] = {}
        for run in runs:
            for e in run["evaluations"]:
                if "bbox_AP_precise_bn" in e:
                    effects.setdefault(e["iteration"], []).append(
                        e["bbox_AP_precise_bn"] - e["bbox_AP"])
        if not effects:
            continue
        cells = []
        for it in iterations:
            values = effects.get(it, [])
            if len(values) < len(runs):
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values[0]:+.1f}")
            else:
                cells.append(f"{statistics.fmean(values):+.1f} ({min(values):+.1f}, "
                             f"{max(values):+.1f})")
        rows.append([arm, len(runs), *cells])
    return markdown_table(["arm", "seeds", *map(str, iterations)], rows)


REPORT_FILES = ("results.md", "ap_curves.png")


def write_report(results_dir: str) -> List[str]:
    """Rebuild `results_dir/results.md` (tables) and `ap_curves.png` (AP against iterations, mean
    and spread per arm) from the run records. Returns the paths written."""
    records = read_records(results_dir)
    by_arm: Dict[str, List[Dict]] = {}
    for record in records:
        by_arm.setdefault(record["arm"], []).append(record)
    rows, precise_rows = [], []
    for arm, runs in by_arm.items():
        rows.append([arm, ARMS[arm].norm, ARMS[arm].images_per_statistic,
                     _mean_cell([r["bbox_AP"] for r in runs]),
                     _mean_cell([r["segm_AP"] for r in runs]),
                     ", ".join(f"{r['bbox_AP']:.1f}" for r in runs),
                     ", ".join(str(r["seed"]) for r in runs),
                     f"{statistics.fmean(r['seconds_per_iteration'] for r in runs):.2f}"])
        if all("bbox_AP_precise_bn" in r for r in runs):
            precise_rows.append([arm, ", ".join(str(r["seed"]) for r in runs),
                                 *(_mean_cell([r[k] for r in runs]) for k in (
                                     "bbox_AP", "bbox_AP_precise_bn", "segm_AP",
                                     "segm_AP_precise_bn"))])
    sample = records[0] if records else {}
    lines = [
        "# The norm study: results so far",
        "",
        "Written by `tools/compare_norms.py` from the run records in `runs/` (rebuild with "
        "`--report-only`). Every arm: the same Mask R-CNN R18-FPN, data, schedule and optimizer "
        f"batch of {IMAGES_PER_STEP} images; \"@2\" arms accumulate 8 micro-batches of 2 images.",
        "",
        _calibration(by_arm),
        "",
        f"Final COCO AP on the validation set ({sample.get('iterations', '?')} iterations; "
        "mean ± sample std over seeds):",
        "",
        markdown_table(["arm", "norm", "images per statistic", "box AP", "mask AP",
                        "box AP per seed", "seeds", "s/iteration"], rows),
    ]
    curve_rows = []
    for arm, runs in by_arm.items():
        points = {}
        for run in runs:
            for e in run["evaluations"]:
                points.setdefault(e["iteration"], []).append(e["bbox_AP"])
        curve_rows.append((arm, {it: statistics.fmean(v) for it, v in points.items()
                                 if len(v) == len(runs)}))
    iterations = sorted({it for _, curve in curve_rows for it in curve})
    lines += ["", "Box AP at each evaluation (mean over the arm's seeds):", "",
              markdown_table(["arm", *map(str, iterations)],
                             [[arm, *(f"{curve[it]:.1f}" if it in curve else "–"
                                      for it in iterations)] for arm, curve in curve_rows])]
    if precise_rows:
        lines += ["", "MABN arms evaluated with their moving-average statistics and with PreciseBN "
                  "statistics (evaluation only; the training is the same run):", "",
                  markdown_table(["arm", "seeds", "box AP", "box AP, PreciseBN", "mask AP",
                                  "mask AP, PreciseBN"], precise_rows),
                  "", "PreciseBN's effect at each evaluation: box AP with PreciseBN statistics "
                  "minus box AP with the moving-average statistics, mean over seeds (lowest, "
                  "highest):", "", _precise_bn_effect_table(by_arm, iterations)]
    commands = sorted({r.get("command", "?") for r in records})
    lines += ["", "The runs (wall time: the training with its evaluations, summed over the "
              "sessions of a resumed run; the machine may have been busy with other work, which "
              "changes times but not results):", "",
              markdown_table(["arm", "seed", "date", "machine", "threads", "wall time",
                              "s/iteration", "code"],
                             [[r["arm"], r["seed"], r["date"], r["machine"], r["threads"],
                               f"{r['wall_seconds'] / 60:.0f} min",
                               f"{r['seconds_per_iteration']:.2f}",
                               (r.get("code_commit") or "–")[:12]] for r in records]),
              "", "Command: " + ", ".join(f"`{c}`" for c in commands) + ".", "",
              "![AP against iterations](ap_curves.png)", ""]
    paths = [os.path.join(results_dir, name) for name in REPORT_FILES]
    with open(paths[0], "w") as f:
        f.write("\n".join(lines))
    plot_ap_curves({arm: [r["evaluations"] for r in runs] for arm, runs in by_arm.items()},
                   paths[1], "AP against iterations (line: mean over seeds; band: min to max)")
    return paths
