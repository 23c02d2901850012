import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mabn_det.engine import Trainer
from mabn_experiments.conditions import (ALL_ARMS, CONDITIONS, PRETRAINED_ARMS, TINY_OPTS,
                                         register_dataset)
from mabn_experiments.runs import commit_files
from mabn_experiments.shapes import generate_shapes_dataset
from mabn_experiments.study import (
    ARMS,
    IMAGES_PER_STEP,
    THREADS_FILE,
    StudyRun,
    StudyTrainer,
    configure_arm,
    differing_results,
    exclusive_output_dir,
    extract_backbone,
    result_path,
    study_config,
    train_run,
)
from mabn_experiments.study_report import read_records, write_report
from tests.common import load_tool, make_cfg

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arm", ALL_ARMS)
def test_arms_share_the_optimizer_batch_and_differ_in_normalisation(arm):
    cfg = make_cfg(opts=["MODEL.MABN.WARMUP_ITERS", "10", "MODEL.MABN.RENORM_WARMUP_ITERS", "30"])
    configure_arm(cfg, ARMS[arm])
    assert cfg.SOLVER.IMS_PER_BATCH == IMAGES_PER_STEP
    images_per_forward = IMAGES_PER_STEP // cfg.SOLVER.GRAD_ACCUMULATION_STEPS
    assert images_per_forward == int(arm.split("@")[1].split("-")[0])
    norms = {cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM,
             cfg.MODEL.ROI_MASK_HEAD.NORM}
    assert norms == {ARMS[arm].norm} and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    if arm.startswith("MABN"):  # the layer counts forwards: 8 micro-batches per step
        assert (cfg.MODEL.MABN.WARMUP_ITERS, cfg.MODEL.MABN.RENORM_WARMUP_ITERS) == (80, 240)
        statistic = cfg.MODEL.MABN.BUFFER_SIZE * images_per_forward
        assert statistic == ARMS[arm].images_per_statistic == (16 if arm == "MABN@2" else 2)


@pytest.mark.parametrize("arm, backbone, heads, freeze_at, statistic", [
    ("FrozenBN", "FrozenBN", "", 2, None),
    ("FrozenBN+MABN@2", "FrozenBN", "MABN", 2, 16),
    ("MABN@2-converted", "MABN", "MABN", 0, 16),
    ("MABN@2-centred", "MABN", "MABN", 0, 16),
    ("BN@2-pretrained", "BN", "BN", 0, 2)])
def test_pretrained_arms_set_backbone_and_heads_apart(arm, backbone, heads, freeze_at,
                                                        statistic):
    cfg = make_cfg()
    configure_arm(cfg, ARMS[arm])
    assert cfg.SOLVER.GRAD_ACCUMULATION_STEPS == 8 and ARMS[arm].init != "scratch"
    assert cfg.MODEL.RESNETS.NORM == backbone and cfg.MODEL.BACKBONE.FREEZE_AT == freeze_at
    assert {cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.ROI_MASK_HEAD.NORM} == {heads}
    assert ARMS[arm].images_per_statistic == statistic
    assert set(PRETRAINED_ARMS) == {a for a, settings in ARMS.items() if settings.init != "scratch"}


def fake_record(condition, arm, seed, ap):
    masks = CONDITIONS[condition].has_masks
    evaluations = [{"iteration": i, "bbox_AP": ap * i / 4,
                    **({"segm_AP": ap * i / 8} if masks else {})} for i in (2, 4)]
    return {"condition": condition, "arm": arm, "seed": seed, "iterations": 4, "bbox_AP": ap,
            **({"segm_AP": ap / 2} if masks else {}), "evaluations": evaluations,
            "seconds_per_iteration": 1.0, "wall_seconds": 60.0, "date": "2026-12-02",
            "machine": "test", "threads": 1, "code_commit": "0123456789abcdef", "code_clean": True}


def write_fake_records(results, aps, condition="photometric"):
    for arm, values in aps.items():
        for seed, ap in enumerate(values):
            path = Path(result_path(str(results), condition, arm, seed))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(fake_record(condition, arm, seed, ap)))


def test_report_is_rebuilt_from_the_records(tmp_path):
    write_fake_records(tmp_path, {"BN@16": [44.0, 46.0], "BN@2": [30.0, 32.0], "MABN@2": [20.0]})
    write_fake_records(tmp_path, {"BN@16": [25.0], "BN@2": [24.0]}, condition="trees")
    paths = write_report(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in paths] == [
        "results.md", os.path.join("photometric", "ap_curves.png"),
        os.path.join("trees", "ap_curves.png")]
    table = Path(paths[0]).read_text()
    # The summary: box / mask AP where the task has masks, box AP alone where it has none.
    assert ("| photometric | 4 | 45.0 ± 1.4 / 22.5 ± 0.7 | 31.0 ± 1.4 / 15.5 ± 0.7 | "
            "20.0 (1 seed) / 10.0 (1 seed) | yes |") in table
    assert "| trees | 4 | 25.0 (1 seed) | 24.0 (1 seed) | – | no |" in table
    assert "| BN@16 | BN | 16 | 45.0 ± 1.4 | 22.5 ± 0.7 | 44.0, 46.0 | 0, 1 |" in table
    assert "| MABN@2 | MABN | 16 | 20.0 (1 seed) |" in table
    assert "BN@16 45.0, BN@2 31.0 box AP" in table and "this condition can rank norms" in table
    assert "BN@16 25.0, BN@2 24.0 box AP" in table and "BN@2 trails BN@16 by less than 3" in table
    assert "| BN@16 | BN | 16 | 25.0 (1 seed) | 25.0 | 0 |" in table  # no mask column
    assert all(Path(p).stat().st_size > 1000 for p in paths[1:])
    assert "PreciseBN" not in table
    # A condition without BN@2 of its own takes the verdict of the one whose data it shares.
    write_fake_records(tmp_path, {"BN@16": [50.0], "MABN@2": [48.0]}, condition="photometric_long")
    table = Path(write_report(str(tmp_path))[0]).read_text()
    assert "| photometric_long | 4 | 50.0 (1 seed) / 25.0 (1 seed) | – | 48.0" in table
    assert "| yes (as photometric) |" in table
    assert ("This condition runs no BN@2: the calibration is that of `photometric`, on the same "
            "data. Calibration (BN@16 ≥ 40 box AP, BN@2 ≥ 3 below it): BN@16 45.0") in table
    write_fake_records(tmp_path, {"BN@16": [35.0], "BN@2": [24.0]}, condition="trees")
    assert "BN@16 is below 40 box AP" not in Path(write_report(str(tmp_path))[0]).read_text()
    write_fake_records(tmp_path, {"BN@16": [15.0], "BN@2": [4.0]}, condition="trees")
    assert "BN@16 is below 20 box AP" in Path(write_report(str(tmp_path))[0]).read_text()


def test_report_gives_precise_bn_effect_per_evaluation(tmp_path):
    write_fake_records(tmp_path, {"MABN@2": [20.0, 30.0]})
    for seed, effects in enumerate(((-4.0, 1.0), (-2.0, 0.5))):
        path = Path(result_path(str(tmp_path), "photometric", "MABN@2", seed))
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


def test_report_shows_untimed_runs_without_a_time(tmp_path):
    # Detectron2 times no step of a session shorter than 3 iterations: the record holds None.
    write_fake_records(tmp_path, {"BN@16": [44.0, 46.0], "BN@2": [30.0]})
    path = Path(result_path(str(tmp_path), "photometric", "BN@16", 1))
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "seconds_per_iteration": None}))
    table = Path(write_report(str(tmp_path))[0]).read_text()
    assert "| BN@16 | BN | 16 | 45.0 ± 1.4 | 22.5 ± 0.7 | 44.0, 46.0 | 0, 1 | 1.00 |" in table
    assert "| BN@16 | 1 | 2026-12-02 | test | 1 | 1 min | – |" in table
    write_fake_records(tmp_path / "untimed", {"BN@16": [44.0]})
    path = Path(result_path(str(tmp_path / "untimed"), "photometric", "BN@16", 0))
    path.write_text(json.dumps({**json.loads(path.read_text()), "seconds_per_iteration": None}))
    assert "| 44.0 | 0 | – |" in Path(write_report(str(tmp_path / "untimed"))[0]).read_text()


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
    paths = [result_path(str(results), "photometric", "BN@2", 0), *write_report(str(results))]
    assert commit_files(paths, "study: BN@2 seed 0")
    committed = set(git(tmp_path, "show", "--name-only", "--format=", "HEAD").split())
    assert committed == {"docs/study/photometric/runs/BN@2_seed0.json", "docs/study/results.md",
                         "docs/study/photometric/ap_curves.png"}
    assert git(tmp_path, "diff", "--cached", "--name-only").split() == ["other.txt"]
    assert not commit_files(paths, "nothing changed")  # already committed: no empty commit


@pytest.mark.parametrize("marker", ["index.lock", "MERGE_HEAD"])
def test_commit_waits_while_git_is_busy(tmp_path, marker):
    """Another git process holds the index, or a merge is in progress (no partial commit then)."""
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / ".git" / marker).write_text("")
    with pytest.raises(RuntimeError, match=r"was busy \(index.lock, MERGE_HEAD"):
        commit_files([str(tmp_path / "a.txt")], "m", lock_timeout_s=0.1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(generate_shapes_dataset(tmp_path_factory.mktemp("data"), 24, 4, 64, seed=1,
                                       progress=False, style="study"))


def tiny_run(tiny_data, output_dir, arm="MABN@2", precise_bn_batches=2):
    return StudyRun("photometric", arm, 0, CONDITIONS["photometric"].config_path, "study",
                    tiny_data, str(output_dir), TINY_OPTS, 1, precise_bn_batches)


def final_weights(output_dir):
    return torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=False)["model"]


def pretrained_bn_backbone(tiny_data, directory):
    """A BN Mask R-CNN of the study config with non-trivial statistics, its backbone extracted."""
    register_dataset("study", tiny_data, ("study_train", "study_val"))
    source = StudyRun("photometric", "BN@16", 0, CONDITIONS["photometric"].config_path, "study",
                      tiny_data, str(directory), TINY_OPTS, 1, 0)
    model = Trainer.build_model(study_config(source))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    directory.mkdir(parents=True)
    torch.save({"model": model.state_dict()}, directory / "model_final.pth")
    return extract_backbone(str(directory / "model_final.pth"), str(directory / "backbone.pth"))


@pytest.mark.parametrize("arm", ["FrozenBN", "MABN@2-converted"])
def test_pretrained_arms_start_from_the_backbone(tiny_data, tmp_path, arm):
    backbone = pretrained_bn_backbone(tiny_data, tmp_path / "source")
    loaded = torch.load(backbone, weights_only=False)["model"]
    assert loaded and all(key.startswith("backbone.bottom_up.") for key in loaded)
    run = dataclasses.replace(tiny_run(tiny_data, tmp_path / arm, arm=arm, precise_bn_batches=0),
                              condition="pretrained", pretrained_backbone=backbone)
    record = train_run(run)
    assert (record["init"], record["arm"]) == (ARMS[arm].init, arm)
    trained = final_weights(tmp_path / arm)
    stem = "backbone.bottom_up.stem.conv1"
    if arm == "FrozenBN":  # loaded as it is, and frozen up to res2
        for key in (f"{stem}.weight", f"{stem}.norm.running_var",
                    "backbone.bottom_up.res2.0.conv1.weight"):
            assert torch.equal(trained[key], loaded[key]), key
        assert not torch.equal(trained["backbone.bottom_up.res3.0.conv1.weight"],
                               loaded["backbone.bottom_up.res3.0.conv1.weight"])
    else:  # converted: the filter means fade over 100 steps of 8 forwards; 4 steps were taken
        assert torch.load(tmp_path / arm / "initial_weights.pth", weights_only=False)["model"][
            f"{stem}.pretrained_offset.fade_iters"] == 800
        assert trained[f"{stem}.pretrained_offset.iteration"] == 4 * 8
        assert torch.equal(trained[f"{stem}.pretrained_offset.filter_mean"],
                           loaded[f"{stem}.weight"].mean(dim=(1, 2, 3), keepdim=True))


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
    with pytest.raises(ValueError, match="started with 1 torch threads"):
        train_run(dataclasses.replace(interrupted, threads=2))  # would match no record
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


def test_a_run_trains_in_one_process_at_a_time(tmp_path):
    """A second trainer of the same output directory (a queue started twice, a worker left over
    from a killed queue) is refused before it writes anything; the directory is free again after."""
    run = tiny_run(str(tmp_path / "data"), tmp_path / "run")
    with exclusive_output_dir(run.output_dir), pytest.raises(
            RuntimeError, match=f"being trained by process {os.getpid()}"):
        train_run(run)
    assert sorted(os.listdir(run.output_dir)) == ["training.lock"]
    with exclusive_output_dir(run.output_dir):
        pass


def test_planner_resumes_a_run_with_the_threads_it_started_with(tiny_data, tmp_path, monkeypatch):
    compare_norms = load_tool("compare_norms")
    monkeypatch.setattr(compare_norms, "prepare_dataset", lambda *args, **kwargs: tiny_data)
    args = compare_norms.parse_args(["--tiny", "--condition", "photometric", "--threads", "2"])
    planner = compare_norms.Planner(args, str(tmp_path), args.threads)
    fresh = planner.run("photometric", "BN@2", 0)
    assert fresh.threads == 2 and "--threads 2" in fresh.command
    Path(fresh.output_dir).mkdir(parents=True)
    (Path(fresh.output_dir) / THREADS_FILE).write_text("1")
    resumed = planner.run("photometric", "BN@2", 0)
    assert resumed.threads == 1 and "--threads 1" in resumed.command
    assert planner.run("photometric", "GN@2", 0).threads == 2


def copy_of_the_code(directory):
    """This checkout's files (tracked and untracked, not ignored) committed in a new repository,
    as a clean clone would have them."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, directory / name)
    for args in (("init", "-q"), ("config", "user.email", "t@t"), ("config", "user.name", "t"),
                 ("add", "-A"), ("commit", "-qm", "the code")):
        git(directory, *args)
    return git(directory, "rev-parse", "HEAD").strip()


def test_cli_commits_each_new_record_which_reproduce_run_repeats_exactly(tmp_path):
    code, results_repo = tmp_path / "code", tmp_path / "results_repo"
    commit = copy_of_the_code(code)
    for args in (("init", "-q"), ("config", "user.email", "t@t"), ("config", "user.name", "t")):
        git(results_repo.mkdir(parents=True, exist_ok=True) or results_repo, *args)
    results = results_repo / "docs" / "study"
    write_fake_records(results, {"BN@16": [44.0]}, condition="plain")
    command = [sys.executable, "tools/compare_norms.py", "--tiny", "--condition", "plain",
               "--out", str(tmp_path / "out"), "--results", str(results), "--arms", "BN@16",
               "GN@2", "--seeds", "0", "--jobs", "1", "--commit"]
    # Three iterations instead of --tiny's four, in both runs (this one and reproduce_run's): the
    # fewest whose record has a time per iteration (Detectron2 times from the third on).
    opts = ["SOLVER.MAX_ITER", "3"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    result = subprocess.run(command + opts, capture_output=True, text=True, timeout=900, env=env,
                            cwd=code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "out" / "plain" / "BN@16").exists()  # it has a record: skipped
    assert [r["arm"] for r in read_records(str(results), "plain")] == ["BN@16", "GN@2"]
    record_file = Path(result_path(str(results), "plain", "GN@2", 0))
    record = json.loads(record_file.read_text())
    assert record["iterations"] == 3 and [e["iteration"] for e in record["evaluations"]] == [2, 3]
    assert (record["condition"], record["code_commit"], record["code_clean"]) == (
        "plain", commit, True)
    assert record["command"] == ("python tools/compare_norms.py --condition plain --arms GN@2 "
                                 f"--seeds 0 --threads {record['threads']} --tiny "
                                 "SOLVER.MAX_ITER 3")
    assert "| GN@2 | GN | 1 |" in result.stdout
    # One commit, of the new record and the report; the fake BN@16 record stays uncommitted.
    subjects = git(results_repo, "log", "--format=%s").splitlines()
    assert len(subjects) == 1 and subjects[0].startswith("study plain: GN@2 seed 0, 3 iterations: ")
    assert set(git(results_repo, "show", "--name-only", "--format=", "HEAD").split()) == {
        "docs/study/plain/runs/GN@2_seed0.json", "docs/study/results.md",
        "docs/study/plain/ap_curves.png"}
    (results / "results.md").unlink()
    again = subprocess.run(command + ["--report-only"], capture_output=True, text=True,
                           timeout=300, env=env, cwd=code)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "| GN@2 | GN | 1 |" in (results / "results.md").read_text()

    # The record alone re-runs it: its commit checked out, its command run, the same numbers.
    reproduce = [sys.executable, str(code / "tools" / "reproduce_run.py"), str(record_file),
                 "--out", str(tmp_path / "reproduce")]
    result = subprocess.run(reproduce, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(code)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "reproduced: every measured value" in result.stdout
    assert git(tmp_path / "reproduce" / "code", "rev-parse", "HEAD").strip() == commit


def test_a_record_differs_in_what_it_measured_not_in_where_or_when():
    committed = fake_record("plain", "GN@2", 0, 30.0)
    fresh = {**committed, "wall_seconds": 1.0, "machine": "another", "date": "2027-01-01",
             "command": "python tools/compare_norms.py --condition plain"}
    assert differing_results(committed, fresh) == []
    fresh["evaluations"] = [{**e, "bbox_AP": e["bbox_AP"] + 0.001} for e in fresh["evaluations"]]
    fresh["threads"] = 2
    assert differing_results(committed, fresh) == ["evaluations", "threads"]
    assert differing_results(committed, {}) == [
        k for k in committed if k not in ("condition", "wall_seconds", "seconds_per_iteration",
                                          "machine", "date", "code_commit", "code_clean")]


def test_reproduce_run_refuses_a_record_without_a_clean_commit(tmp_path):
    record = tmp_path / "MABN@2_seed0.json"
    record.write_text(json.dumps({**fake_record("photometric", "MABN@2", 0, 70.0),
                                  "code_commit": None, "code_clean": False,
                                  "code_commit_note": "not recorded"}))
    result = subprocess.run([sys.executable, str(REPO / "tools" / "reproduce_run.py"),
                             str(record)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1
    assert "names no clean code commit" in result.stderr and "not recorded" in result.stderr
