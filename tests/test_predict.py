"""tools/predict.py: drawn PNGs and COCO-style JSON, for an MABN model and for its stock export,
from a YAML config (with or without MODEL.MABN keys) or a LazyConfig."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, instantiate
from detectron2.modeling import build_model
from PIL import Image

from mabn_det.deploy import export_for_stock_detectron2
from mabn_det.layers import MABN2d
from tests.common import load_tool, make_cfg

predict = load_tool("predict")
convert_for_deployment = load_tool("convert_for_deployment")


def _predict(config, weights, inputs, output, *extra):
    args = predict.argument_parser().parse_args(
        ["--config-file", config, "--weights", weights, "--input", *inputs, "--output", output,
         *extra])
    return predict.main(args)


@pytest.fixture(scope="module")
def mabn_checkpoint(tmp_path_factory):
    """(config.yaml, checkpoint, image dir with a PNG and a JPEG) of a tiny MABN model."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    cfg = make_cfg()
    DetectionCheckpointer(build_model(cfg), save_dir=str(root)).save("mabn")
    (root / "config.yaml").write_text(cfg.dump())
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (48, 64)), ("b.jpg", (64, 40))):
        pixels = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
        pixels[8:30, 10:34] = (220, 180, 40)
        Image.fromarray(pixels).save(images / name)
    return str(root / "config.yaml"), str(root / "mabn.pth"), images


def test_mabn_model_and_its_stock_export_predict_the_same(mabn_checkpoint, tmp_path):
    config, weights, images = mabn_checkpoint
    # Random weights score every class near 1/7: confidence 0 keeps the detections.
    got = _predict(config, weights, [str(images)], str(tmp_path / "mabn"), "--confidence", "0")
    assert got and json.loads((tmp_path / "mabn" / "instances.json").read_text()) == got
    for name in ("a", "b"):
        source = Image.open(next(images.glob(f"{name}.*")))
        assert Image.open(tmp_path / "mabn" / f"{name}.png").size == source.size
        mine = [d for d in got if d["file_name"].endswith(source.filename.split("/")[-1])]
        assert mine, name
        for detection in mine:
            assert set(detection) == {"file_name", "category_id", "bbox", "score", "segmentation"}
            assert mask_util.decode(detection["segmentation"]).shape == source.size[::-1]

    export = export_for_stock_detectron2(make_cfg(config), weights, str(tmp_path / "deploy"))
    stock = _predict(export, str(tmp_path / "deploy" / "model_final.pth"), [str(images)],
                     str(tmp_path / "stock"), "--confidence", "0")
    assert [d["file_name"] for d in stock] == [d["file_name"] for d in got]
    np.testing.assert_allclose([d["bbox"] for d in stock], [d["bbox"] for d in got], atol=1e-3)
    np.testing.assert_allclose([d["score"] for d in stock], [d["score"] for d in got], atol=1e-5)


def test_confidence_filters_and_bad_inputs_are_named(mabn_checkpoint, tmp_path):
    config, weights, images = mabn_checkpoint
    assert _predict(config, weights, [str(images / "a.png")], str(tmp_path / "high"),
                    "--confidence", "0.99") == []
    assert (tmp_path / "high" / "a.png").exists()
    with pytest.raises(FileNotFoundError, match="--input 'missing.png': no such file"):
        _predict(config, weights, ["missing.png"], str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="--weights 'nope.pth': no such weights file"):
        _predict(config, "nope.pth", [str(images)], str(tmp_path / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        _predict(config, weights, [str(tmp_path / "empty")], str(tmp_path / "x"))


def _assert_same_detections(got, expected):
    assert got and [d["file_name"] for d in got] == [d["file_name"] for d in expected]
    np.testing.assert_allclose([d["bbox"] for d in got], [d["bbox"] for d in expected], atol=1e-3)
    np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in expected],
                               atol=1e-5)


def test_yaml_relying_on_the_mabn_defaults_predicts(mabn_checkpoint, tmp_path):
    """A config that writes NORM: "MABN" and no MODEL.MABN key gets the defaults, as in training."""
    config, _, images = mabn_checkpoint
    keys = CfgNode(CfgNode.load_yaml_with_base(config))
    del keys.MODEL["MABN"]
    assert keys.MODEL.RESNETS.NORM == "MABN"
    without = tmp_path / "without_mabn_keys.yaml"
    without.write_text(keys.dump())
    cfg = make_cfg(str(without))
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("defaults")
    (tmp_path / "with_mabn_keys.yaml").write_text(cfg.dump())
    weights = str(tmp_path / "defaults.pth")

    got = _predict(str(without), weights, [str(images)], str(tmp_path / "a"), "--confidence", "0")
    expected = _predict(str(tmp_path / "with_mabn_keys.yaml"), weights, [str(images)],
                        str(tmp_path / "b"), "--confidence", "0")
    _assert_same_detections(got, expected)


LAZY_CONFIG = """
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from tests.common import LAZY_RECIPES, tiny_lazy_config
_cfg = tiny_lazy_config(LAZY_RECIPES[0])
model, dataloader, optimizer, train, lr_multiplier, mabn = (
    _cfg.model, _cfg.dataloader, _cfg.optimizer, _cfg.train, _cfg.lr_multiplier, _cfg.mabn)
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=96)]
"""


@pytest.fixture(scope="module")
def lazy_checkpoint(tmp_path_factory):
    """(config.py, checkpoint) of a tiny MABN LazyConfig model whose MABN statistics and affine
    parameters are not their initial values."""
    from detectron2.config import LazyConfig

    root = tmp_path_factory.mktemp("lazy_predict")
    config = root / "tiny_mabn.py"
    config.write_text(LAZY_CONFIG)
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(str(config)).model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MABN2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    DetectionCheckpointer(model, save_dir=str(root)).save("mabn")
    return str(config), str(root / "mabn.pth")


def test_lazy_config_and_its_stock_export_predict_the_same(lazy_checkpoint, mabn_checkpoint,
                                                           tmp_path):
    config, weights = lazy_checkpoint
    images = mabn_checkpoint[2]
    got = _predict(config, weights, [str(images)], str(tmp_path / "mabn"), "--confidence", "0")
    assert {d["file_name"].rsplit("/", 1)[-1] for d in got} == {"a.png", "b.jpg"}
    assert json.loads((tmp_path / "mabn" / "instances.json").read_text()) == got

    export = convert_for_deployment.main(["--config-file", config, "--weights", weights,
                                          "--output", str(tmp_path / "deploy")])
    assert predict.is_lazy_config(export)
    stock = _predict(export, str(tmp_path / "deploy" / "model_final.pth"), [str(images)],
                     str(tmp_path / "stock"), "--confidence", "0")
    _assert_same_detections(stock, got)
