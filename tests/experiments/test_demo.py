"""`make demo` end to end at toy size: data generation, training, evaluation, pictures."""
import json

import pytest
from PIL import Image

from mabn_experiments.demo import run_demo
from mabn_experiments.plots import MASK_RCNN_LOSSES, plot_training_curves
from tests.common import TINY_MABN_CONFIG

TOY_OPTS = [
    "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "TEST.EVAL_PERIOD", "0"]


def test_demo_writes_results_curves_and_predictions(tmp_path, monkeypatch):
    # The shapes set is registered under the relative path datasets/shapes.
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "demo")
    results = run_demo(TINY_MABN_CONFIG, out, num_train=6, num_val=3, opts=TOY_OPTS)
    assert set(results) == {"bbox", "segm"}
    manifest = json.loads((tmp_path / "datasets" / "shapes" / "shapes_manifest.json").read_text())
    # Generated in the demo style at the config's test size.
    assert manifest["style"] == "demo" and manifest["image_size"] == 64
    summary = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert summary["iterations"] == 3 and "AP" in summary["results"]["bbox"]
    assert (tmp_path / "demo" / "training_curves.png").stat().st_size > 1000
    pictures = sorted((tmp_path / "demo" / "predictions").iterdir())
    assert len(pictures) == 3
    # Two panels side by side: ground truth and prediction.
    width, height = Image.open(pictures[0]).size
    assert width > 1.5 * height

    # A second call evaluates the model already there, without touching the training's results.
    before = (tmp_path / "demo" / "results.json").read_text()
    again = run_demo(TINY_MABN_CONFIG, out, num_train=6, num_val=3, eval_only=True, opts=TOY_OPTS)
    assert again["bbox"]["AP"] == pytest.approx(results["bbox"]["AP"], nan_ok=True)
    assert (tmp_path / "demo" / "results.json").read_text() == before
    assert (tmp_path / "demo" / "results_eval_only.json").exists()


def test_training_curves_draw_each_loss_and_the_ap_points(tmp_path):
    records = [{"iteration": i, **{key: 1.0 / (i + 1) for key in MASK_RCNN_LOSSES}}
               for i in range(0, 100, 20)]
    records.append({"iteration": 99, "bbox/AP": 30.0, "segm/AP": 25.0})
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records))
    fig = plot_training_curves({"MABN": str(tmp_path)}, str(tmp_path / "curves.png"),
                               losses=MASK_RCNN_LOSSES)
    loss_ax, ap_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == [
        f"MABN {key}" for key in MASK_RCNN_LOSSES]
    assert [line.get_label() for line in ap_ax.get_lines()] == ["MABN bbox/AP", "MABN segm/AP"]


def test_demo_rejects_a_model_with_too_few_classes(tmp_path):
    with pytest.raises(ValueError, match="NUM_CLASSES is 2.*draws 3 classes"):
        run_demo(TINY_MABN_CONFIG, str(tmp_path / "demo"), num_train=2, num_val=1,
                 opts=["MODEL.ROI_HEADS.NUM_CLASSES", "2"])
