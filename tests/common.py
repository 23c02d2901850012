"""Helpers shared by the tests: tiny configs, synthetic batches and datasets, the tools as modules."""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

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


def fake_slurm(directory):
    """An environment in which the job looks run by SLURM (job 4242) and ``scontrol`` appends its
    arguments to `directory`/scontrol.calls instead of talking to a cluster.

    Returns:
        (env, path of the calls file).
    """
    calls = os.path.join(directory, "scontrol.calls")
    script = os.path.join(directory, "scontrol")
    with open(script, "w") as f:
        f.write(f'#!/bin/sh\necho "$@" >> {calls}\n')
    os.chmod(script, 0o755)
    env = dict(os.environ, PYTHONPATH=REPO, SLURM_JOB_ID="4242",
               PATH=f"{directory}{os.pathsep}{os.environ['PATH']}")
    return env, calls


def preempt(cmd, output_dir, env, *, to: str, timeout: float = 600):
    """Run `cmd`, a tool launching 2 training processes, and send SIGUSR1 as soon as training has
    started (Detectron2's log says so) to the launching process only ("launcher", which must pass
    it on) or to one training process only ("worker", whose peer must stop too). SLURM's
    ``--signal`` reaches every process of the job step, both at once.

    Returns:
        (exit status, console output).
    """
    console = output_dir + "-console.txt"
    with open(console, "w") as out:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    log = os.path.join(output_dir, "log.txt")
    deadline = time.monotonic() + timeout
    while not (os.path.exists(log) and "Starting training from iteration" in open(log).read()):
        assert process.poll() is None, open(console).read()[-4000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    targets = {"launcher": lambda: process.pid,
               "worker": lambda: _training_processes(process.pid)[-1]}
    os.kill(targets[to](), signal.SIGUSR1)
    status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    return status, open(console).read()


def _training_processes(launcher: int):
    """The processes `launcher` started with multiprocessing's spawn (not its helpers)."""
    with open(f"/proc/{launcher}/task/{launcher}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    spawned = []
    for pid in children:
        with open(f"/proc/{pid}/cmdline") as f:
            if "spawn_main" in f.read():
                spawned.append(pid)
    assert spawned, f"no training process under {launcher}"
    return spawned


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def saved_predictions(evaluation_dir):
    """{image_id: instances} of every process's share, as COCOEvaluator saved them."""
    return {p["image_id"]: p["instances"] for p in
            load_checkpoint(os.path.join(evaluation_dir, "instances_predictions.pth"))}


def stopped_at(checkpoint_dir, checkpoint, new_dir):
    """A fresh `new_dir` holding only `checkpoint` of `checkpoint_dir`, as its last checkpoint: a
    run stopped after that checkpoint's iteration, for ``--resume``."""
    os.makedirs(new_dir)
    shutil.copy(os.path.join(checkpoint_dir, checkpoint), new_dir)
    with open(os.path.join(new_dir, "last_checkpoint"), "w") as f:
        f.write(checkpoint)
    return new_dir


def assert_same_training(expected_dir, got_dir, processes=2):
    """model_final.pth of both directories holds the same weights and buffers, and every
    process's buffers; the processes saw different images (different MABN rings) and share one
    running_var."""
    expected, got = (load_checkpoint(os.path.join(d, "model_final.pth"))
                     for d in (expected_dir, got_dir))
    assert expected["model"].keys() == got["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), f"{key} differs"
    states = [c["trainer"]["hooks"]["ProcessStates"]["processes"] for c in (expected, got)]
    assert len(states[0]) == len(states[1]) == processes
    first, second = states[0][0]["buffers"], states[0][1]["buffers"]
    rings = [k for k in first if k.endswith("chi_buffer")]
    assert rings and any(not torch.equal(first[k], second[k]) for k in rings)
    assert all(torch.equal(first[k], second[k]) for k in first if k.endswith("running_var"))
    for rank in range(processes):
        for key, value in states[0][rank]["buffers"].items():
            assert torch.equal(value, states[1][rank]["buffers"][key]), \
                f"process {rank}: {key} differs"


def checkpoint_files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".pth"))
