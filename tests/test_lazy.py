"""MABN in LazyConfig recipes: every norm asked for is an MABN2d after a centred conv, a training
step with an empty image works, and tools/lazyconfig_train_net.py trains, resumes and evaluates."""
import logging
import os

import pytest
import torch
from detectron2.config import instantiate
from detectron2.data.datasets import register_coco_instances
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.utils.events import EventStorage

from mabn_det.engine import LazyTrainer
from mabn_det.layers import CentredConv2d, MABN2d, PerLevelMABN2d
from mabn_det.lazy import mabn_norm, prepare_mabn_model
from tests.common import LAZY_RECIPES, load_tool, tiny_lazy_config

lazyconfig_train_net = load_tool("lazyconfig_train_net")


@pytest.mark.parametrize("path", LAZY_RECIPES, ids=os.path.basename)
def test_recipe_builds_mabn_everywhere_and_trains_a_step(path, batch_with_empty_image):
    torch.manual_seed(0)
    model = LazyTrainer.build_model(tiny_lazy_config(path))
    normed = [m for m in model.modules() if isinstance(m, Conv2d) and m.norm is not None]
    mabn = [m for m in model.modules() if isinstance(m, MABN2d)]
    # R18: stem + 8 blocks x 2 convs + 3 shortcuts; FPN: 4 lateral + 4 output; 4 box, 4 mask convs.
    assert len(normed) == len(mabn) == 1 + 16 + 3 + 8 + 4 + 4
    for conv in normed:
        assert isinstance(conv.norm, MABN2d) and type(conv) is CentredConv2d
    assert mabn[0].buffer_size == 2  # the shared `mabn` node reached every site

    model.train()
    with EventStorage():
        losses = model(batch_with_empty_image)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(int(m.iteration) == 1 for m in mabn[:-4])  # the mask head may have seen no RoI


class DeformConv(torch.nn.Module):
    """The layout of Detectron2's DeformConv (whose kernels this CPU build may lack): a conv with a
    ``norm`` attribute that is not a Detectron2 Conv2d."""

    def __init__(self, in_channels, out_channels, norm):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.norm = norm


def test_prepare_refuses_frozen_mabn_and_uncentrable_convs():
    cfg = tiny_lazy_config(LAZY_RECIPES[0])
    cfg.model.backbone.bottom_up.freeze_at = 2
    with pytest.raises(ValueError, match="freeze_at"):
        prepare_mabn_model(instantiate(cfg.model))
    with pytest.raises(ValueError, match=r"'0' \(DeformConv\) feeds MABN but cannot be"):
        prepare_mabn_model(torch.nn.Sequential(DeformConv(4, 4, norm=MABN2d(4))))
    with pytest.raises(ValueError, match=r"buffer_size=...\) must be ≥ 1, got 0"):
        mabn_norm(buffer_size=0)
    with pytest.raises(ValueError, match=r"kernel=...\) must be one of"):
        mabn_norm(kernel="cuda")


def test_prepare_refuses_a_retinanet_head_sharing_mabn_across_levels():
    def head(norm):
        return torch.nn.Sequential(RetinaNetHead(input_shape=[ShapeSpec(channels=8)] * 3,
                                                 num_classes=2, num_anchors=1, conv_dims=[8],
                                                 norm=norm))

    with pytest.raises(ValueError, match=r"'0.cls_subnet.1' would be shared by all FPN levels"):
        prepare_mabn_model(head(mabn_norm(buffer_size=2)))
    # The documented recipe: per-level BN, replaced by per-level MABN, then prepared.
    model = head("BN")
    PerLevelMABN2d.replace_cycle_batch_norms(model, buffer_size=2)
    prepare_mabn_model(model)
    assert type(model[0].cls_subnet[0]) is CentredConv2d


def test_lazy_trainer_decays_mabn_parameters_as_norms():
    cfg = tiny_lazy_config(LAZY_RECIPES[0])
    cfg.optimizer.params.weight_decay_norm = 0.0
    model = LazyTrainer.build_model(cfg)
    optimizer = LazyTrainer.build_optimizer(cfg, model)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    mabn = next(m for m in model.modules() if isinstance(m, MABN2d))
    conv = next(m for m in model.modules() if isinstance(m, CentredConv2d))
    assert decay[id(mabn.weight)] == decay[id(mabn.bias)] == 0.0
    assert decay[id(conv.weight)] == cfg.optimizer.weight_decay


def _write_config(tmp_path, dataset, evaluate=True, **train):
    """A config file for the tool: the 2x recipe shrunk by tiny_lazy_config, on `dataset`."""
    path = tmp_path / f"tiny_mabn_{len(list(tmp_path.glob('*.py')))}.py"
    path.write_text(
        "from tests.common import LAZY_RECIPES, tiny_lazy_config\n"
        "_cfg = tiny_lazy_config(LAZY_RECIPES[0])\n"
        "model, dataloader, optimizer, train, lr_multiplier, mabn = (_cfg.model, _cfg.dataloader, "
        "_cfg.optimizer, _cfg.train, _cfg.lr_multiplier, _cfg.mabn)\n"
        f"dataloader.train.dataset.names = {dataset!r}\n"
        f"dataloader.test.dataset.names = {dataset!r}\n"
        "dataloader.train.total_batch_size = 2\n"
        "dataloader.train.num_workers = dataloader.test.num_workers = 0\n"
        "dataloader.train.dataset.filter_empty = False\n"
        "optimizer.lr = 0.01\n"
        "model.roi_heads.box_predictor.test_score_thresh = 0.0\n"  # untrained: keep detections
        "lr_multiplier.warmup_length = 0.0\n"
        f"train.update({train!r})\n"
        + ("" if evaluate else "del dataloader.evaluator\n")
    )
    return str(path)


def _run(config, *opts):
    args = lazyconfig_train_net.default_argument_parser().parse_args(
        ["--config-file", config, *opts])
    return lazyconfig_train_net.main(args)


def test_tool_trains_resumes_exactly_and_evaluates(tiny_coco, tmp_path, caplog):
    """With gradient accumulation, and PreciseBN for MABN before the final evaluation."""
    caplog.set_level(logging.INFO, logger="mabn_det")
    register_coco_instances("tiny_lazy", {}, *tiny_coco)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    # Each step accumulates two micro-batches of one image.
    common = dict(max_iter=3, eval_period=0, log_period=1, checkpointer=dict(period=2),
                  grad_accumulation_steps=2, precise_bn=dict(enabled=True, num_iter=1))
    results = _run(_write_config(tmp_path, "tiny_lazy", output_dir=straight, **common))
    assert "bbox" in results and "segm" in results  # COCO AP, after the last iteration
    assert "Running PreciseBN for MABN over 1 batches" in caplog.text

    # Stop after 2 iterations: a fresh directory holding only the checkpoint of iteration 2.
    os.makedirs(resumed)
    os.link(os.path.join(straight, "model_0000001.pth"), os.path.join(resumed, "model_0000001.pth"))
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    _run(_write_config(tmp_path, "tiny_lazy", False, output_dir=resumed, **common), "--resume")
    load = lambda d: torch.load(os.path.join(d, "model_final.pth"), map_location="cpu",  # noqa
                                weights_only=False)["model"]
    expected, got = load(straight), load(resumed)
    # Two forwards per optimizer step: the step counters count micro-batches.
    assert int(expected["backbone.bottom_up.stem.conv1.norm.iteration"]) == 6
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
