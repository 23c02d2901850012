"""Shared helpers: tiny configs and synthetic batches for CPU tests."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances

import mabn_det

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MABN_CONFIG = os.path.join(REPO, "configs", "tiny", "mabn_R18_FPN_shapes.yaml")


def make_cfg(config_file=TINY_MABN_CONFIG, opts=()):
    cfg = get_cfg()
    mabn_det.add_mabn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def synthetic_image(size=64, boxes=(), seed=0):
    """A detectron2 input dict with square objects at `boxes` (XYXY) of class 1, 2, ...

    Returns:
        {"image": (3, size, size) uint8, "height", "width", "instances"}.
    """
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 60, (3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
        image[:, y0:y1, x0:x1] = 200
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.arange(len(boxes), dtype=torch.long) % 3
    instances.gt_masks = BitMasks(masks)
    return {"image": image, "height": size, "width": size, "instances": instances}


@pytest.fixture
def batch_with_empty_image():
    """Two images: one with two objects, one with none (a mask head then sees few or no RoIs)."""
    return [synthetic_image(boxes=[(8, 8, 30, 28), (34, 30, 60, 60)], seed=1),
            synthetic_image(boxes=[], seed=2)]
