"""Datasets for mabn_det: the synthetic "shapes" instance-segmentation set.

Importing this package registers ``shapes_train`` and ``shapes_val`` under
``$DETECTRON2_DATASETS/shapes`` (default ``datasets/shapes``) in Detectron2's catalogs. The
annotations use compressed RLE masks (rings have holes), so configs need
``INPUT.MASK_FORMAT = "bitmask"``.
"""
from .datasets import (
    default_datasets_root,
    default_shapes_dir,
    register_shapes_datasets,
    register_shapes_split,
)
from .scenes import SCENE_STYLES, SHAPE_CLASS_NAMES, render_shapes_image
from .shapes import (
    DEFAULT_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    generate_shapes_dataset,
    shapes_dataset_exists,
)

register_shapes_datasets()

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "SCENE_STYLES",
    "SHAPE_CLASS_NAMES",
    "default_datasets_root",
    "default_shapes_dir",
    "generate_shapes_dataset",
    "register_shapes_datasets",
    "register_shapes_split",
    "render_shapes_image",
    "shapes_dataset_exists",
]
