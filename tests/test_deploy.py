"""A converted checkpoint runs in stock Detectron2, without mabn_det, and predicts the same boxes:
from a YAML config, and from a LazyConfig (whose export is a LazyConfig saved as YAML)."""
import json
import subprocess
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

from mabn_det.deploy import export_for_stock_detectron2
from tests.common import (LAZY_RECIPES, make_cfg, synthetic_image, tiny_lazy_config,
                          train_checking_finite)

STOCK_PREDICT = r"""
import json, sys, torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
cfg = get_cfg()
cfg.merge_from_file(sys.argv[1])
model = build_model(cfg).eval()
DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
image = torch.load(sys.argv[2])
with torch.no_grad():
    out = model([{"image": image, "height": 64, "width": 64}])[0]["instances"]
assert not any(name.startswith("mabn_det") for name in sys.modules), "mabn_det was imported"
print(json.dumps({"boxes": out.pred_boxes.tensor.tolist(), "scores": out.scores.tolist(),
                  "masks": out.pred_masks.float().mean().item()}))
"""


def test_converted_checkpoint_predicts_the_same_in_stock_detectron2(tmp_path):
    torch.manual_seed(0)
    # A non-default ε: stock Detectron2 rebuilds its FrozenBN with ε = 1e-5, so the export must
    # carry MABN's ε in the variances.
    cfg = make_cfg(opts=["MODEL.MABN.WARMUP_ITERS", "0", "MODEL.MABN.BUFFER_SIZE", "2",
                         "MODEL.MABN.EPS", "0.01", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    model = build_model(cfg)
    batch = [synthetic_image(boxes=[(8, 8, 30, 28)], seed=s) for s in range(2)]
    # moves weights and MABN statistics away from their initial values
    train_checking_finite(model, batch, steps=3)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("mabn")
    config = export_for_stock_detectron2(cfg, str(tmp_path / "mabn.pth"), str(tmp_path / "deploy"))
    _assert_stock_predicts_the_same(STOCK_PREDICT, config, model, batch[0]["image"], tmp_path)


STOCK_LAZY_PREDICT = r"""
import json, sys, torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
cfg = LazyConfig.load(sys.argv[1])
model = instantiate(cfg.model).eval()
DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
image = torch.load(sys.argv[2])
with torch.no_grad():
    out = model([{"image": image, "height": 64, "width": 64}])[0]["instances"]
assert not any(name.startswith(("mabn_det", "tests")) for name in sys.modules), "mabn_det imported"
print(json.dumps({"boxes": out.pred_boxes.tensor.tolist(), "scores": out.scores.tolist()}))
"""


def test_converted_lazy_config_checkpoint_predicts_the_same_in_stock_detectron2(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_lazy_config(LAZY_RECIPES[1])
    cfg.mabn.eps = 0.01  # stock FrozenBN has ε = 1e-5: the export must carry MABN's ε
    cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0
    model = instantiate(cfg.model)
    batch = [synthetic_image(boxes=[(8, 8, 30, 28)], seed=s) for s in range(2)]
    # moves weights and MABN statistics away from their initial values
    train_checking_finite(model, batch, steps=3)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("mabn")
    config = export_for_stock_detectron2(cfg, str(tmp_path / "mabn.pth"), str(tmp_path / "deploy"))
    stock = LazyConfig.load(config)
    assert "mabn" not in stock and stock.model.backbone.norm == "FrozenBN"
    assert stock.model._target_.endswith("GeneralizedRCNN")
    assert not stock.optimizer.params._target_.startswith("mabn_det")
    assert stock.dataloader.train._target_.startswith("detectron2.")
    _assert_stock_predicts_the_same(STOCK_LAZY_PREDICT, config, model, batch[0]["image"],
                                    tmp_path)


def _assert_stock_predicts_the_same(script: str, config: str, model, image, tmp_path) -> None:
    """`script` (stock Detectron2 only, in a fresh process) predicts with the exported `config`
    on `image` what `model` in eval mode predicts."""
    torch.save(image, tmp_path / "image.pt")
    model.eval()
    with torch.no_grad():
        expected = model([{"image": image, "height": 64, "width": 64}])[0]["instances"]
    result = subprocess.run([sys.executable, "-c", script, config, str(tmp_path / "image.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(expected) > 0 and len(got["boxes"]) == len(expected)
    torch.testing.assert_close(torch.tensor(got["boxes"]), expected.pred_boxes.tensor,
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.tensor(got["scores"]), expected.scores, rtol=1e-4, atol=1e-5)
