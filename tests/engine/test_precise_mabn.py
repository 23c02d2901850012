"""PreciseBN for MABN: running_var becomes the population second moment of each layer's input,
for the evaluation only; TEST.PRECISE_BN.ENABLED turns it on in the Trainer's evaluations (which
leave training alone: tests/engine/test_train_net_processes.py)."""
import copy

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from mabn_det.engine import hooks as mabn_hooks
from mabn_det.engine import precise_mabn_statistics, update_mabn_stats
from mabn_det.layers import MABN2d
from tests.common import TINY_MABN_CONFIG, load_tool, make_cfg, synthetic_image, train_opts


def _trained_model(batch):
    torch.manual_seed(0)
    model = build_model(make_cfg(opts=["MODEL.MABN.BUFFER_SIZE", "2", "MODEL.MABN.WARMUP_ITERS", "0",
                                       "MODEL.MABN.RENORM_WARMUP_ITERS", "1"]))
    model.train()
    with EventStorage():
        for _ in range(2):  # past the warm-ups: step 2 uses the rings, r and running_var
            sum(model(batch).values()).backward()
    return model


def _input_second_moments(model, batch):
    """{layer: per-channel mean(x²) of its input}, from a copy of `model` run once on `batch`."""
    model = copy.deepcopy(model)
    moments = {}

    def record(name, module, inputs):
        if inputs[0].numel():
            moments[name] = inputs[0].double().square().mean(dim=(0, 2, 3))

    for name, m in model.named_modules():
        if isinstance(m, MABN2d):
            m.register_forward_pre_hook(lambda mod, inp, name=name: record(name, mod, inp))
    with torch.no_grad(), EventStorage():
        model(batch)
    return moments


def test_running_var_is_the_mean_second_moment_and_nothing_else_changes(batch_with_empty_image):
    model = _trained_model(batch_with_empty_image)
    batches = [batch_with_empty_image, [synthetic_image(boxes=[(4, 4, 40, 40)], seed=3)]]
    torch.manual_seed(1)  # proposal sampling draws from torch's generator, in the same order below
    per_batch = [_input_second_moments(model, b) for b in batches]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    renorm_before = {n: m.last_renorm for n, m in model.named_modules() if isinstance(m, MABN2d)}

    torch.manual_seed(1)
    update_mabn_stats(model, batches, num_iter=len(batches))

    after = model.state_dict()
    layers = [n for n, m in model.named_modules() if isinstance(m, MABN2d)]
    for name in layers:
        seen = [moments[name] for moments in per_batch if name in moments]
        assert seen, name
        expected = torch.stack(seen).mean(0).float()
        torch.testing.assert_close(after[f"{name}.running_var"], expected, rtol=1e-5, atol=1e-7)
        assert not torch.equal(after[f"{name}.running_var"], before[f"{name}.running_var"])
    for key, value in before.items():
        if not key.endswith("running_var"):
            assert torch.equal(after[key], value), f"{key} changed"
    assert all(m.last_renorm is renorm_before[n]
               for n, m in model.named_modules() if isinstance(m, MABN2d))


def test_precise_statistics_serve_inside_and_leave_every_training_state_alone(
        batch_with_empty_image):
    model = _trained_model(batch_with_empty_image)
    batches = [batch_with_empty_image, [synthetic_image(boxes=[(4, 4, 40, 40)], seed=3)]]
    estimated = copy.deepcopy(model)
    torch.manual_seed(1)
    update_mabn_stats(estimated, batches, num_iter=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    renorm_before = {n: m.last_renorm for n, m in model.named_modules() if isinstance(m, MABN2d)}

    torch.manual_seed(1)
    with precise_mabn_statistics(model, batches, num_iter=2):
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    rng_after = torch.get_rng_state()

    torch.manual_seed(1)
    assert torch.equal(rng_after, torch.get_rng_state())  # the forwards drew nothing for training
    for key, value in estimated.state_dict().items():
        assert torch.equal(inside[key], value), f"{key} is not the precise statistic inside"
    assert any(not torch.equal(inside[k], before[k]) for k in before if k.endswith("running_var"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    assert all(m.last_renorm is renorm_before[n]
               for n, m in model.named_modules() if isinstance(m, MABN2d))


@pytest.fixture(scope="module")
def tiny_precise(tiny_coco):
    register_coco_instances("tiny_precise", {}, *tiny_coco)
    return "tiny_precise"


def test_eval_only_re_estimates_for_the_evaluation(tiny_precise, tmp_path, monkeypatch):
    train_net = load_tool("train_net")
    opts = train_opts(str(tmp_path), tiny_precise, **{
        "MODEL.WEIGHTS": str(tmp_path / "mabn.pth"), "TEST.PRECISE_BN.ENABLED": True,
        "TEST.PRECISE_BN.NUM_ITER": 3})
    DetectionCheckpointer(build_model(make_cfg(opts=opts)), save_dir=str(tmp_path)).save("mabn")
    calls = []
    monkeypatch.setattr(mabn_hooks, "update_mabn_stats",
                        lambda model, loader, n: calls.append((next(iter(loader)), n)))
    train_net.main(train_net.argument_parser().parse_args([
        "--eval-only", "--config-file", TINY_MABN_CONFIG, *opts]))
    (batch, num_iter), = calls
    assert num_iter == 3 and len(batch) == 2  # training batches of SOLVER.IMS_PER_BATCH images
