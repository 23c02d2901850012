"""Two processes (gloo, CPU) of tools/lazyconfig_train_net.py fed different images: one MABN
statistic for checkpoints and evaluations, and a preemption signal that stops both after the same
step with a checkpoint; resumes from periodic and preemption checkpoints continue every process
exactly."""
import os
import subprocess
import sys

import pytest

from tests.common import (REPO, assert_same_training, checkpoint_files, fake_slurm, preempt,
                          saved_predictions, stopped_at)

LAZY_TRAIN_NET = os.path.join(REPO, "tools", "lazyconfig_train_net.py")


def _write_config(path, tiny_coco, output_dir, evaluation_dir, checkpointer=None):
    """The 2x recipe shrunk by tiny_lazy_config: 6 iterations of one image per process (each step
    one process gets the image without instances), SEED -1, a checkpoint (`checkpointer`, by
    default every 2 iterations, all kept) and an evaluation every 2 iterations, predictions
    written to `evaluation_dir`."""
    json_file, image_dir = tiny_coco
    path.write_text(f"""
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from tests.common import LAZY_RECIPES, tiny_lazy_config
if "tiny_mp" not in DatasetCatalog.list():
    register_coco_instances("tiny_mp", {{}}, {json_file!r}, {image_dir!r})
_cfg = tiny_lazy_config(LAZY_RECIPES[0])
model, dataloader, optimizer, train, lr_multiplier, mabn = (
    _cfg.model, _cfg.dataloader, _cfg.optimizer, _cfg.train, _cfg.lr_multiplier, _cfg.mabn)
dataloader.train.dataset.names = dataloader.test.dataset.names = "tiny_mp"
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = dataloader.test.num_workers = 0
dataloader.train.dataset.filter_empty = False
dataloader.evaluator.output_dir = {evaluation_dir!r}
optimizer.lr = 0.01
model.roi_heads.box_predictor.test_score_thresh = 0.0
lr_multiplier.warmup_length = 0.0
train.update(output_dir={output_dir!r}, seed=-1, max_iter=6, eval_period=2, log_period=1,
             checkpointer={checkpointer or dict(period=2)!r})
""")
    return str(path)


def _command(config, *opts):
    # A free port: Detectron2's default depends on the user only, so runs beside this one collide.
    return [sys.executable, LAZY_TRAIN_NET, "--num-gpus", "2", "--dist-url", "auto",
            "--config-file", config, *opts]


def _run(config, *opts):
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(_command(config, *opts), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def trained(tiny_coco, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_processes")
    out = str(root / "straight")
    _run(_write_config(root / "straight.py", tiny_coco, out, str(root / "eval_in_training")))
    return root, out


def test_end_of_training_evaluation_equals_eval_only_of_the_saved_model(trained, tiny_coco):
    root, out = trained
    config = _write_config(root / "eval_only.py", tiny_coco, str(root / "eval_out"),
                           str(root / "eval_only"))
    _run(config, "--eval-only", f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}")
    during, after = (saved_predictions(str(root / name))
                     for name in ("eval_in_training", "eval_only"))
    assert sorted(during) == sorted(after) == [0, 1]  # one image per process
    assert all(during[i] for i in during)  # score threshold 0: there are detections to compare
    assert during == after


def test_a_preempted_run_checkpoints_requeues_and_resumes_exactly(trained, tiny_coco):
    """The run resumes the uninterrupted run's periodic checkpoint of iteration 2 (SEED -1: it
    shares the random initialisation and takes the data seed from it), gets SIGUSR1 in one of its
    two training processes, stops, and is resumed from its preemption checkpoint: both resumes
    continue every process exactly."""
    root, out = trained
    preempted = stopped_at(out, "model_0000001.pth", str(root / "preempted"))
    config = _write_config(root / "preempted.py", tiny_coco, preempted,
                           str(root / "eval_preempted"), dict(period=2, max_to_keep=1))
    env, scontrol_calls = fake_slurm(str(root))
    status, console = preempt(_command(config, "--resume"), preempted, env, to="worker")
    assert status == 75, console[-4000:]
    assert "Stopped at a preemption signal after iteration" in console
    assert not os.path.exists(os.path.join(preempted, "model_final.pth"))
    with open(scontrol_calls) as f:
        assert f.read() == "requeue 4242\n"  # once, by process 0

    _run(config, "--resume")
    assert_same_training(out, preempted)
    # One periodic checkpoint kept, the preempted run's counted.
    assert checkpoint_files(preempted) == ["model_0000005.pth", "model_final.pth"]
