import importlib.util
import json
import re

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from mabn_experiments import trees
from mabn_experiments.trees import (
    TILE_SIZE,
    TREE_IMAGES,
    build_trees_dataset,
    deepforest_data_dir,
    read_tree_boxes,
    register_trees_split,
    trees_dataset_exists,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_trees_dataset(tmp_path_factory.mktemp("trees"), progress=False)


def annotations(dataset, split):
    return json.loads((dataset / "annotations" / f"instances_{split}.json").read_text())


def test_the_bundled_images_hold_951_trees():
    boxes = [box for stem in TREE_IMAGES
             for box in read_tree_boxes(deepforest_data_dir() / f"{stem}.xml")]
    assert len(boxes) == 951
    assert all(b.box[0] < b.box[2] and b.box[1] < b.box[3] for b in boxes)


def test_no_tree_is_in_both_splits_and_every_tree_is_in_one(dataset):
    by_split = {split: {a["tree"] for a in annotations(dataset, split)["annotations"]}
                for split in ("train", "val")}
    assert not by_split["train"] & by_split["val"]
    assert len(by_split["train"] | by_split["val"]) == 951
    assert len(by_split["val"]) > 200  # the bottom quarter of every image


def test_tiles_and_their_boxes(dataset):
    assert trees_dataset_exists(dataset)
    for split in ("train", "val"):
        coco = annotations(dataset, split)
        assert all((im["height"], im["width"]) == (TILE_SIZE, TILE_SIZE) for im in coco["images"])
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= TILE_SIZE and y + h <= TILE_SIZE and w * h > 0
        objects = [a for a in coco["annotations"] if not a["iscrowd"]]
        crowds = [a for a in coco["annotations"] if a["iscrowd"]]
        assert objects and crowds  # trees cut by a tile's edge are ignored regions there
    # Training tiles overlap by half a tile; validation tiles do not.
    starts = {split: {tuple(map(int, re.search(r"_x(\d+)_y(\d+)", im["file_name"]).groups()))
                      for im in annotations(dataset, split)["images"] if "OSBS" in im["file_name"]}
              for split in ("train", "val")}
    assert {x for x, _ in starts["train"]} == {0, 64, 128, 192, 256, 320}
    assert {x for x, _ in starts["val"]} == {0, 128, 256, 384}


def test_the_other_splits_trees_are_painted_over(dataset):
    """In a training tile, every pixel of a validation tree's box is the image's mean colour."""
    stem = "OSBS_029"
    pixels = np.asarray(Image.open(deepforest_data_dir() / f"{stem}.png").convert("RGB"))
    mean = pixels.reshape(-1, 3).mean(axis=0).round()
    boundary = round(pixels.shape[0] * 0.75)
    val_trees = [t for t in read_tree_boxes(deepforest_data_dir() / f"{stem}.xml")
                 if t.centre_y >= boundary and t.box[1] < boundary]  # reaching into train rows
    assert val_trees
    tiles = [im["file_name"] for im in annotations(dataset, "train")["images"]
             if im["file_name"].startswith(stem)]
    checked = 0
    for name in tiles:
        x0, y0 = map(int, re.search(r"_x(\d+)_y(\d+)", name).groups())
        tile = np.asarray(Image.open(dataset / "train" / name))
        for tree in val_trees:
            bx0, by0, bx1, by1 = (int(round(v)) for v in tree.box)
            inside = tile[max(by0 - y0, 0):max(min(by1 - y0, boundary - y0, TILE_SIZE), 0),
                          max(bx0 - x0, 0):max(min(bx1 - x0, TILE_SIZE), 0)]
            if inside.size:
                assert (inside == mean).all(), (name, tree)
                checked += 1
    assert checked


def test_registered_splits_load(dataset):
    assert register_trees_split("test_trees_val", dataset, "val")
    assert not register_trees_split("test_trees_val", dataset, "val")
    records = DatasetCatalog.get("test_trees_val")
    assert len(records) == len(annotations(dataset, "val")["images"])


def test_missing_deepforest_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(trees.importlib.util, "find_spec",
                        lambda name: None if name == "deepforest" else real(name))
    with pytest.raises(ImportError, match=r"pip install --no-deps deepforest==2\.1\.0"):
        deepforest_data_dir()
