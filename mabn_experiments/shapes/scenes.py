"""One synthetic image: a busy background, unlabelled strokes and overlapping labelled shapes.

The class of an object is decided by its outline alone; size, aspect ratio, rotation, colour and
texture are drawn independently of it. Objects are painted back to front, so each label is the
part of its shape that stays visible.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .appearance import (
    BACKGROUND_STYLE_WEIGHTS,
    OBJECT_STYLE_WEIGHTS,
    STANDARD_PHOTOMETRY,
    STRONG_PHOTOMETRY,
    Photometry,
    linear_gradient,
    log_uniform,
    perturb_photometry,
    random_colour,
    render_fill,
)
from .raster import Footprint, blend_into, polygons_footprint, stroke_footprint

# Pixel sizes are stated for this image size. Stroke sizes and the minimum object size grow in
# proportion for larger images; the minimum object size does not shrink for smaller ones, where
# shapes would become unrecognisable.
REFERENCE_IMAGE_SIZE = 128


@dataclass(frozen=True)
class SceneStyle:
    """How crowded and how small the objects of an image are.

    Attributes:
        max_objects: labelled objects per image are drawn log-uniformly from 1 to this.
        backdrop_probability: chance that an object is a "backdrop", a shape bigger than the
            image kept at the bottom of the stack. COCO's "large" (area ≥ 96²) is most of a 128 px
            image and log-uniform sizes hardly ever reach it; with 0.1 about 2% of the labelled
            objects end up large.
        max_distractors: unlabelled strokes per image are drawn uniformly from 0 to this.
        min_object_size_px: smallest object size at REFERENCE_IMAGE_SIZE.
        max_object_size_fraction: largest (non-backdrop) object size, as a fraction of the image.
        photometric_changes: change each image's gamma, colour balance, contrast, brightness,
            sharpness and noise (what makes per-image statistics differ).
        photometry: the ranges of those changes.
        num_classes: objects are drawn from the first `num_classes` of SHAPE_CLASSES (the
            category ids stay those of SHAPE_CLASSES, so every style shares one registration).
        colour_coded: paint every object of a class in that class's CLASS_COLOURS entry (jittered,
            flat) on a grey background, so colour alone tells the classes apart. Otherwise
            object and background colours are drawn from one pool and only outlines tell.
    """

    max_objects: int = 20
    backdrop_probability: float = 0.1
    max_distractors: int = 6
    min_object_size_px: float = 6.0
    max_object_size_fraction: float = 0.8
    photometric_changes: bool = True
    photometry: Photometry = STANDARD_PHOTOMETRY
    num_classes: int = 6
    colour_coded: bool = False

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"num_classes must be in [1, {len(SHAPE_CLASSES)}], got {self.num_classes}")
        if self.colour_coded and self.num_classes > len(CLASS_COLOURS):
            raise ValueError(f"colour_coded needs num_classes ≤ {len(CLASS_COLOURS)} (one colour "
                             f"per class), got {self.num_classes}")


# The colour of each class (SHAPE_CLASSES order) in colour-coded styles: red, green, blue, far
# apart from each other and from the grey backgrounds.
CLASS_COLOURS = ((0.85, 0.2, 0.15), (0.2, 0.75, 0.25), (0.15, 0.35, 0.9))
# Each colour channel of a colour-coded object is moved by up to this much, per object.
CLASS_COLOUR_JITTER = 0.08
# Grey levels of colour-coded backgrounds: a linear gradient between two of them.
GREY_BACKGROUND_RANGE = (0.3, 0.7)
BACKDROP_SIZE_FRACTIONS = (1.2, 1.8)
# Keeps thin rectangles and ellipses at least this many pixels wide.
MIN_SHORT_SIDE_PX = 3.0
# Up to this fraction of an object's half-size may stick out past the image border.
MAX_OUTSIDE_FRACTION = 0.5
# Objects showing less than this much of themselves are not painted (they would be unfair labels).
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 12
# How different (per channel, in [0, 1]) an object's mean colour must be from what lies beneath it.
MIN_FILL_CONTRAST = 0.2
FILL_ATTEMPTS = 4
ELLIPSE_VERTICES = 48

# An outline in the unit box [-0.5, 0.5]²: the filled polygon and the holes cut out of it.
Outline = tuple[np.ndarray, list[np.ndarray]]


@dataclass(frozen=True)
class ShapeClass:
    """How to draw one category.

    Attributes:
        name: Category name written to the annotations.
        outline: Draws a random outline of this class in the unit box.
        aspect_range: Range of width / height before rotation.
        min_size_factor: Multiplies the minimum object size, for classes whose defining detail
            (a ring's hole, a star's points) needs more pixels.
    """

    name: str
    outline: Callable[[np.random.Generator], Outline]
    aspect_range: tuple[float, float]
    min_size_factor: float = 1.0


@dataclass(frozen=True)
class ShapeInstance:
    """A labelled object of a rendered image.

    Attributes:
        category_id: 1-based index into SHAPE_CLASSES.
        mask: bool (H, W), the pixels where the object is visible.
    """

    category_id: int
    mask: np.ndarray


@dataclass(frozen=True)
class _PlacedShape:
    category_id: int
    footprint: Footprint


def _circle(radius: float) -> np.ndarray:
    angles = np.linspace(0.0, 2.0 * np.pi, ELLIPSE_VERTICES, endpoint=False)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _ellipse_outline(rng: np.random.Generator) -> Outline:
    return _circle(0.5), []


def _rectangle_outline(rng: np.random.Generator) -> Outline:
    return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]), []


def _triangle_outline(rng: np.random.Generator) -> Outline:
    apex_x = rng.uniform(-0.4, 0.4)
    return np.array([[-0.5, 0.5], [0.5, 0.5], [apex_x, -0.5]]), []


def _star_outline(rng: np.random.Generator) -> Outline:
    points = int(rng.integers(5, 7))
    inner_ratio = rng.uniform(0.38, 0.55)
    angles = np.arange(2 * points) * np.pi / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, 0.5, 0.5 * inner_ratio)
    return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1), []


def _ring_outline(rng: np.random.Generator) -> Outline:
    return _circle(0.5), [_circle(0.5 * rng.uniform(0.4, 0.65))]


def _cross_outline(rng: np.random.Generator) -> Outline:
    t = rng.uniform(0.12, 0.2)  # half the arm thickness
    return np.array([
        [-t, -0.5], [t, -0.5], [t, -t], [0.5, -t], [0.5, t], [t, t],
        [t, 0.5], [-t, 0.5], [-t, t], [-0.5, t], [-0.5, -t], [-t, -t],
    ]), []


SHAPE_CLASSES = (
    ShapeClass("ellipse", _ellipse_outline, aspect_range=(0.35, 1.0)),
    ShapeClass("rectangle", _rectangle_outline, aspect_range=(0.25, 1.0)),
    ShapeClass("triangle", _triangle_outline, aspect_range=(0.5, 1.2)),
    ShapeClass("star", _star_outline, aspect_range=(0.75, 1.0), min_size_factor=1.5),
    ShapeClass("ring", _ring_outline, aspect_range=(0.6, 1.0), min_size_factor=2.0),
    ShapeClass("cross", _cross_outline, aspect_range=(0.75, 1.0), min_size_factor=1.5),
)
SHAPE_CLASS_NAMES = tuple(shape_class.name for shape_class in SHAPE_CLASSES)

# "standard" is the set of the norm study: crowded, small objects, occlusion and clutter.
# "simple" has fewer and larger objects, no clutter and no per-image photometric changes (the
# backgrounds still vary).
# "demo" is what `make demo` learns from scratch in minutes on a CPU: three classes (ellipse,
# rectangle, triangle) that differ in outline *and* colour, one to four large objects on a grey
# gradient. Six outline-only classes on varied backgrounds (the simple style) reach < 5 box AP in
# 4,000 image views; the demo is meant to show a working detector.
# "study" is the demo's scenes seen through strong per-image gamma, colour cast, contrast,
# brightness, blur and noise: it learns almost as fast as the demo, but the statistics of a batch of
# 2 images stray far from those of the population, which is what small-batch BatchNorm suffers from
# (tools/compare_norms.py ranks the norms on it).
SCENE_STYLES = {
    "standard": SceneStyle(),
    "simple": SceneStyle(max_objects=6, backdrop_probability=0.0, max_distractors=0,
                         min_object_size_px=16.0, max_object_size_fraction=0.7,
                         photometric_changes=False),
    "demo": SceneStyle(max_objects=4, backdrop_probability=0.0, max_distractors=0,
                       min_object_size_px=24.0, max_object_size_fraction=0.6,
                       photometric_changes=False, num_classes=3, colour_coded=True),
    "study": SceneStyle(max_objects=4, backdrop_probability=0.0, max_distractors=0,
                        min_object_size_px=24.0, max_object_size_fraction=0.6,
                        photometry=STRONG_PHOTOMETRY, num_classes=3, colour_coded=True),
}


def render_shapes_image(
    rng: np.random.Generator, image_size: int, style: SceneStyle = SCENE_STYLES["standard"]
) -> tuple[np.ndarray, list[ShapeInstance]]:
    """Render one random image and its instance labels.

    Args:
        rng: Source of all randomness; the same generator state gives the same image.
        image_size: Side of the square image in pixels.
        style: How many objects, how small, how much clutter.

    Returns:
        ``(image, instances)``: uint8 RGB image (image_size, image_size, 3) and its 1 to
        ``style.max_objects`` visible objects, bottom-most first, with pairwise disjoint masks.
    """
    scale = image_size / REFERENCE_IMAGE_SIZE
    if style.colour_coded:
        greys = rng.uniform(*GREY_BACKGROUND_RANGE, size=(2, 1)).astype(np.float32)
        canvas = linear_gradient(rng, np.repeat(greys[0], 3), np.repeat(greys[1], 3),
                                 image_size, image_size)
    else:
        canvas = render_fill(rng, image_size, image_size, BACKGROUND_STYLE_WEIGHTS)
    _paint_distractors(rng, canvas, scale, style.max_distractors)
    instances = []
    for shape, visible in _sample_visible_shapes(rng, image_size, style):
        if style.colour_coded:
            fill = _class_colour_fill(rng, shape.category_id, shape.footprint)
        else:
            fill = _contrasting_fill(rng, canvas, shape.footprint)
        blend_into(canvas, shape.footprint, fill)
        instances.append(ShapeInstance(shape.category_id, visible))
    if style.photometric_changes:
        canvas = perturb_photometry(rng, canvas, style.photometry)
    return np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8), instances


def _sample_visible_shapes(
    rng: np.random.Generator, image_size: int, style: SceneStyle
) -> list[tuple[_PlacedShape, np.ndarray]]:
    """Random shapes in painting order, each with its visible mask; never empty.

    Visibility is decided top-down, so a shape that is dropped for being mostly hidden is not
    painted and therefore hides nothing beneath it.

    Returns:
        ``(shape, visible)`` pairs, bottom-most first; ``visible`` is bool (image_size, image_size).
    """
    while True:
        count = _sample_object_count(rng, style.max_objects)
        backdrops = int(rng.binomial(count, style.backdrop_probability))
        stack = [
            _sample_shape(rng, image_size, style, backdrop=index < backdrops)
            for index in range(count)
        ]
        covered = np.zeros((image_size, image_size), dtype=bool)
        kept = []
        for shape in reversed(stack):
            in_image = shape.footprint.image_mask(image_size, image_size)
            visible = in_image & ~covered
            visible_pixels = int(np.count_nonzero(visible))
            if (
                visible_pixels >= MIN_VISIBLE_PIXELS
                and visible_pixels >= MIN_VISIBLE_FRACTION * shape.footprint.area
            ):
                kept.append((shape, visible))
                covered |= in_image
        if kept:
            return kept[::-1]


def _sample_object_count(rng: np.random.Generator, max_objects: int) -> int:
    """1 to `max_objects`, log-uniformly so that sparse images are the most common."""
    return min(math.floor(log_uniform(rng, 1, max_objects + 1)), max_objects)


def _sample_shape(
    rng: np.random.Generator, image_size: int, style: SceneStyle, backdrop: bool
) -> _PlacedShape:
    """A random class at a random log-uniform size, aspect ratio, rotation and position.

    Args:
        rng: Source of randomness.
        image_size: Side of the square image in pixels.
        style: The classes and the object size range.
        backdrop: Draw the size from BACKDROP_SIZE_FRACTIONS of the image instead of the usual
            range (see SceneStyle.backdrop_probability).
    """
    class_index = int(rng.integers(style.num_classes))
    shape_class = SHAPE_CLASSES[class_index]
    if backdrop:
        min_size, max_size = (fraction * image_size for fraction in BACKDROP_SIZE_FRACTIONS)
    else:
        scale = image_size / REFERENCE_IMAGE_SIZE
        min_size = style.min_object_size_px * max(1.0, scale) * shape_class.min_size_factor
        max_size = style.max_object_size_fraction * image_size
    size = log_uniform(rng, min_size, max_size)
    width = max(size * rng.uniform(*shape_class.aspect_range), MIN_SHORT_SIDE_PX)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    inset = min(size / 2 * (1.0 - MAX_OUTSIDE_FRACTION), image_size / 2)
    centre = rng.uniform(inset, image_size - inset, size=2)

    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    extent = np.array([width, size])

    def place(unit_points: np.ndarray) -> np.ndarray:
        return (unit_points * extent) @ rotation.T + centre

    filled, holes = shape_class.outline(rng)
    footprint = polygons_footprint(place(filled), [place(hole) for hole in holes])
    return _PlacedShape(class_index + 1, footprint)


def _paint_distractors(
    rng: np.random.Generator, canvas: np.ndarray, scale: float, max_distractors: int
) -> None:
    """Paint 0 to `max_distractors` unlabelled straight lines and scribbles (text-like strokes)
    onto ``canvas`` in place.

    Args:
        rng: Source of randomness.
        canvas: float32 (H, W, 3) in [0, 1].
        scale: Image size relative to REFERENCE_IMAGE_SIZE; strokes grow with it.
        max_distractors: The most strokes to paint.
    """
    image_size = canvas.shape[0]
    for _ in range(int(rng.integers(max_distractors + 1))):
        if rng.random() < 0.5:
            points = rng.uniform(0.0, image_size, size=(2, 2))
            stroke_width = rng.uniform(0.6, 2.5) * scale
        else:
            points = _scribble(rng, image_size, scale)
            stroke_width = rng.uniform(0.8, 2.0) * scale
        footprint = stroke_footprint(points, stroke_width)
        colour = np.broadcast_to(random_colour(rng), footprint.coverage.shape + (3,))
        blend_into(canvas, footprint, colour)


def _scribble(rng: np.random.Generator, image_size: int, scale: float) -> np.ndarray:
    """A short random walk with a wandering heading: (N, 2) float (x, y) points."""
    steps = int(rng.integers(3, 10))
    headings = rng.uniform(0.0, 2.0 * np.pi) + np.cumsum(rng.normal(0.0, 1.0, size=steps))
    lengths = rng.uniform(2.0, 6.0, size=steps) * scale
    moves = lengths[:, None] * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    start = rng.uniform(0.0, image_size, size=(1, 2))
    return np.concatenate([start, start + np.cumsum(moves, axis=0)])


def _class_colour_fill(
    rng: np.random.Generator, category_id: int, footprint: Footprint
) -> np.ndarray:
    """The flat, jittered CLASS_COLOURS fill of class `category_id` (1-based).

    Returns:
        float32 (h, w, 3) aligned with ``footprint.coverage``.
    """
    colour = np.asarray(CLASS_COLOURS[category_id - 1], np.float32) + rng.uniform(
        -CLASS_COLOUR_JITTER, CLASS_COLOUR_JITTER, size=3).astype(np.float32)
    return np.broadcast_to(colour, footprint.coverage.shape + (3,)).copy()


def _contrasting_fill(
    rng: np.random.Generator, canvas: np.ndarray, footprint: Footprint
) -> np.ndarray:
    """An object fill whose mean colour stands out from the pixels it will cover.

    Returns:
        float32 (h, w, 3) aligned with ``footprint.coverage``. After FILL_ATTEMPTS failures the
        last candidate is used, so a few low-contrast objects remain (as in real data).
    """
    image_slices, window_slices = footprint.overlap_slices(*canvas.shape[:2])
    inside = footprint.mask[window_slices]
    beneath = canvas[image_slices][inside].mean(axis=0)
    for _ in range(FILL_ATTEMPTS):
        fill = render_fill(rng, *footprint.coverage.shape, OBJECT_STYLE_WEIGHTS)
        if np.abs(fill[window_slices][inside].mean(axis=0) - beneath).max() >= MIN_FILL_CONTRAST:
            break
    return fill
