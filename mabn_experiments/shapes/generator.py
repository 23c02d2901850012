"""The synthetic "shapes" instance-segmentation dataset, written in COCO format.

Layout under a dataset directory ``D``::

    D/train/000001.png ...                 D/val/000001.png ...
    D/annotations/instances_train.json     D/annotations/instances_val.json
    D/shapes_manifest.json                 (written last: marks a complete dataset)

Every image is rendered from its own generator seeded with (seed, split, index), so the output
depends only on the arguments: the same seed gives byte-identical files, and the first images of
a larger dataset equal those of a smaller one.
"""
from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image
from tqdm import tqdm

from .scenes import (
    SCENE_STYLES,
    SHAPE_CLASS_NAMES,
    SceneStyle,
    ShapeInstance,
    render_shapes_image,
)

# Bump whenever the generator's output changes, so that stale datasets are not mistaken for current.
GENERATOR_VERSION = 1
DEFAULT_IMAGE_SIZE = 128
# Below this the smallest objects (6 px) would fill a large part of the image.
MIN_IMAGE_SIZE = 32
SPLITS = ("train", "val")
MANIFEST_NAME = "shapes_manifest.json"


def split_image_dir(dataset_dir: str | os.PathLike, split: str) -> Path:
    """Directory holding the PNG images of ``split``."""
    return Path(dataset_dir) / _checked_split(split)


def split_annotation_file(dataset_dir: str | os.PathLike, split: str) -> Path:
    """COCO json file of ``split``."""
    return Path(dataset_dir) / "annotations" / f"instances_{_checked_split(split)}.json"


def _checked_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def coco_categories() -> list[dict]:
    """COCO category records, ids 1..len(SHAPE_CLASS_NAMES) in SHAPE_CLASS_NAMES order."""
    return [
        {"id": index + 1, "name": name, "supercategory": "shape"}
        for index, name in enumerate(SHAPE_CLASS_NAMES)
    ]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` (0-based) of ``split``, independent of all other images."""
    return np.random.default_rng([seed, SPLITS.index(_checked_split(split)), index])


def generate_shapes_dataset(
    out_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = True,
    style: str = "standard",
) -> Path:
    """Render the train and val splits and write them with their COCO annotations.

    Existing files of the same names are overwritten; the manifest is removed first and rewritten
    last, so an interrupted run never looks complete to ``shapes_dataset_exists``. Images left by
    an earlier, larger run stay on disk but are not listed in the new annotations.

    Args:
        out_dir: Dataset directory; created if missing.
        num_train: Number of training images, ≥ 1.
        num_val: Number of validation images, ≥ 1.
        image_size: Side of the square images in pixels, ≥ MIN_IMAGE_SIZE.
        seed: Non-negative integer; equal seeds give byte-identical output.
        progress: Show a tqdm progress bar.
        style: A key of SCENE_STYLES ("standard", "simple", "demo" or "study"; see scenes.py).

    Returns:
        The dataset directory.
    """
    require_integer_at_least("num_train", num_train, 1)
    require_integer_at_least("num_val", num_val, 1)
    require_integer_at_least("image_size", image_size, MIN_IMAGE_SIZE)
    require_integer_at_least("seed", seed, 0)
    if style not in SCENE_STYLES:
        raise ValueError(f"style must be one of {sorted(SCENE_STYLES)}, got {style!r}")
    dataset_dir = Path(out_dir)
    manifest_file = dataset_dir / MANIFEST_NAME
    manifest_file.unlink(missing_ok=True)
    split_sizes = {"train": num_train, "val": num_val}
    with tqdm(total=num_train + num_val, unit="img", disable=not progress) as bar:
        for split in SPLITS:
            bar.set_description(f"shapes {split}")
            _write_split(dataset_dir, split, split_sizes[split], image_size, seed,
                         SCENE_STYLES[style], bar.update)
    write_json_atomically(manifest_file, _manifest(num_train, num_val, image_size, seed, style))
    return dataset_dir


def shapes_dataset_exists(
    dataset_dir: str | os.PathLike,
    *,
    num_train: int | None = None,
    num_val: int | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    style: str | None = None,
) -> bool:
    """Whether a complete dataset from this generator version is at ``dataset_dir``.

    Reads only the small manifest, never the images or annotations.

    Args:
        dataset_dir: Directory that ``generate_shapes_dataset`` wrote to.
        num_train: When given, the number of training images the dataset must have.
        num_val: When given, the number of validation images the dataset must have.
        image_size: When given, the image size the dataset must have.
        seed: When given, the seed the dataset must have been generated with.
        style: When given, the scene style the dataset must have been generated with.
    """
    try:
        manifest = json.loads((Path(dataset_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    wanted = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed,
              "style": style}
    expected = {"generator_version": GENERATOR_VERSION}
    expected.update({key: value for key, value in wanted.items() if value is not None})
    return all(manifest.get(key) == value for key, value in expected.items()) and all(
        split_annotation_file(dataset_dir, split).is_file() for split in SPLITS
    )


def require_integer_at_least(name: str, value: int, minimum: int) -> None:
    """Raise ValueError "<name> must be an integer ≥ <minimum>, got <value>" unless it is one."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def _manifest(num_train: int, num_val: int, image_size: int, seed: int, style: str) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "style": style,
    }


def _write_split(
    dataset_dir: Path,
    split: str,
    num_images: int,
    image_size: int,
    seed: int,
    style: SceneStyle,
    on_image_written: Callable[[], object],
) -> None:
    """Render ``num_images`` images of ``split`` and write them and their annotation file."""
    images_dir = split_image_dir(dataset_dir, split)
    images_dir.mkdir(parents=True, exist_ok=True)
    image_records, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        pixels, instances = render_shapes_image(image_rng(seed, split, index), image_size, style)
        file_name = f"{image_id:06d}.png"
        # Noisy images hardly compress, so stronger zlib levels cost time and save little space.
        Image.fromarray(pixels).save(images_dir / file_name, compress_level=1)
        image_records.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        first_id = len(annotations) + 1
        annotations.extend(
            _coco_annotation(instance, annotation_id, image_id)
            for annotation_id, instance in enumerate(instances, start=first_id)
        )
        on_image_written()
    coco = {
        "info": {
            "description": "mabn_det synthetic shapes",
            "generator_version": GENERATOR_VERSION,
            "split": split,
            "seed": seed,
        },
        "licenses": [],
        "images": image_records,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    annotation_file = split_annotation_file(dataset_dir, split)
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(annotation_file, coco)


def _coco_annotation(instance: ShapeInstance, annotation_id: int, image_id: int) -> dict:
    """COCO record of one object: compressed-RLE mask, tight XYWH box, pixel area."""
    mask = instance.mask
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bbox = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": instance.category_id,
        "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")},
        "area": float(np.count_nonzero(mask)),
        "bbox": [float(value) for value in bbox],
        "iscrowd": 0,
    }


def write_json_atomically(path: Path, content: dict) -> None:
    """Write compact json atomically, so readers never see a half-written file."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8", newline="\n") as f:
        json.dump(content, f, separators=(",", ":"))
        f.write("\n")
    os.replace(partial, path)
