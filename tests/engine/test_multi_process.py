"""Two processes (gloo, CPU) of tools/lazyconfig_train_net.py fed different images: one MABN
statistic for checkpoints and evaluations, and a resume that continues every process exactly."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.common import REPO

LAZY_TRAIN_NET = os.path.join(REPO, "tools", "lazyconfig_train_net.py")


def _write_config(path, tiny_coco, output_dir, evaluation_dir):
    """The 2x recipe shrunk by tiny_lazy_config: 4 iterations of one image per process (each step
    one process gets the image without instances), SEED -1, a checkpoint and an evaluation every 2
    iterations, predictions written to `evaluation_dir`."""
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
train.update(output_dir={output_dir!r}, seed=-1, max_iter=4, eval_period=2, log_period=1,
             checkpointer=dict(period=2))
""")
    return str(path)


def _run(config, *opts):
    cmd = [sys.executable, LAZY_TRAIN_NET, "--num-gpus", "2", "--config-file", config, *opts]
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _predictions(evaluation_dir):
    """{image_id: instances} of both processes' shares, as COCOEvaluator saved them."""
    return {p["image_id"]: p["instances"]
            for p in _load(os.path.join(evaluation_dir, "instances_predictions.pth"))}


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
    during, after = _predictions(str(root / "eval_in_training")), _predictions(
        str(root / "eval_only"))
    assert sorted(during) == sorted(after) == [0, 1]  # one image per process
    assert all(during[i] for i in during)  # score threshold 0: there are detections to compare
    assert during == after


def test_resume_equals_uninterrupted_training_on_every_process(trained, tiny_coco):
    root, out = trained
    # Stop after 2 iterations: a fresh directory holding only the checkpoint of iteration 2.
    resumed = str(root / "resumed")
    os.makedirs(resumed)
    shutil.copy(os.path.join(out, "model_0000001.pth"), resumed)
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    _run(_write_config(root / "resumed.py", tiny_coco, resumed, str(root / "eval_resumed")),
         "--resume")

    expected, got = _load(os.path.join(out, "model_final.pth")), _load(
        os.path.join(resumed, "model_final.pth"))
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), f"{key} differs after resume"
    processes = [state["trainer"]["hooks"]["ProcessStates"]["processes"]
                 for state in (expected, got)]
    assert len(processes[0]) == len(processes[1]) == 2
    rings = [k for k in processes[0][1]["buffers"] if k.endswith("chi_buffer")]
    assert rings
    # The processes saw different images: their rings differ, their running_var does not.
    first, second = processes[0][0]["buffers"], processes[0][1]["buffers"]
    assert any(not torch.equal(first[k], second[k]) for k in rings)
    assert all(torch.equal(first[k], second[k]) for k in first if k.endswith("running_var"))
    for rank in range(2):
        for key, value in processes[0][rank]["buffers"].items():
            assert torch.equal(value, processes[1][rank]["buffers"][key]), \
                f"process {rank}: {key} differs after resume"
