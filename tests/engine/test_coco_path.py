"""The COCO path: each dataset scored by the evaluators of its kind, and a missing dataset stopped
before training with one message."""
import os
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluator,
                                   SemSegEvaluator)

from mabn_det.engine import Trainer
from mabn_det.engine import evaluation
from tests.common import REPO, make_cfg

# The evaluators Detectron2's tools/train_net.py gives each evaluator_type (its build_evaluator).
UPSTREAM_EVALUATORS = {
    "coco": {"COCOEvaluator"},
    "coco_panoptic_seg": {"SemSegEvaluator", "COCOEvaluator", "COCOPanopticEvaluator"},
    "sem_seg": {"SemSegEvaluator"},
    "lvis": {"LVISEvaluator"},
    "pascal_voc": {"PascalVOCDetectionEvaluator"},
    "cityscapes_instance": {"CityscapesInstanceEvaluator"},
    "cityscapes_sem_seg": {"CityscapesSemSegEvaluator"},
}


@pytest.mark.parametrize("kind", sorted(UPSTREAM_EVALUATORS))
def test_every_evaluator_type_of_detectron2_gets_its_evaluators(kind, monkeypatch, tmp_path):
    """Recorded, not built: the real evaluators read each dataset's files when constructed."""
    built = []
    for cls in {name for names in UPSTREAM_EVALUATORS.values() for name in names}:
        monkeypatch.setattr(evaluation, cls, lambda name, tasks=None, *args, cls=cls, **kwargs: (
            built.append((cls, name, kwargs.get("output_dir"), tasks)) or DatasetEvaluator()))
    name = f"tiny_{kind}_eval"
    MetadataCatalog.get(name).set(evaluator_type=kind)
    Trainer.build_evaluator(make_cfg(), name, str(tmp_path))
    assert {cls for cls, *_ in built} == UPSTREAM_EVALUATORS[kind]
    assert all(dataset == name and out in (None, str(tmp_path)) for _, dataset, out, _ in built)
    # COCO AP of boxes and masks (MASK_ON) even when nothing is predicted, as LVIS's.
    assert all(tasks == ("bbox", "segm") for cls, _, _, tasks in built
               if cls in ("COCOEvaluator", "LVISEvaluator"))


def test_an_unknown_evaluator_type_is_named():
    MetadataCatalog.get("tiny_unknown_eval").set(evaluator_type="kitti")
    with pytest.raises(ValueError, match="dataset 'tiny_unknown_eval' of evaluator_type 'kitti'; "
                                         "expected one of 'coco', "):
        Trainer.build_evaluator(make_cfg(), "tiny_unknown_eval")


def test_panoptic_datasets_get_panoptic_semantic_and_coco_evaluators(tiny_coco, tmp_path):
    """As Detectron2's tools/train_net.py chooses for evaluator_type "coco_panoptic_seg"."""
    name = "tiny_panoptic_eval"
    DatasetCatalog.register(name, lambda: [{"file_name": "0.png", "sem_seg_file_name": "0_s.png"}])
    MetadataCatalog.get(name).set(
        evaluator_type="coco_panoptic_seg", json_file=tiny_coco[0], image_root=tiny_coco[1],
        stuff_classes=["things", "sky"], ignore_label=255, thing_classes=["a", "b"],
        thing_dataset_id_to_contiguous_id={1: 0, 2: 1}, stuff_dataset_id_to_contiguous_id={3: 1})
    evaluators = Trainer.build_evaluator(make_cfg(), name, str(tmp_path))
    assert sorted(type(e).__name__ for e in evaluators._evaluators) == sorted(
        c.__name__ for c in (COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator))


@pytest.mark.parametrize("tool, config, opts", [
    ("train_net.py", "configs/panoptic_fpn_R_50_2x_mabn_scratch.yaml", []),
    ("lazyconfig_train_net.py", "configs/lazy/mask_rcnn_R_50_FPN_2x_mabn_scratch.py", []),
    ("train_net.py", "configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml", ["--eval-only"]),
])
def test_missing_coco_stops_before_training_with_one_message(tool, config, opts, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path), PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", tool),
                             "--config-file", os.path.join(REPO, config), *opts],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"$DETECTRON2_DATASETS (it is '{tmp_path}')" in result.stderr
    assert "coco/{train,val}2017/" in result.stderr
    train_json = os.path.join(str(tmp_path), "coco/annotations/instances_train2017.json")
    val_json = os.path.join(str(tmp_path), "coco/annotations/instances_val2017.json")
    assert val_json in result.stderr
    # --eval-only without PreciseBN reads no training image.
    assert (train_json in result.stderr) == ("--eval-only" not in opts)
