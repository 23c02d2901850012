"""The training data stream restarts at any batch with the same batches and augmentations, with
or without loader workers, and groups images by orientation; it has its own sampler name."""
import itertools
import random

import numpy as np
import pytest
import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.datasets import register_coco_instances

from mabn_det.engine import Trainer
from mabn_det.engine.sampler import ResumableBatches, build_resumable_train_loader
from tests.common import make_cfg, train_opts

# Odd records are landscape, even ones portrait.
RECORDS = [{"image_id": i, "width": 60 + 10 * (i % 2), "height": 64} for i in range(7)]


def random_mapper(record):
    """A mapper drawing from every generator an augmentation may use."""
    return {"image_id": record["image_id"], "python": random.random(),
            "numpy": float(np.random.rand()), "torch": float(torch.rand(()))}


def _batches(num_workers, start_batch, count):
    loader = build_resumable_train_loader(RECORDS, random_mapper, total_batch_size=2, seed=5,
                                          start_batch=start_batch, num_workers=num_workers)
    return list(itertools.islice(loader, count))


def test_batches_group_orientations_and_restart_anywhere():
    landscape = [r["width"] > r["height"] for r in RECORDS]
    full = list(itertools.islice(ResumableBatches(7, 3, seed=1, landscape=landscape), 12))
    for batch in full:
        assert len(batch) == 3 and len({landscape[index] for _, index in batch}) == 1
    positions = [p for batch in full for p, _ in batch]
    assert len(set(positions)) == len(positions)
    assert list(itertools.islice(ResumableBatches(7, 3, seed=1, landscape=landscape, start=5),
                                 7)) == full[5:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_restarts_with_the_same_augmentations(num_workers):
    full = _batches(0, 0, 8)
    assert len({sample["numpy"] for batch in full for sample in batch}) == 16
    torch.manual_seed(0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    resumed = _batches(num_workers, 3, 5)
    assert resumed == full[3:]
    # Mapping in this process leaves its generators as they were.
    assert torch.equal(before[0], torch.get_rng_state())
    assert np.array_equal(before[1], np.random.get_state()[1]) and before[2] == random.getstate()


def _image_ids(loader, count):
    return [record["image_id"] for batch in itertools.islice(loader, count) for record in batch]


def test_the_sampler_names_mean_detectron2s_samplers_and_ours(tiny_coco, tmp_path):
    """"TrainingSampler" is Detectron2's (the same stream as its own loader gives, without a
    resume position); "ResumableTrainingSampler", which our configs set, is the resumable stream."""
    register_coco_instances("tiny_samplers", {}, *tiny_coco)
    ours = make_cfg(opts=train_opts(str(tmp_path), "tiny_samplers", **{"SOLVER.IMS_PER_BATCH": 1}))
    assert ours.DATALOADER.SAMPLER_TRAIN == "ResumableTrainingSampler"
    assert isinstance(Trainer.build_train_loader(ours).batch_sampler, ResumableBatches)

    stock = ours.clone()
    stock.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    streams = []
    for build in (Trainer.build_train_loader, build_detection_train_loader):
        np.random.seed(3)  # Detectron2's TrainingSampler draws its seed from numpy
        streams.append(_image_ids(build(stock), 8))
    assert streams[0] == streams[1]
