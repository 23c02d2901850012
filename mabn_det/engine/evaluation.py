"""Which evaluators score a dataset, and a clear stop when a registered dataset is not on disk."""
import os
from typing import Iterable, List

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators,
                                   LVISEvaluator, SemSegEvaluator)

__all__ = ["MissingDatasetError", "build_dataset_evaluator", "check_datasets_on_disk"]

# The metadata fields through which Detectron2's registrations name files and directories.
_PATH_FIELDS = ("json_file", "image_root", "panoptic_json", "panoptic_root", "sem_seg_root")


def build_dataset_evaluator(dataset_name: str, output_folder: str, *, mask_on: bool):
    """The evaluators of the dataset's ``evaluator_type``, as Detectron2's tools/train_net.py
    chooses them: "coco" → COCO AP (boxes, and masks when `mask_on`); "coco_panoptic_seg" (Panoptic
    FPN's COCO) → semantic segmentation, COCO AP and panoptic quality; "sem_seg" → semantic
    segmentation; "lvis" → LVIS AP. A dataset without an ``evaluator_type`` gets COCO AP."""
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    tasks = ("bbox", "segm") if mask_on else ("bbox",)
    evaluators = []
    if kind in ("sem_seg", "coco_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if kind in ("coco", "coco_panoptic_seg"):
        evaluators.append(COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder))
    if kind == "coco_panoptic_seg":
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    if kind == "lvis":
        evaluators.append(LVISEvaluator(dataset_name, tasks=tasks, output_dir=output_folder))
    if not evaluators:
        raise ValueError(f"no evaluator for dataset '{dataset_name}' of evaluator_type {kind!r}; "
                         "expected one of 'coco', 'coco_panoptic_seg', 'sem_seg', 'lvis'")
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


class MissingDatasetError(FileNotFoundError):
    """A registered dataset whose files are not where its registration says."""


def check_datasets_on_disk(names: Iterable[str]) -> None:
    """Raise MissingDatasetError, one message for all, when a registered dataset among `names`
    names a file or directory that does not exist (Detectron2's built-in COCO names point under
    $DETECTRON2_DATASETS). Names that are not registered, or whose metadata names no path, pass.
    """
    missing: List[str] = []
    for name in dict.fromkeys(names):
        if name not in MetadataCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        paths = [meta.get(field) for field in _PATH_FIELDS if meta.get(field)]
        absent = [p for p in paths if not os.path.exists(p)]
        if absent:
            missing.append(f"  {name}: {', '.join(absent)}")
    if missing:
        root = os.environ.get("DETECTRON2_DATASETS")
        where = f"is '{root}'" if root else "is not set, so it is ./datasets"
        raise MissingDatasetError(
            "Dataset files not found:\n" + "\n".join(missing) + "\n"
            f"Detectron2 finds its built-in datasets under $DETECTRON2_DATASETS (it {where}), laid "
            "out as coco/annotations/instances_{train,val}2017.json and coco/{train,val}2017/ "
            "(Panoptic FPN also: coco/annotations/panoptic_{train,val}2017.json, "
            "coco/panoptic_{train,val}2017/ and coco/panoptic_stuff_{train,val}2017/). Put COCO "
            "there or point DETECTRON2_DATASETS at its parent directory.")
