"""`make demo` end to end at toy size: data generation, training, evaluation, pictures."""
import json
import os

from mabn_experiments.demo import run_demo
from tests.common import TINY_MABN_CONFIG


def test_demo_writes_results_curves_and_predictions(tmp_path, monkeypatch):
    # The shapes set is registered under the relative path datasets/shapes.
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "demo")
    results = run_demo(TINY_MABN_CONFIG, out, num_train=6, num_val=3, image_size=64, opts=[
        "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "TEST.EVAL_PERIOD", "0"])
    assert set(results) == {"bbox", "segm"}
    assert os.path.exists(tmp_path / "datasets" / "shapes" / "annotations" / "instances_val.json")
    summary = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert summary["iterations"] == 3 and "AP" in summary["results"]["bbox"]
    assert (tmp_path / "demo" / "training_curves.png").stat().st_size > 1000
    assert len(os.listdir(tmp_path / "demo" / "predictions")) == 3
