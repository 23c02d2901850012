"""The synthetic "shapes" instance-segmentation set: generator and Detectron2 registration.

``register_shapes_datasets()`` registers ``shapes_train`` and ``shapes_val`` under
``$DETECTRON2_DATASETS/shapes`` (default ``datasets/shapes``) in Detectron2's catalogs; importing
the package registers nothing. The annotations use compressed RLE masks (rings have holes), so
configs need ``INPUT.MASK_FORMAT = "bitmask"``.
"""
from .datasets import (
    default_datasets_root,
    default_shapes_dir,
    register_shapes_datasets,
    register_shapes_split,
)
from .scenes import SCENE_STYLES, SHAPE_CLASS_NAMES, render_shapes_image
from .generator import (
    DEFAULT_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    generate_shapes_dataset,
    require_integer_at_least,
    shapes_dataset_exists,
)

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
    "require_integer_at_least",
    "shapes_dataset_exists",
]
