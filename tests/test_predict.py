"""tools/predict.py: drawn PNGs and COCO-style JSON, for an MABN model and for its stock export."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image

from mabn_det.deploy import export_for_stock_detectron2
from tests.common import load_tool, make_cfg

predict = load_tool("predict")


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
