"""Colours, textures and whole-image photometric changes for the synthetic shapes.

Everything here is about how pixels look, never about what they are: shapes and backgrounds draw
their colours from the same pool so that a detector can only tell classes apart by geometry.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import skimage.data
from PIL import Image
from scipy import ndimage

# Photographs and textures bundled inside the scikit-image wheel (tests check that each loads with
# the network blocked). Images dominated by circles or discs (coins, retina, colorwheel, clock, the
# cup in coffee) are left out because they would look like unlabelled ellipses and rings.
TEXTURE_NAMES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
)
FILL_STYLES = ("flat", "gradient", "texture")
# Probabilities over FILL_STYLES: backgrounds are mostly busy, objects mostly plain.
BACKGROUND_STYLE_WEIGHTS = (0.2, 0.3, 0.5)
OBJECT_STYLE_WEIGHTS = (0.5, 0.25, 0.25)
# Smallest share of the texture's shorter side that a crop may use; smaller crops zoom in further.
MIN_TEXTURE_CROP_FRACTION = 0.15

# Whole-image photometric changes. The ranges are wide on purpose: per-image statistics should
# differ a lot, so that how a network normalises its activations matters.
BLUR_PROBABILITY = 0.35
BLUR_SIGMA_RANGE = (0.4, 1.2)
NOISE_SIGMA_RANGE = (0.0, 0.05)


@dataclass(frozen=True)
class Photometry:
    """Ranges of the per-image changes of `perturb_photometry`.

    Attributes:
        gamma_range: exponent applied to the pixels, sampled log-uniformly.
        channel_gain_range: a factor per colour channel, sampled independently: a colour cast.
        contrast_range: scales deviations from the image mean, sampled log-uniformly.
        brightness_range: the new image mean.
    """

    gamma_range: tuple[float, float] = (0.5, 2.0)
    channel_gain_range: tuple[float, float] = (0.75, 1.25)
    contrast_range: tuple[float, float] = (0.45, 1.5)
    brightness_range: tuple[float, float] = (0.2, 0.8)


STANDARD_PHOTOMETRY = Photometry()
# Stronger casts and tone curves, for images whose content alone would give every image about the
# same statistics (the colour-coded "study" style): two images' mean and variance then differ
# from the population's by a lot.
STRONG_PHOTOMETRY = Photometry(gamma_range=(0.4, 2.5), channel_gain_range=(0.6, 1.4),
                               contrast_range=(0.4, 1.6), brightness_range=(0.15, 0.85))


@functools.cache
def load_texture(name: str) -> np.ndarray:
    """One of TEXTURE_NAMES as uint8 (H, W) for greyscale sources or (H, W, 3) for colour ones."""
    pixels = getattr(skimage.data, name)()
    return pixels if pixels.ndim == 2 else pixels[..., :3]


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A sample whose logarithm is uniform on [log(low), log(high)]."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random RGB colour: float32 array (3,) in [0, 1]."""
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def _flat_fill(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return np.broadcast_to(random_colour(rng), (height, width, 3)).copy()


def _gradient_fill(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Linear blend between two random colours along a random direction."""
    return linear_gradient(rng, random_colour(rng), random_colour(rng), height, width)


def linear_gradient(rng: np.random.Generator, start: np.ndarray, end: np.ndarray, height: int,
                    width: int) -> np.ndarray:
    """Linear blend from colour `start` to colour `end` (each float (3,)) along a random direction.

    Returns:
        float32 array (height, width, 3).
    """
    angle = rng.uniform(0.0, 2.0 * np.pi)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    position = cols * np.float32(np.cos(angle)) + rows * np.float32(np.sin(angle))
    span = max(float(position.max() - position.min()), 1.0)
    weight = ((position - position.min()) / np.float32(span))[..., None]
    return start + (end - start) * weight


def _texture_fill(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A randomly placed, scaled and flipped crop of a bundled photograph, recoloured."""
    source = load_texture(TEXTURE_NAMES[rng.integers(len(TEXTURE_NAMES))])
    crop = Image.fromarray(np.ascontiguousarray(_random_crop(rng, source, aspect=height / width)))
    patch = np.asarray(crop.resize((width, height), Image.Resampling.BILINEAR), np.float32) / 255.0
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    return _recolour(rng, patch)


def _random_crop(rng: np.random.Generator, source: np.ndarray, aspect: float) -> np.ndarray:
    """A random window of ``source`` whose height / width is about ``aspect``."""
    source_h, source_w = source.shape[:2]
    fraction = rng.uniform(MIN_TEXTURE_CROP_FRACTION, 1.0)
    crop_h = max(1, round(min(source_h, source_w * aspect) * fraction))
    crop_w = max(1, min(source_w, round(crop_h / aspect)))
    top = rng.integers(source_h - crop_h + 1)
    left = rng.integers(source_w - crop_w + 1)
    return source[top : top + crop_h, left : left + crop_w]


def _recolour(rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
    """Colour patch (h, w, 3): shuffle channels. Grey patch (h, w): map between two random colours.

    Returns:
        float32 (h, w, 3) in [0, 1].
    """
    if patch.ndim == 3:
        return np.ascontiguousarray(patch[..., rng.permutation(3)])
    dark, light = random_colour(rng), random_colour(rng)
    return dark + (light - dark) * patch[..., None]


def render_fill(
    rng: np.random.Generator, height: int, width: int, style_weights: tuple[float, ...]
) -> np.ndarray:
    """A random flat, gradient or texture patch.

    Args:
        rng: Source of randomness.
        height: Patch height in pixels.
        width: Patch width in pixels.
        style_weights: Probabilities of the styles in FILL_STYLES, in that order.

    Returns:
        float32 array (height, width, 3) in [0, 1].
    """
    renderers = (_flat_fill, _gradient_fill, _texture_fill)  # in FILL_STYLES order
    return renderers[rng.choice(len(FILL_STYLES), p=style_weights)](rng, height, width)


def perturb_photometry(
    rng: np.random.Generator, image: np.ndarray, photometry: Photometry = STANDARD_PHOTOMETRY
) -> np.ndarray:
    """Apply random blur, gamma, colour cast, contrast, brightness and noise.

    Args:
        rng: Source of randomness.
        image: float32 (H, W, 3) in [0, 1].
        photometry: The ranges the changes are drawn from.

    Returns:
        float32 array (H, W, 3), not clipped.
    """
    if rng.random() < BLUR_PROBABILITY:
        sigma = rng.uniform(*BLUR_SIGMA_RANGE)
        image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0.0))
    image = np.clip(image, 0.0, 1.0) ** np.float32(log_uniform(rng, *photometry.gamma_range))
    image = image * rng.uniform(*photometry.channel_gain_range, size=3).astype(np.float32)
    contrast = np.float32(log_uniform(rng, *photometry.contrast_range))
    brightness = np.float32(rng.uniform(*photometry.brightness_range))
    image = brightness + (image - image.mean()) * contrast
    noise_sigma = np.float32(rng.uniform(*NOISE_SIGMA_RANGE))
    return image + noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
