"""Which evaluators score a dataset, and a clear stop when a registered dataset is not on disk."""
import os
from typing import Callable, Dict, Iterable, List, Tuple

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (CityscapesInstanceEvaluator, CityscapesSemSegEvaluator,
                                   COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluator,
                                   DatasetEvaluators, LVISEvaluator, PascalVOCDetectionEvaluator,
                                   SemSegEvaluator)
from detectron2.utils import comm

__all__ = ["EVALUATORS", "MissingDatasetError", "build_dataset_evaluator",
           "check_datasets_on_disk"]

# The metadata fields through which Detectron2's registrations name files and directories.
_PATH_FIELDS = ("json_file", "image_root", "panoptic_json", "panoptic_root", "sem_seg_root")

# Detectron2's library has no evaluator choice to defer to (DefaultTrainer.build_evaluator raises
# NotImplementedError; the choice lives in its tools/train_net.py). So it is made here, once, for
# every ``evaluator_type`` that script covers, as it covers them: evaluator_type -> factories of
# (dataset name, output folder). Each evaluator reads what else it needs (COCO's tasks from the
# predictions, the semantic classes and ignore label from the metadata).
EVALUATORS: Dict[str, Tuple[Callable[[str, str], DatasetEvaluator], ...]] = {
    "coco": (lambda name, out: COCOEvaluator(name, output_dir=out),),
    "coco_panoptic_seg": (
        lambda name, out: SemSegEvaluator(name, distributed=True, output_dir=out),
        lambda name, out: COCOEvaluator(name, output_dir=out),
        lambda name, out: COCOPanopticEvaluator(name, output_dir=out)),
    "sem_seg": (lambda name, out: SemSegEvaluator(name, distributed=True, output_dir=out),),
    "lvis": (lambda name, out: LVISEvaluator(name, output_dir=out),),
    "pascal_voc": (lambda name, out: PascalVOCDetectionEvaluator(name),),
    "cityscapes_instance": (lambda name, out: CityscapesInstanceEvaluator(name),),
    "cityscapes_sem_seg": (lambda name, out: CityscapesSemSegEvaluator(name),),
}


def build_dataset_evaluator(dataset_name: str, output_folder: str) -> DatasetEvaluator:
    """The evaluators of the dataset's ``evaluator_type`` (`EVALUATORS`, the types and evaluators
    of Detectron2's tools/train_net.py); a dataset without one is scored as "coco".

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
    evaluators = [build(dataset_name, output_folder) for build in EVALUATORS[kind]]
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
