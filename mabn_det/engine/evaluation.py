"""Which evaluators score a dataset, and a clear stop when a registered dataset is not on disk."""
import os
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (CityscapesInstanceEvaluator, CityscapesSemSegEvaluator,
                                   COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluator,
                                   DatasetEvaluators, LVISEvaluator, PascalVOCDetectionEvaluator,
                                   SemSegEvaluator)
from detectron2.utils import comm

__all__ = ["EVALUATORS", "MissingDatasetError", "build_dataset_evaluator",
           "check_datasets_on_disk"]

Tasks = Optional[Tuple[str, ...]]

# The metadata fields through which Detectron2's registrations name files and directories.
_PATH_FIELDS = ("json_file", "image_root", "panoptic_json", "panoptic_root", "sem_seg_root")

# Detectron2's library has no evaluator choice to defer to (DefaultTrainer.build_evaluator raises
# NotImplementedError; the choice lives in its tools/train_net.py). So it is made here, once, for
# every ``evaluator_type`` that script covers, as it covers them: evaluator_type -> factories of
# (dataset name, output folder, COCO tasks). Each evaluator reads what else it needs from the
# metadata (the semantic classes and ignore label, VOC's directory, ...).
EVALUATORS: Dict[str, Tuple[Callable[[str, str, Tasks], DatasetEvaluator], ...]] = {
    "coco": (lambda name, out, tasks: COCOEvaluator(name, tasks, output_dir=out),),
    "coco_panoptic_seg": (
        lambda name, out, tasks: SemSegEvaluator(name, distributed=True, output_dir=out),
        lambda name, out, tasks: COCOEvaluator(name, tasks, output_dir=out),
        lambda name, out, tasks: COCOPanopticEvaluator(name, output_dir=out)),
    "sem_seg": (lambda name, out, tasks: SemSegEvaluator(name, distributed=True, output_dir=out),),
    "lvis": (lambda name, out, tasks: LVISEvaluator(name, tasks, output_dir=out),),
    "pascal_voc": (lambda name, out, tasks: PascalVOCDetectionEvaluator(name),),
    "cityscapes_instance": (lambda name, out, tasks: CityscapesInstanceEvaluator(name),),
    "cityscapes_sem_seg": (lambda name, out, tasks: CityscapesSemSegEvaluator(name),),
}


def build_dataset_evaluator(dataset_name: str, output_folder: str,
                            tasks: Tasks = None) -> DatasetEvaluator:
    """The evaluators of the dataset's ``evaluator_type`` (`EVALUATORS`, the types and evaluators
    of Detectron2's tools/train_net.py); a dataset without one is scored as "coco".

    Args:
        tasks: what the COCO and LVIS evaluators score ("bbox", "segm", "keypoints"); None lets
            them infer it from the predictions, so an evaluation without any prediction reports
            boxes only.

    Raises:
        ValueError: for an ``evaluator_type`` not in `EVALUATORS`, and for the Cityscapes types
            in a run over several machines (their evaluators collect the predictions in a
            temporary directory of process 0's machine).
    """
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if kind not in EVALUATORS:
        raise ValueError(f"no evaluator for dataset '{dataset_name}' of evaluator_type {kind!r}; "
                         f"expected one of {', '.join(map(repr, EVALUATORS))}")
    if kind.startswith("cityscapes") and comm.get_world_size() > comm.get_local_size():
        raise ValueError(f"evaluator_type {kind!r} of dataset '{dataset_name}' is evaluated on "
                         f"one machine only, got {comm.get_world_size() // comm.get_local_size()} "
                         "machines; evaluate the checkpoint with --eval-only on one machine")
    evaluators = [build(dataset_name, output_folder, tasks) for build in EVALUATORS[kind]]
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
