"""Fixtures shared by the tests; plain helpers are in tests/common.py."""
import pytest

from tests.common import synthetic_image, write_tiny_coco


@pytest.fixture
def batch_with_empty_image():
    """Two images: one with two objects, one with none (a mask head then sees few or no RoIs)."""
    return [synthetic_image(boxes=[(8, 8, 30, 28), (34, 30, 60, 60)], seed=1),
            synthetic_image(boxes=[], seed=2)]


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))
