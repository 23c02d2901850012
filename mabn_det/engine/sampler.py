"""A training sampler that can start in the middle of its stream, so a resumed run sees the data an
uninterrupted run would have seen."""
import itertools
from typing import Iterator

import torch
from detectron2.utils import comm
from torch.utils.data import Sampler

__all__ = ["ResumableTrainingSampler"]


class ResumableTrainingSampler(Sampler):
    """Infinite stream of shuffled dataset indices, sharded across ranks.

    The global stream is a sequence of permutations, permutation e drawn from a generator seeded
    with (seed, e); rank r takes every world_size-th index from position r. Being a pure function of
    `seed`, the stream can be restarted at any point.

    Args:
        size: number of dataset items.
        seed: shared by all ranks; None draws one shared random seed.
        start: indices of this rank's stream to skip (iterations done × images per rank per step).
    """

    def __init__(self, size: int, *, seed: int | None = None, start: int = 0):
        if size < 1:
            raise ValueError(f"ResumableTrainingSampler needs a non-empty dataset, got size {size}")
        self._size = size
        self._seed = comm.shared_random_seed() if seed is None else int(seed)
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
