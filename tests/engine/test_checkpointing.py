"""Which periodic checkpoints stay in the output directory, whoever wrote them; a preemption
signal stops training after the step with a checkpoint (one process here; two, and the tools, in
tests/engine/test_multi_process.py and test_train_net_processes.py)."""
import itertools
import logging
import os
import signal
import threading

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase, SimpleTrainer
from torch import nn

from mabn_det.engine import (PreemptionCheckpointer, ProcessStates, RotatingCheckpointer,
                             TrainingPreempted)
from mabn_det.engine.checkpointing import listen_for_preemption, parse_signals


def test_the_newest_periodic_checkpoints_stay_whoever_wrote_them(tmp_path):
    """A requeued run finds its predecessors' periodic and preemption checkpoints (any iteration
    up to the one it resumed from), and a checkpoint of a later iteration left by a run that went
    further."""
    found = ["model_0000004.pth", "model_0000009.pth", "model_0000012.pth", "model_0000099.pth",
             "model_final.pth", "notes.pth"]
    for name in found:
        (tmp_path / name).write_bytes(b"")
    hook = RotatingCheckpointer(DetectionCheckpointer(nn.Linear(1, 1), str(tmp_path)), period=5,
                                max_to_keep=2)
    hook.step(13)  # not a multiple of the period: nothing saved, nothing deleted
    assert sorted(os.listdir(tmp_path)) == sorted(found)
    hook.step(14)
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint", "model_0000012.pth", "model_0000014.pth", "model_0000099.pth",
        "model_final.pth", "notes.pth"]


def test_no_limit_keeps_every_checkpoint_and_zero_is_refused(tmp_path):
    (tmp_path / "model_0000001.pth").write_bytes(b"")
    RotatingCheckpointer(DetectionCheckpointer(nn.Linear(1, 1), str(tmp_path)), period=2).step(3)
    assert {"model_0000001.pth", "model_0000003.pth"} <= set(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="max_to_keep must be ≥ 1 or None .keep all., got 0"):
        RotatingCheckpointer(DetectionCheckpointer(nn.Linear(1, 1)), period=2, max_to_keep=0)


def test_preemption_signals_are_named_and_checked():
    assert parse_signals(["SIGUSR1", "SIGTERM"], "key") == [signal.SIGUSR1, signal.SIGTERM]
    for name in ("USR1", "SIGKILL"):
        with pytest.raises(ValueError, match=f"cfg.X must name signals a process can catch, such "
                                             f"as 'SIGUSR1' or 'SIGTERM', got '{name}'"):
            parse_signals([name], "cfg.X")


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x):
        return {"loss": self.linear(x).square().mean()}


class _SignalAfter(HookBase):
    """Sends this process SIGUSR1 after iteration `iteration`, as a cluster would mid-run."""

    def __init__(self, iteration):
        self._iteration = iteration

    def after_step(self):
        if self.trainer.iter == self._iteration:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_signal_stops_training_after_the_step_with_a_checkpoint_to_resume_from(tmp_path):
    model = _Regression()
    trainer = SimpleTrainer(model, itertools.repeat(torch.ones(4, 2)),
                            torch.optim.SGD(model.parameters(), lr=0.1))
    checkpointer = DetectionCheckpointer(model, str(tmp_path), trainer=trainer)
    states = ProcessStates(model, (100,), data_seed=3)
    trainer.register_hooks([_SignalAfter(1), states,
                            PreemptionCheckpointer(checkpointer, states, [signal.SIGUSR1])])
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(TrainingPreempted) as stop:
        trainer.train(0, 10)
    assert stop.value.code == 75
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is the training's only
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    saved = torch.load(tmp_path / "model_0000001.pth", weights_only=False)
    assert saved["iteration"] == saved["trainer"]["iteration"] == 1
    assert len(saved["trainer"]["hooks"]["ProcessStates"]["processes"]) == 1


def test_outside_the_main_thread_signals_are_left_alone_with_a_warning(caplog, monkeypatch):
    # The tools' setup_logger stops mabn_det's records short of caplog's root handler.
    monkeypatch.setattr(logging.getLogger("mabn_det"), "propagate", True)
    replaced = []
    thread = threading.Thread(target=lambda: replaced.append(
        listen_for_preemption([signal.SIGUSR1])))
    thread.start()
    thread.join()
    assert replaced == [{}]
    assert "cannot catch SIGUSR1: no checkpoint on preemption" in caplog.text
