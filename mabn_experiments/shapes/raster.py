"""Supersampled rasterisation shared by shapes and distractor strokes.

Each primitive is drawn once at ``SUPERSAMPLING``× resolution and box-filtered down. The resulting
per-pixel coverage gives anti-aliased edges when painting, and thresholding the same coverage at
one half gives the exact boolean label, so labels and pixels can never disagree by more than the
anti-aliasing fringe.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLING = 4
# A pixel belongs to a primitive when the primitive covers at least this fraction of it.
LABEL_COVERAGE = 0.5

# (row slice, column slice) addressing a rectangle of a 2-D array.
Slices2d = tuple[slice, slice]


@dataclass(frozen=True)
class Footprint:
    """Anti-aliased coverage of one primitive inside its own bounding window.

    Attributes:
        coverage: float32 array of shape (h, w) with values in [0, 1].
        top: Image row of the window's first row (may be negative or beyond the image).
        left: Image column of the window's first column (may be negative or beyond the image).
    """

    coverage: np.ndarray
    top: int
    left: int

    @property
    def mask(self) -> np.ndarray:
        """Boolean label of the whole primitive, shape (h, w), ignoring the image border."""
        return self.coverage >= LABEL_COVERAGE

    @property
    def area(self) -> int:
        """Number of labelled pixels, counting those that fall outside the image."""
        return int(np.count_nonzero(self.mask))

    def overlap_slices(self, height: int, width: int) -> tuple[Slices2d, Slices2d]:
        """Where the window meets an image of the given size.

        Args:
            height: Image height in pixels.
            width: Image width in pixels.

        Returns:
            ``(image_slices, window_slices)``: row/column slices into the image and into
            ``coverage`` that address the same pixels. They are empty when the window lies
            entirely outside the image.
        """
        window_h, window_w = self.coverage.shape
        rows = _clip_span(self.top, window_h, height)
        cols = _clip_span(self.left, window_w, width)
        image_slices = (slice(*rows), slice(*cols))
        window_slices = (
            slice(rows[0] - self.top, rows[1] - self.top),
            slice(cols[0] - self.left, cols[1] - self.left),
        )
        return image_slices, window_slices

    def image_mask(self, height: int, width: int) -> np.ndarray:
        """The label cropped to the image: bool array of shape (height, width)."""
        full = np.zeros((height, width), dtype=bool)
        image_slices, window_slices = self.overlap_slices(height, width)
        full[image_slices] = self.mask[window_slices]
        return full


def _clip_span(start: int, length: int, limit: int) -> tuple[int, int]:
    """Intersect ``[start, start + length)`` with ``[0, limit)``; if disjoint, begin == end."""
    begin = min(max(start, 0), limit)
    end = max(min(start + length, limit), begin)
    return begin, end


def polygons_footprint(filled: np.ndarray, holes: Sequence[np.ndarray] = ()) -> Footprint:
    """Rasterise a filled polygon with optional holes cut out of it.

    Args:
        filled: float array (N, 2) of (x, y) vertices in image pixels.
        holes: float arrays (M, 2) of (x, y) vertices whose interiors are removed from ``filled``.

    Returns:
        The polygon's footprint; its window encloses ``filled`` with a one-pixel margin.
    """
    top, left, height, width = _window_around(filled, margin=1.0)
    canvas, draw = _supersampled_canvas(height, width)
    draw.polygon(_to_canvas(filled, top, left), fill=255)
    for hole in holes:
        draw.polygon(_to_canvas(hole, top, left), fill=0)
    return Footprint(_box_filter(canvas), top, left)


def stroke_footprint(points: np.ndarray, stroke_width: float) -> Footprint:
    """Rasterise an open polyline with round joints.

    Args:
        points: float array (N, 2) of (x, y) vertices in image pixels, N ≥ 2.
        stroke_width: Line width in image pixels.

    Returns:
        The stroke's footprint.
    """
    top, left, height, width = _window_around(points, margin=stroke_width / 2 + 1.0)
    canvas, draw = _supersampled_canvas(height, width)
    draw.line(
        _to_canvas(points, top, left),
        fill=255,
        width=max(1, round(stroke_width * SUPERSAMPLING)),
        joint="curve",
    )
    return Footprint(_box_filter(canvas), top, left)


def _window_around(points: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """Integer window ``(top, left, height, width)`` enclosing ``points`` plus ``margin`` pixels."""
    left = math.floor(points[:, 0].min() - margin)
    top = math.floor(points[:, 1].min() - margin)
    right = math.ceil(points[:, 0].max() + margin)
    bottom = math.ceil(points[:, 1].max() + margin)
    return top, left, bottom - top, right - left


def _supersampled_canvas(height: int, width: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    canvas = Image.new("L", (width * SUPERSAMPLING, height * SUPERSAMPLING), 0)
    return canvas, ImageDraw.Draw(canvas)


def _to_canvas(points: np.ndarray, top: int, left: int) -> list[tuple[float, float]]:
    """Image (x, y) → supersampled canvas coordinates, as a list of (x, y) tuples for PIL."""
    scaled = (points - np.array([left, top])) * SUPERSAMPLING
    return [tuple(point) for point in scaled.tolist()]


def _box_filter(canvas: Image.Image) -> np.ndarray:
    """Average each SUPERSAMPLING² block of an 8-bit canvas into float32 coverage in [0, 1].

    PIL's reduce rounds the block means to 8 bits; labels threshold that rounded value, so they
    stay exact with respect to the coverage used for painting.
    """
    return np.asarray(canvas.reduce(SUPERSAMPLING), dtype=np.float32) / np.float32(255)


def blend_into(canvas: np.ndarray, footprint: Footprint, paint: np.ndarray) -> None:
    """Paint over ``canvas`` in place wherever ``footprint`` covers it.

    Args:
        canvas: float32 image (H, W, 3) in [0, 1], modified in place.
        footprint: Where to paint; parts outside the canvas are ignored.
        paint: float32 (h, w, 3) colours aligned with ``footprint.coverage``.
    """
    image_slices, window_slices = footprint.overlap_slices(*canvas.shape[:2])
    alpha = footprint.coverage[window_slices][..., None]
    region = canvas[image_slices]
    region += (paint[window_slices] - region) * alpha
