"""tools/convert_bn_checkpoint.py: a BN model's checkpoint, in each format it comes in (Detectron2
.pth with BN or FrozenBN, MSRA/Caffe2 .pkl, torchvision), becomes one that the MABN model of a
config loads and that computes, in eval mode, what the BN model computed; the authors' centred
mode is not exact; the export still folds; wrong checkpoints are refused by name."""
import os
import pickle
import re

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from mabn_det.bn_checkpoint import torchvision_to_detectron2_names
from mabn_det.modeling import stock_inference_config
from mabn_det.lazy import stock_lazy_config
from mabn_det.layers import CentredConv2d, MABN2d, convert_to_inference_form
from tests.common import TINY_MABN_CONFIG, load_tool, make_cfg, train_opts

convert_tool = load_tool("convert_bn_checkpoint")
train_net = load_tool("train_net")
lazyconfig_train_net = load_tool("lazyconfig_train_net")

# The tiny R18-FPN with torchvision's R18 widths (64-channel stem), and an MABN ε other than BN's,
# which the conversion must carry in running_var.
OPTS = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "64", "MODEL.MABN.EPS", "1e-3",
        "MODEL.ROI_HEADS.NUM_CLASSES", "2", "MODEL.MABN.BUFFER_SIZE", "2"]
NORM_KEYS = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")


def _cfg(*opts):
    return make_cfg(opts=[*OPTS, *opts])


def _bn_model(cfg, norm="BN"):
    """The BN twin of the MABN config `cfg`, with `norm` in every MABN site."""
    stock = stock_inference_config(cfg)
    for key in NORM_KEYS:
        stock.MODEL[key].NORM = norm
    return build_model(stock)


@torch.no_grad()
def _randomise_(module: nn.Module, calibrate, seed=0):
    """Filters whose means are far from 0 (so that centring them would show), random γ and β, and
    the running statistics of a batch of 12 random images (neither 0 nor 1, and keeping the
    activations of every depth near unit scale)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.add_(torch.randn(m.out_channels, 1, 1, 1, generator=g) * m.weight.std())
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    module.train()
    calibrate(torch.randn(12, 3, 64, 64, generator=g))
    module.eval()


@pytest.fixture(scope="module")
def randomised_bn(tmp_path_factory):
    """A checkpoint of `_bn_model(_cfg())` after `_randomise_`, made once for the tests that
    convert it: the randomisation runs the backbone on 12 images, these tests' costliest step."""
    bn = _bn_model(_cfg())
    _randomise_(bn, bn.backbone)
    path = tmp_path_factory.mktemp("randomised_bn") / "bn.pth"
    torch.save({"model": bn.state_dict()}, path)
    return path


def _randomised_bn_model(randomised_bn, cfg):
    """The BN twin of `cfg`, an MABN config whose BN twin is that of `_cfg()`, in eval mode with
    the weights and statistics of `randomised_bn`."""
    bn = _bn_model(cfg)
    bn.load_state_dict(torch.load(randomised_bn)["model"])
    return bn.eval()


def _mabn_model(cfg, weights):
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return model


def _convert(cfg_opts, source, output, *flags, config_file=TINY_MABN_CONFIG):
    """The tool on the tiny config with OPTS and `cfg_opts` (none for a LazyConfig)."""
    opts = [*OPTS, *cfg_opts] if config_file == TINY_MABN_CONFIG else list(cfg_opts)
    args = convert_tool.argument_parser().parse_args(
        ["--config-file", config_file, "--input", str(source), "--output", str(output), *flags,
         *opts])
    return convert_tool.main(args)


def _assert_same(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for key in expected:
        scale = expected[key].abs().max()
        assert 0.05 < scale < 1e3, (key, scale)  # the comparison is not of zeros or overflows
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{key}: {m}")


X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("norm, centred", [("BN", True), ("FrozenBN", True), ("BN", False)])
def test_detectron2_checkpoint_gives_the_same_backbone_and_fpn(norm, centred, randomised_bn,
                                                               tmp_path):
    """BN and FrozenBN checkpoints; and a model whose convs are not centred
    (MODEL.MABN.CENTRED_CONV False), which needs no offset: the BN mean goes into β."""
    opts = ["MODEL.MABN.CENTRED_CONV", str(centred)]
    cfg = _cfg(*opts)
    bn = _randomised_bn_model(randomised_bn, cfg)  # the BN twin does not centre
    if norm == "FrozenBN":
        bn = FrozenBatchNorm2d.convert_frozen_batchnorm(bn)
    torch.save({"model": bn.state_dict()}, tmp_path / "bn.pth")
    out = _convert(opts, tmp_path / "bn.pth", tmp_path / "mabn.pth")

    model = _mabn_model(cfg, out)
    with torch.no_grad():
        _assert_same(model.backbone(X), bn.backbone(X))
    # Every normalised conv (backbone, FPN, heads) was converted, with an offset where centred.
    pairs = [m for m in model.modules() if isinstance(getattr(m, "norm", None), MABN2d)]
    assert len(pairs) == 20 + 8 + 4 + 4  # R18 with shortcuts, FPN, box convs, mask convs
    offsets = [m._modules.get("pretrained_offset") for m in pairs]
    if centred:
        assert all(int(offset.fade_iters) == 1000 for offset in offsets)
    else:
        assert offsets == [None] * len(pairs) and not any(isinstance(m, CentredConv2d)
                                                         for m in pairs)


def _c2_name(name: str) -> str:
    """Detectron2's ResNet names as MSRA's Caffe2 .pkl spells them (R-50.pkl: conv1_w,
    res_conv1_bn_s, res2_0_branch2a_w, res2_0_branch1_bn_b, ...)."""
    name = re.sub(r"norm\.(weight|bias|running_mean|running_var)$",
                  lambda m: "bn." + {"weight": "s", "bias": "b", "running_mean": "rm",
                                     "running_var": "riv"}[m.group(1)], name)
    name = re.sub(r"\.weight$", ".w", name)
    name = name.replace("stem.conv1.bn.", "res_conv1_bn.").replace("stem.conv1.w", "conv1.w")
    for d2, c2 in (("shortcut", "branch1"), ("conv1", "branch2a"), ("conv2", "branch2b"),
                   ("conv3", "branch2c")):
        name = name.replace(f".{d2}.", f".{c2}.")
    return name.replace(".", "_")


@pytest.mark.parametrize("with_statistics", [False, True], ids=["scale_bias", "statistics"])
def test_caffe2_pkl_gives_the_same_resnet(with_statistics, randomised_bn, tmp_path):
    """MSRA's form (scale and bias: Detectron2 fills running_mean 0, running_var 1), and the form
    with running statistics (_bn_rm, _bn_riv)."""
    cfg = _cfg()
    frozen = _randomised_bn_model(randomised_bn, cfg)
    resnet = FrozenBatchNorm2d.convert_frozen_batchnorm(frozen.backbone.bottom_up)
    if not with_statistics:
        for m in resnet.modules():
            if isinstance(m, FrozenBatchNorm2d):
                scale = m.weight / torch.sqrt(m.running_var + m.eps)
                m.weight.copy_(scale * (1 + m.eps) ** 0.5)  # d2 divides by √(1 + ε)
                m.bias.sub_(m.running_mean * scale)
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    blobs = {_c2_name(k): v.numpy() for k, v in resnet.state_dict().items()
             if not k.endswith("num_batches_tracked")
             and (with_statistics or not k.endswith(("running_mean", "running_var")))}
    assert {"conv1_w", "res_conv1_bn_s", "res2_0_branch2a_w", "res3_0_branch1_bn_b"} <= set(blobs)
    blobs["fc1000_w"] = torch.randn(1000, 512).numpy()  # the classifier, unused
    with open(tmp_path / "R-18.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f)
    out = _convert([], tmp_path / "R-18.pkl", tmp_path / "mabn.pth")

    model = _mabn_model(cfg, out)
    with torch.no_grad():
        _assert_same(model.backbone.bottom_up(X), resnet(X))
    # An ImageNet checkpoint has no FPN: left to the fine-tuning run's initialisation.
    assert not any(k.startswith("backbone.fpn") for k in torch.load(out)["model"])


def _torchvision_features(resnet, x):
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    features = {}
    for i in range(1, 5):
        x = features[f"res{i + 1}"] = getattr(resnet, f"layer{i}")(x)
    return features


R50_NARROW = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
              "MODEL.RESNETS.WIDTH_PER_GROUP", "16", "MODEL.RESNETS.STRIDE_IN_1X1", "False"]


@pytest.mark.parametrize("depth, backbone_norm", [(18, "MABN"), (50, "MABN"), (18, "FrozenBN")])
def test_torchvision_resnet_gives_the_same_resnet(depth, backbone_norm, tmp_path):
    """Into MABN (BasicBlock; Bottleneck, whose stride torchvision puts in the 3x3 conv, with
    narrow bottlenecks), and into the FrozenBN backbone of the MABN-heads recipe (a renaming)."""
    torch.manual_seed(0)
    if depth == 18:
        resnet, opts = torchvision.models.resnet18(weights=None), []
    else:
        resnet, opts = torchvision.models.resnet50(weights=None, width_per_group=16), R50_NARROW
    _randomise_(resnet, resnet)
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    opts = [*opts, "MODEL.RESNETS.NORM", backbone_norm]
    out = _convert(opts, tmp_path / "resnet.pth", tmp_path / "converted.pth")

    model = _mabn_model(_cfg(*opts), out)
    with torch.no_grad():
        _assert_same(model.backbone.bottom_up(X), _torchvision_features(resnet, X))


def test_torchvision_names():
    state = torchvision.models.resnet50(weights=None).state_dict()
    renamed = torchvision_to_detectron2_names(state)
    assert {"stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv3.norm.bias",
            "res2.0.shortcut.weight", "res2.0.shortcut.norm.running_mean",
            "res5.2.conv2.weight"} <= set(renamed)
    assert not any(k.startswith("fc.") or "num_batches_tracked" in k or "layer" in k
                   for k in renamed)


def test_centred_filters_mode_is_only_the_centring_and_not_exact(randomised_bn, tmp_path):
    """The authors' approach: no offsets; in eval mode the model is the BN model with each filter
    centred, and differs from the BN model itself."""
    cfg = _cfg()
    bn = _randomised_bn_model(randomised_bn, cfg)
    out = _convert([], randomised_bn, tmp_path / "centred.pth", "--centre-filters")
    assert not any("pretrained_offset" in k for k in torch.load(out)["model"])
    model = _mabn_model(cfg, out)
    with torch.no_grad():
        got = model.backbone(X)
        assert (got["p2"] - bn.backbone(X)["p2"]).abs().max() > 0.1
        for m in bn.modules():
            if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "norm", None), nn.BatchNorm2d):
                m.weight.sub_(m.weight.mean(dim=(1, 2, 3), keepdim=True))
        _assert_same(got, bn.backbone(X))


def test_export_folds_the_offsets_for_stock_detectron2(randomised_bn, tmp_path):
    cfg = _cfg()
    bn = _randomised_bn_model(randomised_bn, cfg)
    model = _mabn_model(cfg, _convert([], randomised_bn, tmp_path / "mabn.pth"))
    stock = build_model(stock_inference_config(cfg)).eval()
    stock.load_state_dict(convert_to_inference_form(model).state_dict(), strict=True)
    with torch.no_grad():
        _assert_same(stock.backbone(X), bn.backbone(X))


def test_from_scratch_models_have_no_offsets():
    model = build_model(_cfg())
    assert not any("pretrained_offset" in k for k in model.state_dict())


def _bn_checkpoint(tmp_path, cfg_opts=(), norm="BN"):
    bn = _bn_model(_cfg(*cfg_opts), norm)
    path = tmp_path / f"{norm}.pth"
    torch.save({"model": bn.state_dict()}, path)
    return path


def test_a_checkpoint_of_another_width_is_refused_naming_the_tensor(tmp_path):
    source = _bn_checkpoint(tmp_path, ["MODEL.FPN.OUT_CHANNELS", "32"])
    with pytest.raises(ValueError, match=r"does not fit the config's model: backbone\.fpn_lateral2"
                                         r"\.weight: \(32, 64, 1, 1\) in the checkpoint, "
                                         r"\(64, 64, 1, 1\) in the model"):
        _convert([], source, tmp_path / "out.pth")


def test_a_checkpoint_of_a_shallower_resnet_is_refused(tmp_path):
    source = _bn_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"no tensor \(or one of another shape\) for \d+ of the "
                                         r"\d+ tensors of the config's ResNet, e\.g\. "
                                         r"backbone\.bottom_up\.res2\.2\.conv1\.weight"):
        _convert(["MODEL.RESNETS.DEPTH", "34"], source, tmp_path / "out.pth")


def test_a_group_norm_checkpoint_is_refused(tmp_path):
    source = _bn_checkpoint(tmp_path, norm="GN")
    with pytest.raises(ValueError, match=r"GN\.pth has no running statistics for backbone\.\S+"
                                         r"\.norm \(a GroupNorm"):
        _convert([], source, tmp_path / "out.pth")


def test_a_norm_only_partly_in_the_checkpoint_is_refused(tmp_path):
    source = _bn_checkpoint(tmp_path)
    state = torch.load(source)
    del state["model"]["backbone.fpn_output3.norm.running_mean"]
    torch.save(state, source)
    with pytest.raises(ValueError, match=r"holds only part of conv backbone\.fpn_output3 and its "
                                         r"norm: .*missing \['backbone\.fpn_output3\.norm\."
                                         r"running_mean'\]"):
        _convert([], source, tmp_path / "out.pth")


def test_torchvision_weights_with_the_stride_in_the_1x1_conv_are_refused(tmp_path):
    resnet = torchvision.models.resnet50(weights=None, width_per_group=16)
    torch.save(resnet.state_dict(), tmp_path / "r50.pth")
    opts = [*R50_NARROW, "MODEL.RESNETS.STRIDE_IN_1X1", "True"]
    with pytest.raises(ValueError, match=r"set MODEL\.RESNETS\.STRIDE_IN_1X1 False .* got True"):
        _convert(opts, tmp_path / "r50.pth", tmp_path / "out.pth")


def test_train_net_fine_tunes_a_converted_checkpoint_and_resumes_its_fade_exactly(
        tiny_coco, randomised_bn, tmp_path):
    """Offsets fading over 3 iterations in a 4-iteration run; a run resumed from the checkpoint of
    iteration 2 ends bit-identical to the uninterrupted one, offsets included."""
    weights = _convert([], randomised_bn, tmp_path / "mabn.pth", "--fade-iters", "3")
    common = {"MODEL.WEIGHTS": weights, "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
              "MODEL.MABN.EPS": 1e-3, "SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 2,
              "SEED": -1}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train_net(["--register-coco", "tiny_from_bn", *tiny_coco],
               train_opts(str(straight), "tiny_from_bn", **common))
    load = lambda path: torch.load(path, map_location="cpu", weights_only=False)["model"]  # noqa
    offset = "backbone.bottom_up.res3.0.conv1.pretrained_offset."
    halfway, expected = load(straight / "model_0000001.pth"), load(straight / "model_final.pth")
    assert int(halfway[offset + "iteration"]) == 2 and int(expected[offset + "iteration"]) == 4
    assert int(expected[offset + "fade_iters"]) == 3
    assert torch.equal(expected[offset + "filter_mean"], load(weights)[offset + "filter_mean"])

    resumed.mkdir()
    os.link(straight / "model_0000001.pth", resumed / "model_0000001.pth")
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    _train_net(["--resume"], train_opts(str(resumed), "tiny_from_bn", **common))
    got = load(resumed / "model_final.pth")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} differs after resume"


def _train_net(args, opts):
    return train_net.main(train_net.argument_parser().parse_args(
        [*args, "--config-file", TINY_MABN_CONFIG, *opts]))


def _lazy_bn_model(cfg):
    """The BN twin of the LazyConfig `cfg`: its MABN model with "BN" at every MABN site."""
    stock = stock_lazy_config(cfg)
    bottom_up, heads = stock.model.backbone.bottom_up, stock.model.roi_heads
    bottom_up.stem.norm = bottom_up.stages.norm = stock.model.backbone.norm = "BN"
    heads.box_head.conv_norm = heads.mask_head.conv_norm = "BN"
    return instantiate(stock.model)


LAZY_CONFIG = """
from tests.common import LAZY_RECIPES, tiny_lazy_config
_cfg = tiny_lazy_config(LAZY_RECIPES[0])
model, dataloader, optimizer, train, lr_multiplier, mabn = (
    _cfg.model, _cfg.dataloader, _cfg.optimizer, _cfg.train, _cfg.lr_multiplier, _cfg.mabn)
dataloader.train.dataset.names = dataloader.test.dataset.names = "tiny_lazy_from_bn"
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = dataloader.test.num_workers = 0
dataloader.train.dataset.filter_empty = False
del dataloader.evaluator
lr_multiplier.warmup_length = 0.0
optimizer.lr = 0.01
"""


def test_lazyconfig_conversion_is_exact_and_the_lazy_tool_fine_tunes_it(tiny_coco, tmp_path):
    config_file = tmp_path / "tiny_lazy.py"
    config_file.write_text(LAZY_CONFIG)
    cfg = LazyConfig.load(str(config_file))
    bn = _lazy_bn_model(cfg)
    _randomise_(bn, bn.backbone)
    torch.save({"model": bn.state_dict()}, tmp_path / "bn.pth")
    weights = _convert([], tmp_path / "bn.pth", tmp_path / "mabn.pth",
                       config_file=str(config_file))
    model = instantiate(cfg.model).eval()
    DetectionCheckpointer(model).load(weights)
    with torch.no_grad():
        _assert_same(model.backbone(X), bn.backbone(X))

    if "tiny_lazy_from_bn" not in DatasetCatalog.list():
        register_coco_instances("tiny_lazy_from_bn", {}, *tiny_coco)
    output = tmp_path / "out"
    lazyconfig_train_net.main(lazyconfig_train_net.default_argument_parser().parse_args(
        ["--config-file", str(config_file), f"train.init_checkpoint={weights}",
         f"train.output_dir={output}", "train.max_iter=2", "train.eval_period=0",
         "train.checkpointer.period=100"]))
    state = torch.load(output / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert int(state["backbone.fpn_output2.pretrained_offset.iteration"]) == 2
    for key, value in state.items():
        assert torch.isfinite(value.float()).all(), key
