"""tools/train_net.py in two processes (gloo, CPU) fed different images: the final evaluation is
--eval-only's of model_final.pth, PreciseBN changes no weight nor buffer, and a run stopped by a
preemption signal and resumed, with SEED -1, equals the uninterrupted run on every process. CPU
models need tests/engine/train_net_cpu_ddp.py's seam (DDP without device_ids)."""
import os
import subprocess
import sys

import pytest

from tests.common import (REPO, TINY_MABN_CONFIG, assert_same_training, checkpoint_files,
                          fake_slurm, preempt, saved_predictions, stopped_at, train_opts)

DATASET = "tiny_ddp"


def _command(tiny_coco, output_dir, *args, **overrides):
    """The tool through the seam, in 2 processes on a free port (Detectron2's default port depends
    on the user only, so runs beside this one would collide), on the tiny config: SEED -1, 6
    iterations of one image per process, a checkpoint and an evaluation (score threshold 0) every
    2 iterations, each periodic checkpoint kept."""
    opts = train_opts(output_dir, DATASET, **{
        "SEED": -1, "SOLVER.MAX_ITER": 6, "SOLVER.CHECKPOINT_PERIOD": 2,
        "SOLVER.CHECKPOINT_MAX_TO_KEEP": 0, "TEST.EVAL_PERIOD": 2,
        "DATASETS.TEST": f"('{DATASET}',)", "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
        **overrides})
    return [sys.executable, "-m", "tests.engine.train_net_cpu_ddp", "--num-gpus", "2",
            "--dist-url", "auto", "--config-file", TINY_MABN_CONFIG,
            "--register-coco", DATASET, *tiny_coco, *args, *opts]


def _run(cmd):
    result = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def _predictions(output_dir):
    return saved_predictions(os.path.join(output_dir, "inference", DATASET))


@pytest.fixture(scope="module")
def trained(tiny_coco, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_net_two_processes")
    out = str(root / "straight")
    _run(_command(tiny_coco, out))
    return root, out


def test_end_of_training_evaluation_equals_eval_only_of_the_saved_model(trained, tiny_coco):
    root, out = trained
    evaluated = str(root / "eval_only")
    _run(_command(tiny_coco, evaluated, "--eval-only",
                  **{"MODEL.WEIGHTS": os.path.join(out, "model_final.pth")}))
    during, after = _predictions(out), _predictions(evaluated)
    assert sorted(during) == sorted(after) == [0, 1]  # one image per process
    assert all(during[i] for i in during)  # score threshold 0: there are detections to compare
    assert during == after


def test_precise_bn_changes_no_weight_nor_buffer(trained, tiny_coco):
    """The uninterrupted run (PreciseBN off) against the same run resumed after iteration 2 with
    PreciseBN on for its evaluations at iterations 4 and 6."""
    root, out = trained
    precise = stopped_at(out, "model_0000001.pth", str(root / "precise"))
    log = _run(_command(tiny_coco, precise, "--resume", **{"TEST.PRECISE_BN.ENABLED": True,
                                                           "TEST.PRECISE_BN.NUM_ITER": 2}))
    assert log.count("Running PreciseBN for MABN over 2 batches") == 2
    assert_same_training(out, precise)


def test_a_preempted_run_checkpoints_requeues_and_resumes_exactly(trained, tiny_coco):
    """SIGUSR1 to the launching process only, which passes it on (`kill`, a container's
    SIGTERM). The run resumes the uninterrupted run's checkpoint of iteration 2 (SEED -1: to
    share its random initialisation and data seed), is stopped, and is resumed again."""
    root, out = trained
    preempted = stopped_at(out, "model_0000001.pth", str(root / "preempted"))
    env, scontrol_calls = fake_slurm(str(root))
    cmd = _command(tiny_coco, preempted, "--resume", **{"SOLVER.CHECKPOINT_MAX_TO_KEEP": 1})
    status, console = preempt(cmd, preempted, env, to="launcher")
    assert status == 75, console[-4000:]
    assert "Stopped at a preemption signal after iteration" in console
    assert not os.path.exists(os.path.join(preempted, "model_final.pth"))
    with open(scontrol_calls) as f:
        assert f.read() == "requeue 4242\n"  # once, by process 0

    _run(cmd)
    assert_same_training(out, preempted)
    # One periodic checkpoint kept, the preempted run's counted.
    assert checkpoint_files(preempted) == ["model_0000005.pth", "model_final.pth"]
