"""Helpers shared by the tests: tiny configs, synthetic batches and datasets, the tools as modules."""
import importlib.util
import json
import os
import re
import sys

import numpy as np
import torch
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from PIL import Image

from mabn_det.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MABN_CONFIG = os.path.join(REPO, "configs", "tiny", "mabn_R18_FPN_shapes.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
# Top-level packages of this repository (not distributions of anyone else).
FIRST_PARTY = ("mabn_det", "mabn_experiments", "tests")


def make_cfg(config_file=TINY_MABN_CONFIG, opts=()):
    return load_config(config_file, ["MODEL.DEVICE", "cpu", *opts])


def load_tool(name: str):
    """Import `tools/<name>.py` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_calls(monkeypatch, function):
    """Replace `function` by a spy in every module of mabn_det that holds it, so that no import of
    it escapes the count.

    Returns:
        The list to which each call appends its positional arguments.
    """
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "mabn_det":
            for attr, value in list(vars(module).items()):
                if value is function:
                    monkeypatch.setattr(module, attr, spy)
    return calls


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


def write_tiny_coco(root):
    """Write a 2-image COCO-format set: image 0 holds two squares, image 1 holds no instance.

    Args:
        root: a pathlib.Path directory.

    Returns:
        (json_path, image_dir)
    """
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, squares in enumerate([[(8, 8, 24, 20), (36, 30, 22, 26)], []]):
        pixels = rng.integers(0, 80, (64, 64, 3), dtype=np.uint8)
        for x, y, w, h in squares:
            pixels[y:y + h, x:x + w] = (220, 180, 40)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1 + image_id % 2,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
        name = f"{image_id}.png"
        Image.fromarray(pixels).save(root / name)
        images.append({"id": image_id, "file_name": name, "height": 64, "width": 64})
    categories = [{"id": i, "name": f"class{i}"} for i in (1, 2)]
    json_path = root / "instances.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": categories}))
    return str(json_path), str(root)


def train_opts(output_dir, dataset="tiny_train", **overrides):
    """KEY VALUE overrides for a few-iteration CPU run of the tiny MABN config on `tiny_coco`."""
    opts = {
        "MODEL.DEVICE": "cpu", "OUTPUT_DIR": output_dir, "SEED": 7,
        "DATASETS.TRAIN": f"('{dataset}',)", "DATASETS.TEST": "()",
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS": False, "DATALOADER.NUM_WORKERS": 0,
        "MODEL.ROI_HEADS.NUM_CLASSES": 2, "SOLVER.IMS_PER_BATCH": 2, "SOLVER.BASE_LR": 0.01,
        "SOLVER.WARMUP_ITERS": 0, "SOLVER.STEPS": "()", "SOLVER.MAX_ITER": 4,
        "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": 64,
        "INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 64,
        "MODEL.MABN.BUFFER_SIZE": 2, "MODEL.MABN.WARMUP_ITERS": 0,
        "MODEL.MABN.RENORM_WARMUP_ITERS": 3, "MODEL.MABN.LOG_PERIOD": 1,
    }
    opts.update(overrides)
    return [str(x) for kv in opts.items() for x in kv]


LAZY_RECIPES = [os.path.join(REPO, "configs", "lazy", name) for name in
                ("mask_rcnn_R_50_FPN_2x_mabn_scratch.py", "mask_rcnn_R_50_FPN_100ep_LSJ_mabn.py")]


def tiny_lazy_config(path, num_classes=2, size=64):
    """A LazyConfig recipe shrunk for CPU tests: R18, 32-channel FPN and heads, `size`-px images,
    MABN warm-ups of a few steps, on CPU. Norms and the rest of the recipe are kept."""
    from detectron2.config import LazyCall as L
    from detectron2.config import LazyConfig
    from detectron2.data import transforms as T
    from detectron2.layers import ShapeSpec

    cfg = LazyConfig.load(path)
    model, heads = cfg.model, cfg.model.roi_heads
    model.backbone.bottom_up.stages.depth = 18
    model.backbone.bottom_up.stages.pop("stride_in_1x1")  # BasicBlock has no such argument
    model.backbone.out_channels = 32
    model.proposal_generator.head.in_channels = 32
    model.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
    model.proposal_generator.pre_nms_topk = (200, 100)
    model.proposal_generator.post_nms_topk = (100, 50)
    heads.num_classes = num_classes
    heads.batch_size_per_image = 32
    heads.box_head.input_shape = ShapeSpec(channels=32, height=7, width=7)
    heads.box_head.conv_dims = [32, 32, 32, 32]
    heads.box_head.fc_dims = [64]
    heads.box_predictor.input_shape = ShapeSpec(channels=64)
    heads.mask_head.input_shape = ShapeSpec(channels=32, height=14, width=14)
    heads.mask_head.conv_dims = [32] * 5
    cfg.mabn.update(buffer_size=2, warmup_iters=0, renorm_warmup_iters=3)
    cfg.train.update(device="cpu", amp=dict(enabled=False), mabn_log_period=1, seed=7)
    resize = L(T.ResizeShortestEdge)(short_edge_length=size, max_size=size)
    cfg.dataloader.train.mapper.augmentations = [resize]
    cfg.dataloader.test.mapper.augmentations = [resize]
    return cfg


def train_checking_finite(model, batch, steps):
    """`steps` SGD steps of `model` on `batch`; every loss and, at the end, every buffer is finite."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with EventStorage():
        for _ in range(steps):
            losses = model(batch)
            total = sum(losses.values())
            assert torch.isfinite(total), losses
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    for name, buf in model.named_buffers():
        assert torch.isfinite(buf.float()).all(), name


def distribution_key(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): "Scikit_Image" → "scikit-image"."""
    return re.sub(r"[-_.]+", "-", name).lower()
