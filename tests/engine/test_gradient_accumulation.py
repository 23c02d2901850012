"""Gradient accumulation is SimpleTrainer's own step on micro-batches grouped by step: the update
and the logged losses are the means over the micro-batches, with SimpleTrainer's options."""
import pytest
import torch
from detectron2.engine import SimpleTrainer
from torch import nn

from mabn_det.engine import GradientAccumulationTrainer
from mabn_det.engine.trainer import unwrap


class _Regression(nn.Module):
    """Two losses of a linear map, on batches of (x, y) rows."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, batch):
        x, y = batch
        error = self.linear(x).squeeze(1) - y
        return {"loss_square": error.square().mean(), "loss_abs": error.abs().mean()}


@pytest.mark.parametrize("async_write_metrics", [False, True])
def test_one_step_is_the_mean_of_its_micro_batches(async_write_metrics):
    torch.manual_seed(0)
    micro_batches = [(torch.randn(2, 3), torch.randn(2)) for _ in range(3)]
    model = _Regression()
    reference = _Regression()
    reference.load_state_dict(model.state_dict())
    trainer = GradientAccumulationTrainer(model, micro_batches, torch.optim.SGD(
        model.parameters(), lr=0.1), 3, async_write_metrics=async_write_metrics)
    trainer.train(0, 1)

    losses = [reference(batch) for batch in micro_batches]
    mean = {name: sum(step[name] for step in losses) / 3 for name in losses[0]}
    sum(mean.values()).backward()
    for name, parameter in reference.named_parameters():
        expected = parameter - 0.1 * parameter.grad
        torch.testing.assert_close(dict(model.named_parameters())[name], expected)
    for name, value in mean.items():
        assert trainer.storage.history(name).latest() == pytest.approx(value.item(), rel=1e-6)
    assert unwrap(trainer.model) is model
    assert "run_step" not in vars(GradientAccumulationTrainer)  # SimpleTrainer's step it is
    assert isinstance(trainer, SimpleTrainer)
