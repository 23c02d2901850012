"""tools/train_net.py end to end on CPU: multi-process, exact resume, evaluation, diagnostics."""
import os
import re
import shutil
import subprocess
import sys

import torch

from tests.common import REPO, TINY_MABN_CONFIG, TRAIN_NET, load_tool, train_opts

train_net = load_tool("train_net")


def _run_in_process(args):
    return train_net.main(train_net.argument_parser().parse_args(args))


def _register(tiny_coco, name="tiny_train"):
    return ["--register-coco", name, *tiny_coco]


def test_two_processes_with_gloo_and_an_empty_rank(tiny_coco, tmp_path):
    """Each rank gets one of the two images per step, so one rank always holds no instance."""
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, TRAIN_NET, "--num-gpus", "2", "--config-file", TINY_MABN_CONFIG,
           *_register(tiny_coco), *train_opts(out, **{"SOLVER.MAX_ITER": 3})]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    state = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu",
                       weights_only=False)["model"]
    counters = [v for k, v in state.items() if k.endswith(".iteration")]
    assert counters and all(torch.isfinite(v.float()).all() for v in state.values())
    assert max(int(c) for c in counters) == 3


def test_resume_equals_uninterrupted_training(tiny_coco, tmp_path):
    common = dict(**{"SOLVER.MAX_ITER": 6, "SOLVER.CHECKPOINT_PERIOD": 3})
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    _run_in_process(["--config-file", TINY_MABN_CONFIG, *_register(tiny_coco, "tiny_resume"),
                     *train_opts(straight, "tiny_resume", **common)])
    # Stop after 3 iterations: a fresh directory holding only the checkpoint of iteration 3.
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "model_0000002.pth"), resumed)
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
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


def test_eval_only_prints_coco_tables(tiny_coco, tmp_path):
    out = str(tmp_path / "eval")
    _run_in_process(["--config-file", TINY_MABN_CONFIG, *_register(tiny_coco, "tiny_eval"),
                     *train_opts(out, "tiny_eval", **{"SOLVER.MAX_ITER": 2})])
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
