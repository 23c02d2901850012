"""tools/train_net.py end to end on CPU: exact resume, evaluation, checkpoints kept."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from detectron2.data.datasets import register_coco_instances
from detectron2.utils import comm

from mabn_det.engine import Trainer
from tests.common import REPO, TINY_MABN_CONFIG, TRAIN_NET, load_tool, make_cfg, train_opts

train_net = load_tool("train_net")


def _run_in_process(args):
    return train_net.main(train_net.argument_parser().parse_args(args))


def _register(tiny_coco, name="tiny_train"):
    return ["--register-coco", name, *tiny_coco]


@pytest.fixture
def process_group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_ddps_refusal_of_a_cpu_model_is_explained(process_group_of_one, tiny_coco, monkeypatch,
                                                  tmp_path):
    """Detectron2's DefaultTrainer gives DDP device_ids, which DDP refuses for CPU models
    (tests/engine/test_multi_process.py trains on CPU in 2 processes through a test-only seam)."""
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "get_local_rank", lambda: 0)
    register_coco_instances("tiny_refused", {}, *tiny_coco)
    with pytest.raises(ValueError, match="cannot train MODEL.DEVICE 'cpu' in 2 processes") as e:
        Trainer(make_cfg(opts=train_opts(str(tmp_path), "tiny_refused")))
    assert "device_ids" in str(e.value.__cause__)  # DDP's own error, explained


def test_resume_equals_uninterrupted_training(tiny_coco, tmp_path):
    """SEED -1, and an evaluation at the iteration of the checkpoint resumed from. The resumed
    half holds an averaging step (3) and a renormalising one (4: RENORM_WARMUP_ITERS is 3)."""
    common = {"SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 2, "SEED": -1,
              "TEST.EVAL_PERIOD": 2, "DATASETS.TEST": "('tiny_resume',)"}
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    _run_in_process(["--config-file", TINY_MABN_CONFIG, *_register(tiny_coco, "tiny_resume"),
                     *train_opts(straight, "tiny_resume", **common)])
    # Stop after 2 iterations: a fresh directory holding only the checkpoint of iteration 2.
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "model_0000001.pth"), resumed)
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    _run_in_process(["--resume", "--config-file", TINY_MABN_CONFIG,
                     *train_opts(resumed, "tiny_resume", **common)])

    load = lambda d: torch.load(os.path.join(d, "model_final.pth"), map_location="cpu",  # noqa
                                weights_only=False)["model"]
    expected, got = load(straight), load(resumed)
    assert expected.keys() == got.keys()
    mabn_keys = [k for k in expected if k.endswith(("chi_buffer", "psi_buffer", "running_var"))]
    assert mabn_keys
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"


def test_eval_only_prints_coco_tables_of_the_last_checkpoint_kept(tiny_coco, tmp_path):
    out = str(tmp_path / "eval")
    _run_in_process(["--config-file", TINY_MABN_CONFIG, *_register(tiny_coco, "tiny_eval"),
                     *train_opts(out, "tiny_eval", **{"SOLVER.MAX_ITER": 3,
                                                      "SOLVER.CHECKPOINT_PERIOD": 1,
                                                      "SOLVER.CHECKPOINT_MAX_TO_KEEP": 2})])
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == [
        "model_0000001.pth", "model_0000002.pth", "model_final.pth"]
    cmd = [sys.executable, TRAIN_NET, "--eval-only", "--config-file", TINY_MABN_CONFIG,
           *_register(tiny_coco, "tiny_eval"),
           *train_opts(out, "tiny_eval", **{"DATASETS.TEST": "('tiny_eval',)",
                                            "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
                                            "MODEL.WEIGHTS": os.path.join(out, "model_final.pth")})]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    assert re.search(r"\|\s*AP\s*\|\s*AP50\s*\|\s*AP75\s*\|", log)
