"""Registration of the shapes dataset in Detectron2's catalogs.

``register_shapes_datasets()`` makes ``shapes_train`` and ``shapes_val`` nameable in configs. The
annotation files are read only when ``DatasetCatalog.get`` is called, so registration works (and
``thing_classes`` is known) before the dataset has been generated.
"""
from __future__ import annotations

import os

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from .generator import SHAPE_CLASS_NAMES, SPLITS, split_annotation_file, split_image_dir

# Sub-directory of the datasets root that holds the shapes dataset.
SHAPES_DIR_NAME = "shapes"


def default_datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` or ``datasets``, the convention of Detectron2's builtin datasets."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def default_shapes_dir() -> str:
    """Where ``shapes_train`` and ``shapes_val`` are registered by default."""
    return os.path.join(default_datasets_root(), SHAPES_DIR_NAME)


# Drawing colour (RGB 0-255) of each class in Detectron2's Visualizer (ColorMode.SEGMENTATION),
# in SHAPE_CLASS_NAMES order; chosen away from the demo style's red, green and blue fills.
SHAPE_CLASS_DRAWING_COLOURS = ((255, 200, 0), (230, 0, 230), (0, 220, 230), (255, 120, 0),
                               (240, 240, 240), (120, 60, 255))


def shapes_metadata() -> dict:
    """Metadata common to every shapes split; matches what Detectron2 derives from the json, plus
    the classes' drawing colours."""
    return {
        "thing_classes": list(SHAPE_CLASS_NAMES),
        "thing_colors": [list(colour) for colour in SHAPE_CLASS_DRAWING_COLOURS],
        "thing_dataset_id_to_contiguous_id": {
            index + 1: index for index in range(len(SHAPE_CLASS_NAMES))
        },
    }


def register_shapes_split(name: str, dataset_dir: str | os.PathLike, split: str) -> bool:
    """Register one split of a shapes dataset under ``name``, unless that name is taken.

    Args:
        name: Dataset name for configs and ``DatasetCatalog.get``.
        dataset_dir: Directory written by ``generate_shapes_dataset`` (it may not exist yet).
        split: One of ``SPLITS``.

    Returns:
        True if ``name`` was registered now; False if it was already registered, in which case
        the existing registration is left untouched.
    """
    if name in DatasetCatalog.list():
        return False
    register_coco_instances(
        name,
        shapes_metadata(),
        str(split_annotation_file(dataset_dir, split)),
        str(split_image_dir(dataset_dir, split)),
    )
    return True


def register_shapes_datasets(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``shapes_train`` and ``shapes_val`` from ``root/shapes``.

    Args:
        root: Datasets root; ``default_datasets_root()`` when None.

    Returns:
        The names registered by this call (names already registered are skipped).
    """
    dataset_dir = os.path.join(default_datasets_root() if root is None else root, SHAPES_DIR_NAME)
    return [
        f"shapes_{split}"
        for split in SPLITS
        if register_shapes_split(f"shapes_{split}", dataset_dir, split)
    ]
