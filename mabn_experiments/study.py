"""The paper's comparison in miniature: the same detector, data, schedule and optimizer batch for
BN over 16 images, BN over 2, GN over 2, MABN over 2 (buffer 8 ⇒ statistics of 16 images) and MABN
over 2 with a buffer of 1 (no moving averages), in each condition of `conditions.CONDITIONS`.

Each (condition, arm, seed) trains in its own output directory, checkpointing at every evaluation,
so an interrupted run resumes exactly where it stopped; a finished run is summarised in one JSON
record that names the code commit it ran and the command that re-runs it (`study_report` builds
the report from the records).
"""
import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase, hooks
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from mabn_det.bn_checkpoint import convert_bn_checkpoint
from mabn_det.config import load_config, set_key
from mabn_det.engine import Trainer
from mabn_det.engine.trainer import has_mabn
from mabn_det.modeling import supported_norm_keys

from .conditions import register_dataset
from .plots import read_metrics
from .runs import code_commit, describe_machine, run_as_completed

__all__ = ["ARMS", "Arm", "StudyRun", "configure_arm", "differing_results", "extract_backbone",
           "read_evaluations", "result_path", "run_study", "study_config", "train_run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    """One normalisation setting of the study.

    Attributes:
        norm: the NORM of the backbone, and of the FPN, box and mask heads unless `head_norm`.
            "FrozenBN" also freezes the stem and res2, as Detectron2 ships a pretrained backbone.
        micro_batches: forwards per optimizer step; each normalises SOLVER.IMS_PER_BATCH /
            micro_batches images on its own, as that many GPUs without synchronisation would.
        mabn_buffer: MODEL.MABN.BUFFER_SIZE (arms with MABN only).
        head_norm: the NORM of the FPN, box and mask heads when it differs from `norm` ("": none).
        init: "scratch"; or the pretrained BN backbone of the condition's source run: "bn" loaded
            as it is, "converted" by `convert_bn_checkpoint` (exact; the filter and BN means fade
            over `PRETRAINED_FADE_STEPS`), "centred" with its filters simply centred (the MABN
            authors' way, not exact).
    """

    norm: str
    micro_batches: int
    mabn_buffer: int | None = None
    head_norm: str | None = None
    init: str = "scratch"

    @property
    def images_per_statistic(self) -> int | None:
        """Images whose activations make up one trained normalisation statistic (GN: each image
        alone; None when no layer trains a statistic)."""
        norm = self.head_norm if self.norm == "FrozenBN" else self.norm
        if not norm or norm == "FrozenBN":
            return None
        if norm == "GN":
            return 1
        return IMAGES_PER_STEP // self.micro_batches * (self.mabn_buffer if norm == "MABN" else 1)


# Images per optimizer step in every arm (8 GPUs × 2 images in the paper).
IMAGES_PER_STEP = 16
ARMS: Dict[str, Arm] = {
    "BN@16": Arm("BN", micro_batches=1),  # what SyncBN computes over 8 GPUs × 2 images
    "BN@2": Arm("BN", micro_batches=8),
    "GN@2": Arm("GN", micro_batches=8),
    "MABN@2": Arm("MABN", micro_batches=8, mabn_buffer=8),
    # Centring and second-moment normalisation without the moving averages, the paper's idea.
    "MABN@2-buffer1": Arm("MABN", micro_batches=8, mabn_buffer=1),
    # From a pretrained BN backbone: Detectron2's usual recipe (FrozenBN backbone, no norm in the
    # FPN and heads), MABN in the FPN and heads only, MABN everywhere converted exactly or with
    # the filters simply centred, and BN over 2 images everywhere.
    "FrozenBN": Arm("FrozenBN", micro_batches=8, head_norm="", init="bn"),
    "FrozenBN+MABN@2": Arm("FrozenBN", micro_batches=8, mabn_buffer=8, head_norm="MABN",
                           init="bn"),
    "MABN@2-converted": Arm("MABN", micro_batches=8, mabn_buffer=8, init="converted"),
    "MABN@2-centred": Arm("MABN", micro_batches=8, mabn_buffer=8, init="centred"),
    "BN@2-pretrained": Arm("BN", micro_batches=8, init="bn"),
}
# Optimizer steps over which a converted checkpoint's filter and BN means fade to zero.
PRETRAINED_FADE_STEPS = 100


def configure_arm(cfg: CfgNode, arm: Arm) -> None:
    """Set `arm`'s norms, micro-batches and MABN buffer in `cfg` (not frozen).

    MABN's warm-ups in the config count optimizer steps; the layer's counter advances once per
    forward, i.e. once per micro-batch, so they are multiplied by the micro-batches per step.
    """
    cfg.SOLVER.IMS_PER_BATCH = IMAGES_PER_STEP
    cfg.SOLVER.GRAD_ACCUMULATION_STEPS = arm.micro_batches
    for key in supported_norm_keys():
        head = arm.head_norm is not None and key != "MODEL.RESNETS.NORM"
        set_key(cfg, key, arm.head_norm if head else arm.norm)
    if arm.norm == "FrozenBN":
        cfg.MODEL.BACKBONE.FREEZE_AT = 2
    if arm.mabn_buffer:
        cfg.MODEL.MABN.BUFFER_SIZE = arm.mabn_buffer
        cfg.MODEL.MABN.WARMUP_ITERS *= arm.micro_batches
        cfg.MODEL.MABN.RENORM_WARMUP_ITERS *= arm.micro_batches


EVALUATIONS_FILE = "evaluations.jsonl"


def coco_aps(results: Dict, suffix: str = "") -> Dict[str, float]:
    """{"bbox_AP" (and "segm_AP" for a model with masks) + suffix: COCO AP} of Detectron2's
    evaluation `results`."""
    # Detectron2 reports NaN when the model predicts nothing at all, which COCO would score 0.
    return {f"{task}_AP{suffix}": 0.0 if math.isnan(results[task]["AP"]) else
            round(float(results[task]["AP"]), 3) for task in ("bbox", "segm") if task in results}


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
        record = {"iteration": next_iter, **coco_aps(Trainer.test(cfg, model))}
        if self._precise_cfg is not None and has_mabn(model):
            # Trainer.test restores every buffer and random generator after PreciseBN.
            record.update(coco_aps(Trainer.test(self._precise_cfg, model), "_precise_bn"))
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
    """One (condition, arm, seed) of the study and where it trains.

    Attributes:
        data: what `dataset_dir` holds, as `Condition.data` says ("trees" or a shapes style).
        opts: KEY VALUE overrides applied after the arm's settings.
        threads: torch threads of the run's process (results depend on it, in the last bits).
        precise_bn_batches: training batches of the PreciseBN evaluation of MABN arms; 0 for none.
        command: the command line, relative to the repository, that re-runs exactly this run.
        pretrained_backbone: for an arm that starts from a pretrained BN backbone, a Detectron2
            checkpoint of it (`extract_backbone`).
    """

    condition: str
    arm: str
    seed: int
    config_file: str
    data: str
    dataset_dir: str
    output_dir: str
    opts: Sequence[str]
    threads: int
    precise_bn_batches: int
    command: str = ""
    pretrained_backbone: str = ""

    @property
    def name(self) -> str:
        return f"{self.condition}/{self.arm}_seed{self.seed}"


def initial_weights(run: StudyRun) -> str:
    """MODEL.WEIGHTS of `run`: "" from scratch, the pretrained backbone itself, or the converted
    checkpoint that `train_run` writes into the run's directory."""
    init = ARMS[run.arm].init
    if init == "scratch":
        return ""
    if not run.pretrained_backbone:
        raise ValueError(f"arm {run.arm} starts from a pretrained backbone, but its run names none")
    return run.pretrained_backbone if init == "bn" else os.path.join(run.output_dir,
                                                                     "initial_weights.pth")


def study_config(run: StudyRun) -> CfgNode:
    """The frozen config of `run` (the study's datasets must be registered to build from it)."""
    cfg = load_config(run.config_file)
    configure_arm(cfg, ARMS[run.arm])
    cfg.merge_from_list(["DATASETS.TRAIN", "('study_train',)", "DATASETS.TEST", "('study_val',)",
                         "SEED", str(run.seed), "OUTPUT_DIR", run.output_dir,
                         "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu",
                         "MODEL.WEIGHTS", initial_weights(run), *run.opts])
    cfg.freeze()
    return cfg


def extract_backbone(checkpoint: str, out: str) -> str:
    """Write the bottom-up ResNet of a Detectron2 `checkpoint` alone to `out`, as an ImageNet
    checkpoint holds it (the FPN and heads of the source task stay behind). Returns `out`."""
    model = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    backbone = {k: v for k, v in model.items() if k.startswith("backbone.bottom_up.")}
    if not backbone:
        raise ValueError(f"{checkpoint} holds no backbone.bottom_up.* tensor")
    torch.save({"model": backbone}, out)
    return out


# Holds the torch thread count a run started with, in its output directory.
THREADS_FILE = "threads.txt"


def started_threads(output_dir: str) -> int | None:
    """The torch thread count of the run that started in `output_dir`, or None if none did."""
    path = os.path.join(output_dir, THREADS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(f.read())


# Held locked by the process that trains in a run's output directory.
LOCK_FILE = "training.lock"


@contextlib.contextmanager
def exclusive_output_dir(output_dir: str) -> Iterator[None]:
    """Hold `output_dir` (created if needed) for this process alone while the block runs.

    Two processes resuming the same run would both append to its logs, metrics and evaluations
    and overwrite each other's checkpoints: a queue started twice, or a worker left running after
    its queue was killed (a spawned worker outlives its parent). The lock is the kernel's, so it
    ends with the process that holds it, however that process ends.

    Raises:
        RuntimeError: another process holds `output_dir`.
    """
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, LOCK_FILE), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise RuntimeError(f"{output_dir} is being trained by process {lock.read().strip()}; "
                               "stop it (kill its process group: its spawned workers too) or wait "
                               "for it") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def train_run(run: StudyRun) -> Dict:
    """Train and evaluate one (arm, seed) in the current (worker) process, resuming from the last
    checkpoint in its output directory if there is one; returns its record (see `run_record`).

    Raises:
        RuntimeError: another process is training in the run's output directory.
        ValueError: the run started with another thread count than `run.threads`: its results
            depend on it in the last bits, so a resumed run with a different count would match
            neither count's record.
    """
    with exclusive_output_dir(run.output_dir):
        return _train_run(run)


def _train_run(run: StudyRun) -> Dict:
    started = started_threads(run.output_dir)
    if started is not None and started != run.threads:
        raise ValueError(f"{run.name} started with {started} torch threads in {run.output_dir}; "
                         f"resume it with {started}, not {run.threads}, or delete that folder")
    if started is None:  # exclusive_output_dir made the folder
        with open(os.path.join(run.output_dir, THREADS_FILE), "w") as f:
            f.write(str(run.threads))
    torch.set_num_threads(run.threads)
    register_dataset(run.data, run.dataset_dir, ("study_train", "study_val"))
    cfg = study_config(run)
    setup_logger(run.output_dir)
    setup_logger(run.output_dir, name="mabn_det")
    with open(os.path.join(run.output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    arm = ARMS[run.arm]
    if arm.init in ("converted", "centred") and not os.path.exists(cfg.MODEL.WEIGHTS):
        state = convert_bn_checkpoint(cfg, run.pretrained_backbone,
                                      fade_iters=PRETRAINED_FADE_STEPS * arm.micro_batches,
                                      centre_filters=arm.init == "centred")
        torch.save({"model": state}, cfg.MODEL.WEIGHTS)
    # The weights' initialisation too depends on the seed alone (as Detectron2's default_setup
    # makes it); seeded after the conversion, which builds models of its own.
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


def _median_step_seconds(metrics: List[Dict]) -> float | None:
    """The median time of a training step, or None for a run too short to be timed (Detectron2's
    IterationTimer leaves the first iterations of a session out)."""
    times = [m["time"] for m in metrics if "time" in m]
    return round(statistics.median(times), 3) if times else None


def run_record(run: StudyRun, cfg: CfgNode) -> Dict:
    """What one finished run contributes to the study: its AP at every evaluation, its time,
    settings, code commit and the command that re-runs it."""
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
    commit = code_commit(_REPO)
    return {
        "condition": run.condition, "arm": run.arm, "seed": run.seed, "norm": arm.norm,
        "micro_batches": arm.micro_batches,
        "mabn_buffer": arm.mabn_buffer, "head_norm": arm.head_norm, "init": arm.init,
        "images_per_statistic": arm.images_per_statistic,
        "images_per_step": IMAGES_PER_STEP, "iterations": cfg.SOLVER.MAX_ITER,
        **{k: v for k, v in final.items() if "_AP" in k},
        "evaluations": [{k: v for k, v in r.items() if k == "iteration" or "_AP" in k}
                        for r in evaluations],
        "mabn_diagnostics": diagnostics,
        # The sessions' times up to their last evaluation: what a resumed run did twice is counted
        # once, the time lost after an interrupted session's last evaluation not at all.
        "wall_seconds": round(sum(sessions.values()), 1),
        "seconds_per_iteration": _median_step_seconds(metrics),
        "threads": run.threads,
        "machine": describe_machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "config_file": os.path.relpath(run.config_file, _REPO),
        "opts": list(run.opts),
        "dataset": os.path.basename(run.dataset_dir),
        # The tree's tracked files as committed, or not: a run of uncommitted code cannot be
        # re-run from its record.
        "code_commit": commit and commit.removesuffix("+changes"),
        "code_clean": commit is not None and not commit.endswith("+changes"),
        "command": run.command,
    }


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a record says about where, when and from what a run ran, rather than what it measured.
PROVENANCE_KEYS = ("condition", "wall_seconds", "seconds_per_iteration", "machine", "date",
                   "code_commit", "code_clean", "code_commit_note", "command")


def differing_results(committed: Dict, fresh: Dict) -> List[str]:
    """The keys of `committed` whose values `fresh` does not repeat, provenance aside: empty when a
    re-run measured exactly what the committed record says."""
    return [key for key in committed
            if key not in PROVENANCE_KEYS and fresh.get(key) != committed[key]]


def result_path(results_dir: str, condition: str, arm: str, seed: int) -> str:
    """Where the record of (condition, arm, seed) is kept."""
    return os.path.join(results_dir, condition, "runs", f"{arm}_seed{seed}.json")


def run_study(runs: Sequence[StudyRun], results_dir: str, jobs: int,
              on_result: Callable[[Dict, str], None] | None = None,
              needed: Sequence[StudyRun] = ()) -> List[Dict]:
    """Train every run of `runs` whose record is not in `results_dir` yet, `jobs` at a time, each in
    a fresh process; as each finishes, write its record and call `on_result(record, its path)`.

    A run of `needed` (whose model another run starts from) trains even if it has a record; its
    record is then left as it is, with a warning if the new one measured something else.

    Returns the new records.
    """
    todo = []
    for run in runs:
        path = result_path(results_dir, run.condition, run.arm, run.seed)
        if os.path.exists(path) and run not in needed:
            logger.info("%s: finished earlier (%s), skipped", run.name, path)
        else:
            todo.append(run)
    records = []
    for _, record in run_as_completed(train_run, todo, jobs, desc="study runs"):
        path = result_path(results_dir, record["condition"], record["arm"], record["seed"])
        if os.path.exists(path):
            with open(path) as f:
                differences = differing_results(json.load(f), record)
            if differences:
                logger.warning("%s was trained again and measured another %s than its record",
                               path, ", ".join(differences))
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        if on_result is not None:
            on_result(record, path)
        records.append(record)
    return records
