"""The synthetic shapes dataset: determinism, COCO validity, scene rules, registration and CLI."""
import contextlib
import dataclasses
import importlib.util
import io
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from mabn_experiments.shapes import (
    SHAPE_CLASS_NAMES,
    default_shapes_dir,
    generate_shapes_dataset,
    register_shapes_datasets,
    register_shapes_split,
    render_shapes_image,
    shapes_dataset_exists,
)
from mabn_experiments.shapes.appearance import TEXTURE_NAMES, load_texture
from mabn_experiments.shapes.raster import polygons_footprint
from mabn_experiments.shapes.scenes import MIN_VISIBLE_PIXELS, SCENE_STYLES, SHAPE_CLASSES

MAX_OBJECTS = SCENE_STYLES["standard"].max_objects
from mabn_experiments.shapes.generator import SPLITS, image_rng, split_annotation_file

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = dict(num_train=4, num_val=2, image_size=96, seed=0)
RING_ID = SHAPE_CLASS_NAMES.index("ring") + 1


def file_contents(directory: Path) -> dict:
    """Relative path → bytes of every file under ``directory``."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    return {str(path.relative_to(directory)): path.read_bytes() for path in files}


def load_coco(json_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints progress messages
        return COCO(str(json_file))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), progress=False, **TINY)


@pytest.fixture(scope="module")
def rendered_scenes():
    """40 in-memory images at 64 px: enough for every class and object count statistics."""
    return [render_shapes_image(image_rng(7, "train", index), 64) for index in range(40)]


def test_same_seed_gives_byte_identical_files(tiny_dataset, tmp_path):
    again = generate_shapes_dataset(tmp_path, progress=False, **TINY)
    expected = file_contents(tiny_dataset)
    assert len([name for name in expected if name.endswith(".png")]) == 6
    assert file_contents(again) == expected


def test_different_seed_changes_every_image(tiny_dataset, tmp_path):
    other = generate_shapes_dataset(tmp_path, progress=False, **{**TINY, "seed": 1})
    for name in ["train/000001.png", "train/000004.png", "val/000002.png"]:
        assert (other / name).read_bytes() != (tiny_dataset / name).read_bytes(), name


def test_images_do_not_depend_on_dataset_size(tiny_dataset, tmp_path):
    smaller = generate_shapes_dataset(
        tmp_path, 2, 1, TINY["image_size"], TINY["seed"], progress=False
    )
    for name in ["train/000001.png", "train/000002.png", "val/000001.png"]:
        assert (smaller / name).read_bytes() == (tiny_dataset / name).read_bytes(), name


@pytest.mark.parametrize("split, num_images", [("train", 4), ("val", 2)])
def test_annotations_are_consistent_coco(tiny_dataset, split, num_images):
    coco = load_coco(split_annotation_file(tiny_dataset, split))
    assert sorted(coco.getImgIds()) == list(range(1, num_images + 1))
    category_ids = sorted(coco.getCatIds())
    assert category_ids == list(range(1, len(SHAPE_CLASS_NAMES) + 1))
    assert [cat["name"] for cat in coco.loadCats(category_ids)] == list(SHAPE_CLASS_NAMES)
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len({ann["id"] for ann in annotations}) == len(annotations)
    for image in coco.loadImgs(coco.getImgIds()):
        with Image.open(tiny_dataset / split / image["file_name"]) as png:
            assert png.size == (image["width"], image["height"]) == (96, 96)
            assert png.mode == "RGB"
        assert 1 <= len(coco.getAnnIds(imgIds=image["id"])) <= MAX_OBJECTS
    for ann in annotations:
        mask = mask_util.decode(ann["segmentation"]).astype(bool)
        assert mask.shape == (96, 96)
        assert mask.any()
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        tight = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        np.testing.assert_allclose(ann["bbox"], tight, atol=1)
        assert ann["area"] == mask.sum()
        assert ann["iscrowd"] == 0
        assert ann["category_id"] in category_ids


def test_scene_objects_respect_count_range_and_do_not_overlap(rendered_scenes):
    seen_classes = set()
    for image, instances in rendered_scenes:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 1 <= len(instances) <= MAX_OBJECTS
        masks = np.stack([instance.mask for instance in instances])
        assert (masks.sum(axis=(1, 2)) >= MIN_VISIBLE_PIXELS).all()
        assert masks.sum(axis=0).max() == 1, "visible masks must be disjoint"
        seen_classes.update(instance.category_id for instance in instances)
    assert seen_classes == set(range(1, len(SHAPE_CLASS_NAMES) + 1))


def test_object_count_varies_across_images(rendered_scenes):
    counts = [len(instances) for _, instances in rendered_scenes]
    assert min(counts) <= 2 and max(counts) >= 8


@pytest.mark.parametrize("category_id", range(1, len(SHAPE_CLASS_NAMES) + 1))
def test_only_rings_have_a_hole_in_the_middle(category_id):
    """Rings are annuli, so unlike their box their mask excludes the centre."""
    outline = SHAPE_CLASSES[category_id - 1].outline
    for seed in range(5):
        filled, holes = outline(np.random.default_rng(seed))
        footprint = polygons_footprint(filled * 40 + 30, [hole * 40 + 30 for hole in holes])
        mask = footprint.mask
        centre = (30 - footprint.top, 30 - footprint.left)
        assert mask[centre] == (category_id != RING_ID)
        assert ndimage.binary_fill_holes(mask)[centre]


def test_textures_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("texture loading tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_texture.cache_clear()
    for name in TEXTURE_NAMES:
        texture = load_texture(name)
        assert texture.dtype == np.uint8 and texture.ndim in (2, 3), name
        assert min(texture.shape[:2]) >= 128, name


def test_dataset_exists_checks_manifest_and_parameters(tiny_dataset, tmp_path):
    assert shapes_dataset_exists(tiny_dataset)
    assert shapes_dataset_exists(tiny_dataset, num_train=4, num_val=2, image_size=96, seed=0)
    assert not shapes_dataset_exists(tiny_dataset, seed=1)
    assert not shapes_dataset_exists(tiny_dataset, image_size=128)
    assert not shapes_dataset_exists(tmp_path)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(num_train=0, num_val=1), "num_train must be an integer ≥ 1, got 0"),
        (dict(num_train=1, num_val=1, image_size=8), "image_size must be an integer ≥ 32, got 8"),
        (
            dict(num_train=1, num_val=1, image_size=64.0),
            "image_size must be an integer ≥ 32, got 64.0",
        ),
        (dict(num_train=1, num_val=1, seed=-1), "seed must be an integer ≥ 0, got -1"),
    ],
)
def test_invalid_arguments_are_named(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        generate_shapes_dataset(tmp_path, progress=False, **arguments)
    assert not any(tmp_path.iterdir())


def test_registered_split_loads_through_dataset_catalog(tiny_dataset):
    name = f"shapes_test_{uuid.uuid4().hex}"
    assert register_shapes_split(name, tiny_dataset, "val")
    assert not register_shapes_split(name, tiny_dataset, "train")
    records = DatasetCatalog.get(name)
    assert [record["image_id"] for record in records] == [1, 2]
    for record in records:
        assert os.path.isfile(record["file_name"])
        instances = annotations_to_instances(record["annotations"], (96, 96), mask_format="bitmask")
        assert instances.gt_masks.tensor.shape == (len(record["annotations"]), 96, 96)
        assert instances.gt_masks.tensor.flatten(1).any(dim=1).all()
        assert record["file_name"].startswith(str(tiny_dataset / "val"))
        assert (record["height"], record["width"]) == (96, 96)
        assert record["annotations"]
        for ann in record["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= ann["category_id"] < len(SHAPE_CLASS_NAMES)
            assert isinstance(ann["segmentation"], dict)
    assert MetadataCatalog.get(name).thing_classes == list(SHAPE_CLASS_NAMES)


def test_metadata_is_known_before_the_dataset_exists(tmp_path):
    name = f"shapes_test_{uuid.uuid4().hex}"
    assert register_shapes_split(name, tmp_path / "not_generated_yet", "train")
    metadata = MetadataCatalog.get(name)
    assert metadata.thing_classes == list(SHAPE_CLASS_NAMES)
    assert len(metadata.thing_colors) == len(SHAPE_CLASS_NAMES)
    assert metadata.evaluator_type == "coco"
    dataset_dir = tmp_path / "not_generated_yet"
    assert metadata.json_file == str(dataset_dir / "annotations" / "instances_train.json")


def test_registers_default_names_once_and_keeps_them(tmp_path):
    expected = {f"shapes_{split}": os.path.join(default_shapes_dir(), split) for split in SPLITS}

    def registered_image_roots():
        return {name: MetadataCatalog.get(name).image_root for name in expected}

    register_shapes_datasets()
    assert set(expected) <= set(DatasetCatalog.list())
    assert registered_image_roots() == expected
    assert register_shapes_datasets(tmp_path) == []
    assert registered_image_roots() == expected


def test_register_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val'\), got 'test'"):
        register_shapes_split(f"shapes_test_{uuid.uuid4().hex}", tmp_path, "test")


def test_cli_writes_the_same_dataset_as_the_function(tmp_path):
    command = [
        sys.executable, str(REPO_ROOT / "tools" / "make_shapes.py"),
        "--out", str(tmp_path / "cli"), "--train", "2", "--val", "1", "--size", "64",
        "--seed", "3", "--no-progress",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = generate_shapes_dataset(tmp_path / "api", 2, 1, 64, 3, progress=False)
    assert file_contents(tmp_path / "cli") == file_contents(expected)


def test_cli_rejects_too_small_size_naming_the_flag(tmp_path, capsys):
    script = REPO_ROOT / "tools" / "make_shapes.py"
    spec = importlib.util.spec_from_file_location("make_shapes", script)
    make_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shapes)
    with pytest.raises(SystemExit) as exit_info:
        make_shapes.main(["--out", str(tmp_path), "--size", "8"])
    assert exit_info.value.code == 2
    assert "argument --size: must be an integer ≥ 32, got 8" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_simple_style_has_fewer_larger_objects():
    style = SCENE_STYLES["simple"]
    for index in range(30):
        _, instances = render_shapes_image(image_rng(3, "train", index), 128, style)
        assert 1 <= len(instances) <= style.max_objects
        for instance in instances:
            ys, xs = instance.mask.nonzero()
            # Objects may be occluded or cut by the border, but none is drawn smaller than 16 px.
            assert max(ys.ptp(), xs.ptp()) + 1 >= 8


def test_style_is_recorded_in_the_manifest(tmp_path):
    generate_shapes_dataset(tmp_path, 2, 1, 64, seed=0, progress=False, style="simple")
    assert shapes_dataset_exists(tmp_path, style="simple")
    assert not shapes_dataset_exists(tmp_path, style="standard")
    with pytest.raises(ValueError, match="style must be one of"):
        generate_shapes_dataset(tmp_path, 2, 1, 64, style="hard")


def test_demo_style_draws_three_colour_coded_classes_on_grey():
    from mabn_experiments.shapes.scenes import CLASS_COLOURS, CLASS_COLOUR_JITTER

    style = SCENE_STYLES["demo"]
    seen = set()
    for index in range(30):
        image, instances = render_shapes_image(image_rng(5, "train", index), 96, style)
        assert 1 <= len(instances) <= style.max_objects
        covered = np.zeros(image.shape[:2], dtype=bool)
        for instance in instances:
            assert 1 <= instance.category_id <= 3
            seen.add(instance.category_id)
            # Away from the anti-aliased edge, an object has its class's colour (± jitter).
            inner = ndimage.binary_erosion(instance.mask, iterations=2)
            if inner.any():
                mean = image[inner].mean(axis=0) / 255.0
                expected = np.array(CLASS_COLOURS[instance.category_id - 1])
                assert np.abs(mean - expected).max() <= CLASS_COLOUR_JITTER + 0.01
            covered |= instance.mask
        # The background is grey: equal channels.
        background = image[~ndimage.binary_dilation(covered, iterations=2)].astype(int)
        assert np.abs(background - background[:, :1]).max() <= 1
    assert seen == {1, 2, 3}


def test_style_rejects_more_classes_than_there_are():
    from mabn_experiments.shapes.scenes import SceneStyle

    with pytest.raises(ValueError, match=r"num_classes must be in \[1, 6\], got 7"):
        SceneStyle(num_classes=7)
    with pytest.raises(ValueError, match="colour_coded needs num_classes ≤ 3"):
        SceneStyle(num_classes=4, colour_coded=True)


def test_study_style_is_the_demo_scene_with_strong_per_image_photometry():
    demo, study = SCENE_STYLES["demo"], SCENE_STYLES["study"]
    assert dataclasses.replace(study, photometry=demo.photometry, photometric_changes=False) == demo
    means, casts = [], []
    for index in range(30):
        image, instances = render_shapes_image(image_rng(5, "train", index), 96, study)
        _, demo_instances = render_shapes_image(image_rng(5, "train", index), 96, demo)
        # Same objects as the demo image drawn from the same generator state: only pixels change.
        assert [i.category_id for i in instances] == [i.category_id for i in demo_instances]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(instances, demo_instances))
        pixels = image.reshape(-1, 3) / 255.0
        means.append(pixels.mean())
        casts.append(np.ptp(pixels.mean(axis=0)))
    # What makes a batch of 2 images a poor estimate of the population: image means spread over
    # much of the range, and backgrounds that the demo keeps grey get colour casts.
    assert np.std(means) > 0.12 and max(means) - min(means) > 0.45  # the demo: 0.07 and 0.24
    assert np.median(casts) > 0.1  # the demo: 0.06, from its coloured objects alone
