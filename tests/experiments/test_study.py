import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mabn_experiments.runs import commit_files
from mabn_experiments.shapes import generate_shapes_dataset
from mabn_experiments.study import (
    ARMS,
    IMAGES_PER_STEP,
    StudyRun,
    StudyTrainer,
    configure_arm,
    read_records,
    result_path,
    train_run,
    write_report,
)
from tests.common import make_cfg

REPO = Path(__file__).resolve().parents[2]
TINY_OPTS = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2",
             "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
             "MODEL.MABN.WARMUP_ITERS", "1", "MODEL.MABN.RENORM_WARMUP_ITERS", "2",
             "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
             "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]


@pytest.mark.parametrize("arm", list(ARMS))
def test_arms_share_the_optimizer_batch_and_differ_in_normalisation(arm):
    cfg = make_cfg(opts=["MODEL.MABN.WARMUP_ITERS", "10", "MODEL.MABN.RENORM_WARMUP_ITERS", "30"])
    configure_arm(cfg, ARMS[arm])
    assert cfg.SOLVER.IMS_PER_BATCH == IMAGES_PER_STEP
    images_per_forward = IMAGES_PER_STEP // cfg.SOLVER.GRAD_ACCUMULATION_STEPS
    assert images_per_forward == int(arm.split("@")[1].split("-")[0])
    norms = {cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM,
             cfg.MODEL.ROI_MASK_HEAD.NORM}
    assert norms == {ARMS[arm].norm}
    if arm.startswith("MABN"):  # the layer counts forwards: 8 micro-batches per step
        assert (cfg.MODEL.MABN.WARMUP_ITERS, cfg.MODEL.MABN.RENORM_WARMUP_ITERS) == (80, 240)
        statistic = cfg.MODEL.MABN.BUFFER_SIZE * images_per_forward
        assert statistic == ARMS[arm].images_per_statistic == (16 if arm == "MABN@2" else 2)


def fake_record(arm, seed, ap):
    evaluations = [{"iteration": i, "bbox_AP": ap * i / 4, "segm_AP": ap * i / 8} for i in (2, 4)]
    return {"arm": arm, "seed": seed, "iterations": 4, "bbox_AP": ap, "segm_AP": ap / 2,
            "evaluations": evaluations, "seconds_per_iteration": 1.0, "wall_seconds": 60.0,
            "date": "2026-12-02", "machine": "test", "threads": 1}


def write_fake_records(results, aps):
    for arm, values in aps.items():
        for seed, ap in enumerate(values):
            path = Path(result_path(str(results), arm, seed))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(fake_record(arm, seed, ap)))


def test_report_is_rebuilt_from_the_records(tmp_path):
    write_fake_records(tmp_path, {"BN@16": [44.0, 46.0], "BN@2": [30.0, 32.0], "MABN@2": [20.0]})
    paths = write_report(str(tmp_path))
    table = Path(paths[0]).read_text()
    assert "| BN@16 | BN | 16 | 45.0 ± 1.4 | 22.5 ± 0.7 | 44.0, 46.0 | 0, 1 |" in table
    assert "| MABN@2 | MABN | 16 | 20.0 (1 seed) |" in table
    assert "BN@16 45.0, BN@2 31.0 box AP" in table and "the data can rank norms" in table
    assert Path(paths[1]).stat().st_size > 1000
    assert "PreciseBN" not in table
    write_fake_records(tmp_path, {"BN@2": [43.0, 44.0]})
    assert "BN@2 trails BN@16 by less than 3" in Path(write_report(str(tmp_path))[0]).read_text()


def test_report_gives_precise_bn_effect_per_evaluation(tmp_path):
    write_fake_records(tmp_path, {"MABN@2": [20.0, 30.0]})
    for seed, effects in enumerate(((-4.0, 1.0), (-2.0, 0.5))):
        path = Path(result_path(str(tmp_path), "MABN@2", seed))
        record = json.loads(path.read_text())
        for evaluation, effect in zip(record["evaluations"], effects):
            evaluation["bbox_AP_precise_bn"] = evaluation["bbox_AP"] + effect
            evaluation["segm_AP_precise_bn"] = evaluation["segm_AP"]
        record["bbox_AP_precise_bn"] = record["evaluations"][-1]["bbox_AP_precise_bn"]
        record["segm_AP_precise_bn"] = record["segm_AP"]
        path.write_text(json.dumps(record))
    table = Path(write_report(str(tmp_path))[0]).read_text()
    assert "| MABN@2 | 0, 1 | 25.0 ± 7.1 | 25.8 ± 6.7 |" in table
    assert "| MABN@2 | 2 | -3.0 (-4.0, -2.0) | +0.8 (+0.5, +1.0) |" in table


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def test_commit_takes_exactly_the_given_files(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@t")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "other.txt").write_text("staged by someone else")
    git(tmp_path, "add", "other.txt")
    (tmp_path / "untracked.txt").write_text("not ours")
    results = tmp_path / "docs" / "study"
    write_fake_records(results, {"BN@2": [30.0]})
    paths = [result_path(str(results), "BN@2", 0), *write_report(str(results))]
    assert commit_files(paths, "study: BN@2 seed 0")
    committed = set(git(tmp_path, "show", "--name-only", "--format=", "HEAD").split())
    assert committed == {"docs/study/runs/BN@2_seed0.json", "docs/study/results.md",
                         "docs/study/ap_curves.png"}
    assert git(tmp_path, "diff", "--cached", "--name-only").split() == ["other.txt"]
    assert not commit_files(paths, "nothing changed")  # already committed: no empty commit


def test_commit_waits_for_the_index_lock(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a")
    lock = tmp_path / ".git" / "index.lock"
    lock.write_text("")
    with pytest.raises(RuntimeError, match="index.lock was held"):
        commit_files([str(tmp_path / "a.txt")], "m", lock_timeout_s=0.1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(generate_shapes_dataset(tmp_path_factory.mktemp("data"), 24, 4, 64, seed=1,
                                       progress=False, style="study"))


def tiny_run(tiny_data, output_dir, arm="MABN@2", precise_bn_batches=2):
    return StudyRun(arm, 0, str(REPO / "configs" / "tiny" / "study_R18_FPN_shapes.yaml"),
                    tiny_data, str(output_dir), TINY_OPTS, 1, precise_bn_batches)


def final_weights(output_dir):
    return torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=False)["model"]


def test_interrupted_run_resumes_exactly_and_precise_bn_leaves_training_alone(
        tiny_data, tmp_path, monkeypatch):
    reference = train_run(tiny_run(tiny_data, tmp_path / "reference"))
    assert [e["iteration"] for e in reference["evaluations"]] == [2, 4]
    assert {"bbox_AP_precise_bn", "segm_AP_precise_bn"} <= set(reference["evaluations"][0])

    interrupted = tiny_run(tiny_data, tmp_path / "interrupted")
    original_step = StudyTrainer.run_step

    def crash_in_iteration_3(trainer):
        if trainer.iter == 3:
            raise RuntimeError("killed in iteration 3")
        original_step(trainer)

    monkeypatch.setattr(StudyTrainer, "run_step", crash_in_iteration_3)
    with pytest.raises(RuntimeError, match="killed"):
        train_run(interrupted)
    monkeypatch.undo()
    resumed = train_run(interrupted)
    assert resumed["evaluations"] == reference["evaluations"]
    without_precise_bn = tiny_run(tiny_data, tmp_path / "plain", precise_bn_batches=0)
    assert "bbox_AP_precise_bn" not in train_run(without_precise_bn)
    expected = final_weights(tmp_path / "reference")
    for other in ("interrupted", "plain"):
        weights = final_weights(tmp_path / other)
        assert weights.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(weights[key], value), (other, key)


def test_cli_skips_finished_runs_commits_each_new_one_and_rebuilds_the_report(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@t")
    git(tmp_path, "config", "user.name", "t")
    results = tmp_path / "docs" / "study"
    write_fake_records(results, {"BN@16": [44.0]})
    command = [sys.executable, str(REPO / "tools" / "compare_norms.py"), "--tiny", "--out",
               str(tmp_path / "out"), "--results", str(results), "--arms", "BN@16", "GN@2",
               "--seeds", "0", "--jobs", "1", "--commit"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "out" / "BN@16").exists()  # it has a record: skipped
    assert [r["arm"] for r in read_records(str(results))] == ["BN@16", "GN@2"]
    record = json.loads(Path(result_path(str(results), "GN@2", 0)).read_text())
    assert record["iterations"] == 4 and [e["iteration"] for e in record["evaluations"]] == [2, 4]
    assert record["command"].startswith("python tools/compare_norms.py --tiny")
    assert "| GN@2 | GN | 1 |" in result.stdout
    # One commit, of the new record and the report; the fake BN@16 record stays uncommitted.
    subjects = git(tmp_path, "log", "--format=%s").splitlines()
    assert len(subjects) == 1 and subjects[0].startswith("study: GN@2 seed 0, 4 iterations: ")
    assert set(git(tmp_path, "show", "--name-only", "--format=", "HEAD").split()) == {
        "docs/study/runs/GN@2_seed0.json", "docs/study/results.md", "docs/study/ap_curves.png"}
    (results / "results.md").unlink()
    again = subprocess.run(command + ["--report-only"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "| GN@2 | GN | 1 |" in (results / "results.md").read_text()
