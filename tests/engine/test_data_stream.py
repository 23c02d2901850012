"""The training data stream restarts at any batch with the same batches and augmentations, with
or without loader workers, and groups images by orientation."""
import itertools
import random

import numpy as np
import pytest
import torch

from mabn_det.engine.sampler import ResumableBatches, build_resumable_train_loader

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
