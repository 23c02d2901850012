"""A training sampler that can start in the middle of its stream, so a resumed run sees the data an
uninterrupted run would have seen."""
import itertools
import logging
from typing import Iterator

import torch
from detectron2.utils import comm
from torch.utils.data import Sampler

__all__ = ["ResumableTrainingSampler", "resumable_loader_arguments", "shared_data_seed"]


class ResumableTrainingSampler(Sampler):
    """Infinite stream of shuffled dataset indices, sharded across ranks.

    The global stream is a sequence of permutations, permutation e drawn from a generator seeded
    with (seed, e); rank r takes every world_size-th index from position r. Being a pure function of
    `seed`, the stream can be restarted at any point.

    Args:
        size: number of dataset items.
        seed: shared by all ranks.
        start: indices of this rank's stream to skip (iterations done × images per rank per step).
    """

    def __init__(self, size: int, *, seed: int, start: int = 0):
        if size < 1:
            raise ValueError(f"ResumableTrainingSampler needs a non-empty dataset, got size {size}")
        self._size = size
        self._seed = int(seed)
        self._start = start
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def _global_stream(self) -> Iterator[int]:
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
            yield from torch.randperm(self._size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        first = self._rank + self._start * self._world_size
        yield from itertools.islice(self._global_stream(), first, None, self._world_size)


def resumable_loader_arguments(dataset_size: int, images_per_step: int, seed: int,
                               start_iter: int) -> dict:
    """`build_detection_train_loader` arguments for this process's part of the data stream of
    `seed`, from optimizer step `start_iter` on: the sampler, and the seed of the loader's own
    generator, so that starting the loader draws nothing from torch's global one (a run resumed
    at step k starts its loader then, the uninterrupted run at step 0).

    Args:
        images_per_step: images per optimizer step, all processes together.
    """
    per_rank_images = images_per_step // comm.get_world_size()
    return {"sampler": ResumableTrainingSampler(dataset_size, seed=seed,
                                                start=start_iter * per_rank_images),
            "seed": seed + comm.get_rank()}


def shared_data_seed(seed: int) -> int:
    """`seed` if ≥ 0, else one random seed drawn by process 0 and shared by all (logged).
    Every process must call it."""
    if seed >= 0:
        return seed
    drawn = comm.shared_random_seed()
    logging.getLogger(__name__).info(
        f"SEED < 0: the training data order uses seed {drawn}, drawn once for all processes and "
        "kept in every checkpoint")
    return drawn
