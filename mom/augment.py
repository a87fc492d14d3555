"""Seeded image augmentations for the proxy retrieval benchmark.

Every random choice is drawn from a ``numpy.random.Generator`` the caller
passes in, so a view is a pure function of (image, level, generator state):
no global random state, no torchvision randomness.

One view is, in this order:

1. geometry, one bilinear resampling (``torch.nn.functional.grid_sample``,
   zero padding): a random resized crop (area fraction and aspect ratio of the
   crop box), a translation of the box, a rotation about its centre and an
   optional horizontal flip, the crop resized back to the input size;
2. photometry on float pixels in [0, 255]: brightness (multiply by ``b``),
   contrast (``(x - mean) * c + mean``, mean over the image), additive Gaussian
   noise;
3. random erasing: an axis-aligned rectangle filled with one random grey level;
4. clipping to [0, 255] and rounding back to ``uint8``.

Two levels are defined (:data:`LEVELS`): ``strong`` (the kind of changes a
contrastive self-supervised method trains with) and ``mild`` (small versions of
the same changes, no flip).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentationLevel:
    """Ranges of the random changes of one level; each is drawn uniformly."""

    crop_area: tuple[float, float]      # crop box area / image area
    crop_aspect: tuple[float, float]    # crop box width / height, drawn log-uniformly
    translate: float                    # extra shift of the box, fraction of the image side
    rotation_degrees: float             # rotation in [-r, r]
    flip_probability: float             # horizontal flip
    brightness: float                   # factor in [1 - b, 1 + b]
    contrast: float                     # factor in [1 - c, 1 + c]
    noise_std: float                    # Gaussian noise, fraction of 255
    erase_probability: float
    erase_area: tuple[float, float]     # erased rectangle area / image area
    erase_aspect: tuple[float, float]   # erased rectangle width / height, log-uniform


LEVELS: dict[str, AugmentationLevel] = {
    "strong": AugmentationLevel(
        crop_area=(0.35, 1.0), crop_aspect=(3 / 4, 4 / 3), translate=0.1, rotation_degrees=30.0,
        flip_probability=0.5, brightness=0.4, contrast=0.4, noise_std=0.06,
        erase_probability=0.5, erase_area=(0.02, 0.2), erase_aspect=(0.3, 3.3),
    ),
    "mild": AugmentationLevel(
        crop_area=(0.8, 1.0), crop_aspect=(0.9, 1 / 0.9), translate=0.03, rotation_degrees=8.0,
        flip_probability=0.0, brightness=0.1, contrast=0.1, noise_std=0.02,
        erase_probability=0.2, erase_area=(0.01, 0.05), erase_aspect=(0.5, 2.0),
    ),
}


def view_generator(seed: int, level: str, item: int, view: int) -> np.random.Generator:
    """The generator of one view: a function of ``(seed, level, item, view)``
    only, so a view does not depend on which other items or views are drawn."""
    return np.random.default_rng([int(seed), zlib.crc32(level.encode()), int(item), int(view)])


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def geometry_matrix(rng: np.random.Generator, level: AugmentationLevel, height: int, width: int) -> np.ndarray:
    """The ``(2, 3)`` affine map from output to input coordinates, both in
    ``affine_grid``'s normalized [-1, 1] units (x = column, y = row).

    In pixel units (origin at the image centre) an output point ``u`` (scaled
    so the output spans the crop box) maps to ``centre + R(angle) diag(flip * w/2, h/2) u``;
    the rotation acts in pixels so non-square images are not sheared.
    """
    area = rng.uniform(*level.crop_area)
    aspect = _log_uniform(rng, *level.crop_aspect)
    box_width = min(width, width * math.sqrt(area * aspect))
    box_height = min(height, height * math.sqrt(area / aspect))
    centre_x = rng.uniform(-(width - box_width) / 2, (width - box_width) / 2) + rng.uniform(-1, 1) * level.translate * width
    centre_y = rng.uniform(-(height - box_height) / 2, (height - box_height) / 2) + rng.uniform(-1, 1) * level.translate * height
    angle = math.radians(rng.uniform(-level.rotation_degrees, level.rotation_degrees))
    flip = -1.0 if rng.uniform() < level.flip_probability else 1.0

    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    box = np.diag([flip * box_width / 2, box_height / 2])
    to_normalized = np.diag([2.0 / width, 2.0 / height])
    linear = to_normalized @ rotation @ box
    shift = to_normalized @ np.array([centre_x, centre_y])
    return np.concatenate([linear, shift[:, None]], axis=1)


def resample(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``image`` (uint8 ``(h, w, c)``) resampled through ``matrix`` (output ->
    input, normalized units), bilinear, zero outside: float32 ``(h, w, c)``."""
    height, width, channels = image.shape
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
    theta = torch.from_numpy(matrix.astype(np.float32))[None]
    grid = F.affine_grid(theta, [1, channels, height, width], align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def photometric(pixels: np.ndarray, rng: np.random.Generator, level: AugmentationLevel) -> np.ndarray:
    """Brightness, contrast and Gaussian noise on float pixels in [0, 255]."""
    brightness = rng.uniform(1 - level.brightness, 1 + level.brightness)
    contrast = rng.uniform(1 - level.contrast, 1 + level.contrast)
    pixels = pixels * brightness
    mean = pixels.mean()
    pixels = (pixels - mean) * contrast + mean
    if level.noise_std > 0:
        pixels = pixels + rng.normal(0.0, level.noise_std * 255.0, size=pixels.shape)
    return pixels


def erase(pixels: np.ndarray, rng: np.random.Generator, level: AugmentationLevel) -> np.ndarray:
    """With probability ``erase_probability``, fill one random rectangle with a
    random grey level (the same value in every channel)."""
    if not rng.uniform() < level.erase_probability:
        return pixels
    height, width = pixels.shape[:2]
    area = rng.uniform(*level.erase_area) * height * width
    aspect = _log_uniform(rng, *level.erase_aspect)
    box_height = int(np.clip(round(math.sqrt(area / aspect)), 1, height))
    box_width = int(np.clip(round(math.sqrt(area * aspect)), 1, width))
    top = int(rng.integers(0, height - box_height + 1))
    left = int(rng.integers(0, width - box_width + 1))
    pixels = pixels.copy()
    pixels[top:top + box_height, left:left + box_width] = rng.uniform(0.0, 255.0)
    return pixels


def augment(image: np.ndarray, level: AugmentationLevel, rng: np.random.Generator) -> np.ndarray:
    """One augmented view of a uint8 ``(h, w, c)`` image, same shape and dtype."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"augment expects a uint8 (h, w, c) image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    pixels = resample(image, geometry_matrix(rng, level, height, width))
    pixels = erase(photometric(pixels, rng, level), rng, level)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def augmented_views(image: np.ndarray, level: str, seed: int, item: int, views: Sequence[int]) -> list[np.ndarray]:
    """Views number ``views`` of ``image`` (store item ``item``) at ``level``;
    each from its own :func:`view_generator`."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
    return [augment(image, LEVELS[level], view_generator(seed, level, item, view)) for view in views]
