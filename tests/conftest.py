"""Fixtures shared by the tests; plain helpers are in tests/common.py."""
import os

# OpenMP threads waiting for work sleep instead of spinning: a spinning thread holds a core that
# the thread it waits for, or another test process (DDP workers, the Triton interpreter's shards),
# needs. On a busy 2-core machine the spinning made the tiny models' training 4 times slower. Set
# before torch loads OpenMP, which reads it then; the tests' subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from tests.common import synthetic_image, write_tiny_coco


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Gives every test the thread count the session started with: the study, the benchmarks and
    the training tools set torch's thread count for their process, which here is pytest's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def batch_with_empty_image():
    """Two images: one with two objects, one with none (a mask head then sees few or no RoIs)."""
    return [synthetic_image(boxes=[(8, 8, 30, 28), (34, 30, 60, 60)], seed=1),
            synthetic_image(boxes=[], seed=2)]


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))
