"""The training data stream as a pure function of its seed and position: a resumed run sees the
batches, and the augmentations, that an uninterrupted run would have seen, whatever the number of
loader workers."""
import itertools
import logging
import random
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

from .state import preserved_rng

__all__ = ["ResumableBatches", "build_resumable_train_loader", "shared_data_seed"]

# A stream entry: (position in the stream of all processes, dataset index).
Entry = Tuple[int, int]


class ResumableBatches(Sampler):
    """This process's training batches: an infinite stream of (position, dataset index) lists.

    The stream of all processes is a sequence of permutations of the dataset, permutation e drawn
    from a generator seeded with (seed, e); process r takes every world_size-th entry from position
    r. Its entries are cut into batches of `batch_size`; with `landscape` (per dataset index:
    width > height) an entry joins the pending batch of its orientation and a batch is emitted when
    full, as Detectron2's AspectRatioGroupedDataset groups images. Everything is a function of the
    seed, so batch k is found by replaying k batches of indices (no image is read).

    Args:
        size: number of dataset items.
        batch_size: images per batch of this process.
        seed: shared by all processes.
        start: batches to skip.
        landscape: group by orientation when given; None for plain consecutive batches.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, start: int = 0,
                 landscape: Sequence[bool] | None = None):
        if size < 1:
            raise ValueError(f"ResumableBatches needs a non-empty dataset, got size {size}")
        self._size = size
        self._batch_size = batch_size
        self._seed = int(seed)
        self._start = start
        self._landscape = landscape
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def _entries(self) -> Iterator[Entry]:
        positions = itertools.count()
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
            yield from zip(positions, torch.randperm(self._size, generator=generator).tolist())

    def _batches(self) -> Iterator[List[Entry]]:
        own = itertools.islice(self._entries(), self._rank, None, self._world_size)
        pending: List[List[Entry]] = [[], []]
        for entry in own:
            group = pending[int(self._landscape[entry[1]])] if self._landscape else pending[0]
            group.append(entry)
            if len(group) == self._batch_size:
                yield group[:]
                group.clear()

    def __iter__(self) -> Iterator[List[Entry]]:
        return itertools.islice(self._batches(), self._start, None)


class _PositionSeededDataset(Dataset):
    """dataset[(position, index)] = mapper(record `index`), with python's, numpy's and torch's
    (CPU) generators seeded from (seed, position) during the mapping and restored after it: an
    image's augmentation depends on its place in the stream only, not on the loader worker that
    maps it, nor on what that worker mapped before."""

    def __init__(self, records: List[dict], mapper: Callable[[dict], dict], seed: int):
        self._records = DatasetFromList(records, copy=False)
        self._mapper = mapper
        self._seed = seed

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, entry: Entry) -> dict:
        position, index = entry
        sample_seed = int(np.random.SeedSequence([self._seed, position]).generate_state(1)[0])
        with preserved_rng():
            torch.default_generator.manual_seed(sample_seed)
            np.random.seed(sample_seed)
            random.seed(sample_seed)
            mapped = self._mapper(self._records[index])
        if mapped is None:
            raise ValueError(f"the training mapper returned None for dataset record {index} "
                             f"({self._records[index].get('file_name')}); the resumable stream "
                             "has no replacement for it")
        return mapped


def _as_list(batch: list) -> list:
    return batch


def build_resumable_train_loader(dataset: List[dict], mapper: Callable[[dict], dict], *,
                                 total_batch_size: int, seed: int | None = None,
                                 start_batch: int = 0, aspect_ratio_grouping: bool = True,
                                 num_workers: int = 0,
                                 collate_fn: Callable | None = None) -> DataLoader:
    """Detectron2's training loader (the arguments of `build_detection_train_loader`, but the
    sampler) whose stream is `ResumableBatches` of `seed` from batch `start_batch` on, each image
    mapped with generators seeded by its stream position. So the batches, and their
    augmentations, do not depend on where the stream was (re)started nor on `num_workers`.

    It is what ``DATALOADER.SAMPLER_TRAIN: "ResumableTrainingSampler"`` names (for the Trainer),
    and a LazyConfig's ``dataloader.train._target_`` (tools/lazyconfig_train_net.py passes the
    seed and start).

    Args:
        dataset: the dataset's records (list[dict]).
        total_batch_size: images per batch, all processes together.
        seed: the stream's seed, shared by all processes; None draws one
            (`shared_data_seed`, a collective).
    """
    if seed is None:
        seed = shared_data_seed(-1)
    world_size = comm.get_world_size()
    if total_batch_size % world_size:
        raise ValueError(f"the total batch size ({total_batch_size}) must be divisible by the "
                         f"number of processes ({world_size})")
    landscape = ([r["width"] > r["height"] for r in dataset] if aspect_ratio_grouping else None)
    batches = ResumableBatches(len(dataset), total_batch_size // world_size, seed=seed,
                               start=start_batch, landscape=landscape)
    logging.getLogger(__name__).info(
        f"Resumable training stream: seed {seed}, batches of {total_batch_size // world_size} "
        f"per process from batch {start_batch}")
    return DataLoader(_PositionSeededDataset(dataset, mapper, seed), batch_sampler=batches,
                      num_workers=num_workers, collate_fn=collate_fn or _as_list,
                      generator=torch.Generator().manual_seed(seed + comm.get_rank()))


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
