"""MABN in LazyConfig recipes: `instantiate(cfg.model)` alone gives the centred, checked MABN model,
every norm asked for is an MABN2d after a centred conv, the configs survive LazyConfig.save, a
training step with an empty image works, and tools/lazyconfig_train_net.py trains, resumes and
evaluates (the LSJ recipe with its own augmentation)."""
import json
import os

import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.utils.events import EventStorage

from mabn_det.config import check_training, load_config
from mabn_det.engine import ResumableBatches
from mabn_det.engine.lazy_training import (build_lazy_model, build_lazy_optimizer,
                                           build_lazy_train_loader)
from mabn_det.layers import CentredConv2d, MABN2d, PerLevelMABN2d
from mabn_det.lazy import mabn_norm, target_callable
from mabn_det.modeling import prepare_mabn_model
from tests.common import LAZY_RECIPES, REPO, count_calls, load_tool, tiny_lazy_config

lazyconfig_train_net = load_tool("lazyconfig_train_net")


@pytest.mark.parametrize("path", LAZY_RECIPES, ids=os.path.basename)
def test_recipe_builds_mabn_everywhere_and_trains_a_step(path, batch_with_empty_image):
    torch.manual_seed(0)
    model = build_lazy_model(tiny_lazy_config(path))
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


@pytest.mark.parametrize("path", LAZY_RECIPES, ids=os.path.basename)
def test_instantiate_alone_gives_the_model_our_trainer_trains(path):
    """Detectron2's own tools/lazyconfig_train_net.py trains `instantiate(cfg.model)`."""
    cfg = tiny_lazy_config(path)
    torch.manual_seed(0)
    plain = instantiate(cfg.model)
    torch.manual_seed(0)
    ours = build_lazy_model(cfg)
    assert [type(m) for m in plain.modules()] == [type(m) for m in ours.modules()]
    normed = [m for m in plain.modules() if isinstance(getattr(m, "norm", None), MABN2d)]
    assert len(normed) == 36 and all(type(conv) is CentredConv2d for conv in normed)
    expected = ours.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_prepare_is_idempotent_and_keeps_how_the_model_was_prepared():
    cfg = tiny_lazy_config(LAZY_RECIPES[0])
    cfg.model.centred_conv = False  # the ablation, written in the model node
    model = instantiate(cfg.model)
    assert not any(isinstance(m, CentredConv2d) for m in model.modules())
    assert prepare_mabn_model(model) is model  # what build_lazy_model does after instantiate
    assert not any(isinstance(m, CentredConv2d) for m in model.modules())
    with pytest.raises(ValueError, match="prepared with centred_conv=False, got centred_conv=True"):
        prepare_mabn_model(model, centred_conv=True)

    # A user's own model node, without as_mabn_model: the trainer's call prepares it.
    cfg.model._target_ = target_callable(cfg.model.pop("meta_architecture"))
    cfg.model.pop("centred_conv")
    model = instantiate(cfg.model)
    assert not any(isinstance(m, CentredConv2d) for m in model.modules())
    prepare_mabn_model(model)
    assert sum(isinstance(m, CentredConv2d) for m in model.modules()) == 36


@pytest.mark.parametrize("path", LAZY_RECIPES, ids=os.path.basename)
def test_saved_config_loads_back_whole_and_builds_the_same_model(path, tmp_path):
    saved, again = str(tmp_path / "saved.yaml"), str(tmp_path / "again.yaml")
    LazyConfig.save(LazyConfig.load(path), saved)
    loaded = LazyConfig.load(saved)
    LazyConfig.save(loaded, again)
    assert not os.path.exists(saved + ".pkl")  # save falls back to pickle when YAML fails
    with open(saved) as a, open(again) as b:
        assert a.read() == b.read()
    # The norms still point at the one `mabn` node, so one override reaches every site.
    assert "norm: ${mabn}" in open(saved).read()
    assert (instantiate(loaded.model.backbone.norm)(4).buffer_size
            == instantiate(LazyConfig.load(path).mabn)(4).buffer_size)

    tiny = tiny_lazy_config(path)
    LazyConfig.save(tiny, saved)
    original, reloaded = (
        instantiate(LazyConfig.apply_overrides(cfg, ["mabn.buffer_size=3",
                                                     "model.backbone.bottom_up.freeze_at=0"]).model)
        for cfg in (tiny, LazyConfig.load(saved)))
    # The YAML sorts the keys, so the modules are built in another order from other random draws:
    # the same modules, shapes and settings, not the same initial values.
    assert ([(name, type(m)) for name, m in original.named_modules()]
            == [(name, type(m)) for name, m in reloaded.named_modules()])
    assert {m.buffer_size for m in reloaded.modules() if isinstance(m, MABN2d)} == {3}
    assert type(reloaded.backbone.bottom_up.stem.conv1) is CentredConv2d  # still prepared
    reloaded.load_state_dict(original.state_dict())  # strict: every key and shape matches


def test_lsj_model_trains_under_cpu_bfloat16_autocast(batch_with_empty_image):
    """The LSJ recipe trains with AMP. Detectron2's AMPTrainer needs CUDA (see
    test_lsj_recipe_trains_through_the_tool); on CPU, PyTorch's bfloat16 autocast runs the same
    mixed-precision model: convs and MABN inputs in bfloat16, MABN statistics in float32."""
    torch.manual_seed(0)
    model = instantiate(tiny_lazy_config(LAZY_RECIPES[1]).model).train()
    mabn = [m for m in model.modules() if isinstance(m, MABN2d)]
    input_dtypes = set()
    for m in mabn:
        m.register_forward_pre_hook(lambda _, args: input_dtypes.add(args[0].dtype))
    with EventStorage():
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = model(batch_with_empty_image)
            total = sum(losses.values())
            assert torch.isfinite(total), losses
            total.backward()
    assert input_dtypes == {torch.bfloat16}
    for m in mabn[:-4]:  # the mask head may have seen no RoI
        assert int(m.iteration) == 2 and m.running_var.dtype == torch.float32
        assert torch.isfinite(m.running_var).all() and torch.isfinite(m.weight.grad).all()


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


@pytest.mark.parametrize("path", LAZY_RECIPES, ids=os.path.basename)
def test_mabn_parameters_decay_as_norms_with_our_trainer_and_with_detectron2s(path):
    cfg = tiny_lazy_config(path)
    cfg.optimizer.params.weight_decay_norm = 0.0
    model = build_lazy_model(cfg)
    # Detectron2's tools/lazyconfig_train_net.py builds the optimizer so.
    cfg.optimizer.params.model = model
    for optimizer in (build_lazy_optimizer(cfg, model), instantiate(cfg.optimizer)):
        decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        mabn = next(m for m in model.modules() if isinstance(m, MABN2d))
        conv = next(m for m in model.modules() if isinstance(m, CentredConv2d))
        assert decay[id(mabn.weight)] == decay[id(mabn.bias)] == 0.0
        assert decay[id(conv.weight)] == cfg.optimizer.weight_decay


@pytest.mark.parametrize("path", LAZY_RECIPES, ids=os.path.basename)
def test_recipes_keep_as_many_checkpoints_as_the_yaml_recipes(path):
    yaml = load_config(os.path.join(REPO, "configs", "mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml"))
    checkpointer = LazyConfig.load(path).train.checkpointer
    assert checkpointer.max_to_keep == yaml.SOLVER.CHECKPOINT_MAX_TO_KEEP == 3
    if "2x" in path:  # the YAML recipe's twin
        assert checkpointer.period == yaml.SOLVER.CHECKPOINT_PERIOD


@pytest.mark.parametrize("path", LAZY_RECIPES, ids=os.path.basename)
def test_recipes_train_on_the_resumable_stream_and_detectron2s_loader_stays_its_own(
        path, tiny_coco):
    if "tiny_lazy_loader" not in DatasetCatalog.list():
        register_coco_instances("tiny_lazy_loader", {}, *tiny_coco)
    cfg = tiny_lazy_config(path)
    cfg.dataloader.train.dataset.names = "tiny_lazy_loader"
    cfg.dataloader.train.num_workers = 0
    assert isinstance(build_lazy_train_loader(cfg, seed=1).batch_sampler, ResumableBatches)
    cfg.dataloader.train._target_ = build_detection_train_loader
    stock = build_lazy_train_loader(cfg, seed=1)
    assert not isinstance(getattr(stock, "batch_sampler", None), ResumableBatches)


# The LSJ recipe's own training augmentation (large-scale jitter, then a fixed-size crop, then a
# flip), at 64 px instead of 1024.
_LSJ_AUGMENTATION = (
    "from detectron2.config import LazyConfig\n"
    "dataloader.train.mapper.augmentations = "
    "LazyConfig.load(LAZY_RECIPES[1]).dataloader.train.mapper.augmentations\n"
    "dataloader.train.mapper.augmentations[0].update(target_height=64, target_width=64)\n"
    "dataloader.train.mapper.augmentations[1].crop_size = (64, 64)\n"
    # As on COCO: the mapper recomputes boxes from masks, which Detectron2's DatasetMapper cannot
    # do for an image without annotations.
    "dataloader.train.dataset.filter_empty = True\n"
    # The test's dataset holds RLE masks (see test_lsj_recipe_trains_through_the_tool).
    "dataloader.train.mapper.instance_mask_format = 'bitmask'\n"
)


def _write_config(tmp_path, dataset, evaluate=True, recipe=0, **train):
    """A config file for the tool: recipe `recipe` of LAZY_RECIPES shrunk by tiny_lazy_config, on
    `dataset`; the LSJ recipe keeps its own training augmentation."""
    path = tmp_path / f"tiny_mabn_{len(list(tmp_path.glob('*.py')))}.py"
    path.write_text(
        "from tests.common import LAZY_RECIPES, tiny_lazy_config\n"
        f"_cfg = tiny_lazy_config(LAZY_RECIPES[{recipe}])\n"
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
        + (_LSJ_AUGMENTATION if recipe == 1 else "")
    )
    return str(path)


def _run(config, *opts):
    args = lazyconfig_train_net.default_argument_parser().parse_args(
        ["--config-file", config, *opts])
    return lazyconfig_train_net.main(args)


def test_tool_trains_resumes_exactly_and_evaluates(tiny_coco, tmp_path):
    """With gradient accumulation, and PreciseBN for MABN before the final evaluation."""
    register_coco_instances("tiny_lazy", {}, *tiny_coco)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    # Each step accumulates two micro-batches of one image.
    common = dict(max_iter=3, eval_period=0, log_period=1, checkpointer=dict(period=2),
                  grad_accumulation_steps=2, precise_bn=dict(enabled=True, num_iter=1))
    results = _run(_write_config(tmp_path, "tiny_lazy", output_dir=straight, **common))
    assert "bbox" in results and "segm" in results  # COCO AP, after the last iteration
    with open(os.path.join(straight, "log.txt")) as log:  # the tool logs mabn_det there too
        assert "Running PreciseBN for MABN over 1 batches" in log.read()

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


def test_tool_checks_the_training_settings_once(tiny_coco, tmp_path, monkeypatch):
    if "tiny_lazy_once" not in DatasetCatalog.list():
        register_coco_instances("tiny_lazy_once", {}, *tiny_coco)
    checks = count_calls(monkeypatch, check_training)
    _run(_write_config(tmp_path, "tiny_lazy_once", False, output_dir=str(tmp_path / "out"),
                       max_iter=1, eval_period=0, log_period=1, checkpointer=dict(period=100)))
    assert len(checks) == 1


def _with_rle_masks(json_path, directory):
    """A copy of the COCO json at `json_path`, in `directory`, with polygon masks as RLE."""
    data = json.loads(open(json_path).read())
    size = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    for annotation in data["annotations"]:
        rles = mask_util.frPyObjects(annotation["segmentation"], *size[annotation["image_id"]])
        rle = mask_util.merge(rles)
        annotation["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    path = directory / "instances_rle.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("amp", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="AMP: Detectron2 0.7.2's AMPTrainer.run_step asserts torch.cuda.is_available(); on CPU "
           "test_lsj_model_trains_under_cpu_bfloat16_autocast runs the mixed-precision model"))])
def test_lsj_recipe_trains_through_the_tool(amp, tiny_coco, tmp_path):
    """The LSJ recipe, shrunk, through tools/lazyconfig_train_net.py with its crop augmentation,
    and with AMP where AMP can run."""
    if "tiny_lsj" not in DatasetCatalog.list():
        # RLE masks: cropping polygons (COCO's format) needs the shapely package, which the
        # test environment does not install.
        register_coco_instances("tiny_lsj", {}, _with_rle_masks(tiny_coco[0], tmp_path),
                                tiny_coco[1])
    output = tmp_path / "out"
    config = _write_config(tmp_path, "tiny_lsj", False, recipe=1, output_dir=str(output),
                           max_iter=2, eval_period=0, log_period=1, checkpointer=dict(period=100),
                           amp=dict(enabled=amp), device="cuda" if amp else "cpu")
    cfg = LazyConfig.load(config)
    assert cfg.train.amp.enabled == amp and cfg.dataloader.train.mapper.recompute_boxes
    assert ([type(a) for a in instantiate(cfg.dataloader.train.mapper.augmentations)]
            == [T.ResizeScale, T.FixedSizeCrop, T.RandomFlip])

    _run(config)
    state = torch.load(output / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert int(state["backbone.bottom_up.stem.conv1.norm.iteration"]) == 2
    for key, value in state.items():
        assert torch.isfinite(value.float()).all(), key
