"""Real aerial images for the norm study: the four annotated tree-crown images that the `deepforest`
package ships (951 boxes, Pascal-VOC XML; MIT licence), tiled into a small COCO detection set.

    pip install --no-deps deepforest==2.1.0   # the data only; nothing of deepforest is imported

Train and validation come from different regions of every image, so no tree is in both: the bottom
`VAL_FRACTION` of each image's rows is the validation region. A tree belongs to the region holding
its box centre; in the other region's tiles its box is painted over with the image's mean colour.
Training tiles overlap (stride half a tile), validation tiles do not; both are padded with the mean
colour past the image's edge. A tree cut by a tile's edge is an object of that tile if at least half
of its box is inside, else an `iscrowd` region (ignored by training and by the COCO evaluation).

Layout under a dataset directory (as the shapes set's, so the same registration reads it)::

    D/train/*.png  D/val/*.png  D/annotations/instances_{train,val}.json  D/trees_manifest.json
"""
from __future__ import annotations

import importlib.util
import json
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from .shapes.generator import SPLITS, split_annotation_file, split_image_dir, write_json_atomically

__all__ = ["TREE_IMAGES", "TreeBox", "build_trees_dataset", "deepforest_data_dir",
           "read_tree_boxes", "register_trees_split", "trees_dataset_exists"]

# The annotated images of deepforest 2.1.0's data folder (stems of the XML files).
TREE_IMAGES = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop",
               "OSBS_029", "SOAP_061")
DEEPFOREST_REQUIREMENT = "deepforest==2.1.0"
# Bump whenever the tiling's output changes, so that stale datasets are not mistaken for current.
TILING_VERSION = 1
TILE_SIZE = 128
VAL_FRACTION = 0.25
# A tree with less of its box inside a tile than this is an ignored (iscrowd) region there.
MIN_VISIBLE_FRACTION = 0.5
MANIFEST_NAME = "trees_manifest.json"
THING_CLASSES = ["tree"]


@dataclass(frozen=True)
class TreeBox:
    """One annotated crown: its source image, an id unique in that image, and its box in pixels.

    Attributes:
        box: (x0, y0, x1, y1), x1 and y1 exclusive.
    """

    image: str
    index: int
    box: Tuple[float, float, float, float]

    @property
    def centre_y(self) -> float:
        return (self.box[1] + self.box[3]) / 2


def deepforest_data_dir() -> Path:
    """deepforest's data folder, found without importing deepforest (which needs far more packages
    than its data does).

    Raises:
        ImportError: deepforest is not installed; the message names the install command.
    """
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the trees condition reads the images bundled with deepforest: run "
                          f"`pip install --no-deps {DEEPFOREST_REQUIREMENT}`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_tree_boxes(xml_file: str | os.PathLike) -> List[TreeBox]:
    """The boxes of one Pascal-VOC annotation file, every class ("Tree", "Alive", "Dead") as a tree.

    VOC boxes are inclusive pixel indices; they are returned with exclusive ends.
    """
    stem = Path(xml_file).stem
    boxes = []
    for index, node in enumerate(ElementTree.parse(xml_file).getroot().iter("object")):
        x0, y0, x1, y1 = (float(node.findtext(f"bndbox/{key}"))
                          for key in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(TreeBox(stem, index, (x0, y0, x1 + 1, y1 + 1)))
    return boxes


def _tile_origins(start: int, stop: int, stride: int) -> List[int]:
    """Starts of the tiles, every `stride` from `start`, that cover [start, stop); the last tile
    may reach past `stop` (into the padding)."""
    beyond_first = max(stop - start - TILE_SIZE, 0)
    return [start + k * stride for k in range(-(-beyond_first // stride) + 1)]


def _tile_annotations(trees: List[TreeBox], x0: int, y0: int) -> List[Dict]:
    """COCO annotations (without ids) of `trees` in the tile at (x0, y0)."""
    annotations = []
    for tree in trees:
        bx0, by0, bx1, by1 = tree.box
        cx0, cy0 = max(bx0, x0), max(by0, y0)
        cx1, cy1 = min(bx1, x0 + TILE_SIZE), min(by1, y0 + TILE_SIZE)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        visible = (cx1 - cx0) * (cy1 - cy0) / ((bx1 - bx0) * (by1 - by0))
        annotations.append({
            "category_id": 1, "bbox": [cx0 - x0, cy0 - y0, cx1 - cx0, cy1 - cy0],
            "area": (cx1 - cx0) * (cy1 - cy0),
            "iscrowd": int(visible < MIN_VISIBLE_FRACTION),
            "tree": f"{tree.image}#{tree.index}",
        })
    return annotations


def _paint(pixels: np.ndarray, trees: List[TreeBox], colour: np.ndarray) -> np.ndarray:
    """A copy of `pixels` (H, W, 3) with every box of `trees` filled with `colour` (3,)."""
    painted = pixels.copy()
    for tree in trees:
        x0, y0, x1, y1 = (int(round(v)) for v in tree.box)
        painted[max(y0, 0):y1, max(x0, 0):x1] = colour
    return painted


def build_trees_dataset(out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Tile deepforest's four annotated images into `out_dir` (see the module docstring).

    Deterministic: the same deepforest data gives byte-identical files. The manifest is written
    last, so an interrupted build never looks complete to `trees_dataset_exists`.

    Returns:
        The dataset directory.
    """
    data_dir = deepforest_data_dir()
    dataset_dir = Path(out_dir)
    (dataset_dir / MANIFEST_NAME).unlink(missing_ok=True)
    images: Dict[str, List[Dict]] = {split: [] for split in SPLITS}
    annotations: Dict[str, List[Dict]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        split_image_dir(dataset_dir, split).mkdir(parents=True, exist_ok=True)
    for stem in TREE_IMAGES:
        pixels = np.asarray(Image.open(data_dir / f"{stem}.png").convert("RGB"))
        height, width = pixels.shape[:2]
        mean_colour = pixels.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
        boundary = int(round(height * (1 - VAL_FRACTION)))
        trees = read_tree_boxes(data_dir / f"{stem}.xml")
        own = {"train": [t for t in trees if t.centre_y < boundary],
               "val": [t for t in trees if t.centre_y >= boundary]}
        rows = {"train": (0, boundary), "val": (boundary, height)}
        for split, other in (("train", "val"), ("val", "train")):
            source = _paint(pixels, own[other], mean_colour)
            top, bottom = rows[split]
            # The region's rows only, padded: no tile reads a pixel of the other region.
            region = np.empty((bottom - top + TILE_SIZE, width + TILE_SIZE, 3), np.uint8)
            region[:] = mean_colour
            region[:bottom - top, :width] = source[top:bottom]
            stride = TILE_SIZE // 2 if split == "train" else TILE_SIZE
            for y0 in _tile_origins(top, bottom, stride):
                for x0 in _tile_origins(0, width, stride):
                    image_id = len(images[split]) + 1
                    file_name = f"{stem}_x{x0}_y{y0}.png"
                    tile = region[y0 - top:y0 - top + TILE_SIZE, x0:x0 + TILE_SIZE]
                    Image.fromarray(tile).save(split_image_dir(dataset_dir, split) / file_name,
                                               compress_level=1)
                    images[split].append({"id": image_id, "file_name": file_name,
                                          "height": TILE_SIZE, "width": TILE_SIZE})
                    for annotation in _tile_annotations(own[split], x0, y0):
                        annotation.update(id=len(annotations[split]) + 1, image_id=image_id)
                        annotations[split].append(annotation)
        if progress:
            print(f"trees: {stem}: {len(own['train'])} train / {len(own['val'])} val trees")
    categories = [{"id": 1, "name": THING_CLASSES[0], "supercategory": "plant"}]
    for split in SPLITS:
        annotation_file = split_annotation_file(dataset_dir, split)
        annotation_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(annotation_file, {
            "info": {"description": f"deepforest {DEEPFOREST_REQUIREMENT} tree crowns, tiled",
                     "split": split},
            "images": images[split], "annotations": annotations[split],
            "categories": categories})
    write_json_atomically(dataset_dir / MANIFEST_NAME, _manifest())
    return dataset_dir


def _manifest() -> Dict:
    return {"tiling_version": TILING_VERSION, "source": DEEPFOREST_REQUIREMENT,
            "images": list(TREE_IMAGES), "tile_size": TILE_SIZE, "val_fraction": VAL_FRACTION,
            "min_visible_fraction": MIN_VISIBLE_FRACTION}


def trees_dataset_exists(dataset_dir: str | os.PathLike) -> bool:
    """Whether a complete dataset of this tiling version is at `dataset_dir`."""
    try:
        manifest = json.loads((Path(dataset_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    return manifest == _manifest() and all(
        split_annotation_file(dataset_dir, split).is_file() for split in SPLITS)


def register_trees_split(name: str, dataset_dir: str | os.PathLike, split: str) -> bool:
    """Register one split of a trees dataset under `name`, unless that name is taken.

    Returns:
        True if `name` was registered now, False if it was registered already (left untouched).
    """
    if name in DatasetCatalog.list():
        return False
    register_coco_instances(name, {"thing_classes": THING_CLASSES},
                            str(split_annotation_file(dataset_dir, split)),
                            str(split_image_dir(dataset_dir, split)))
    return True
