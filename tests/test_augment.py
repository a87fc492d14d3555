"""Seeded augmentations: determinism, the resampling convention against a
brute-force bilinear sampler, each change in isolation, and mild < strong."""
import dataclasses
import math

import numpy as np
import pytest

from mom import augment
from mom.augment import LEVELS, AugmentationLevel, augment as augment_image, augmented_views, view_generator

IDENTITY = AugmentationLevel(
    crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), translate=0.0, rotation_degrees=0.0, flip_probability=0.0,
    brightness=0.0, contrast=0.0, noise_std=0.0, erase_probability=0.0, erase_area=(0.1, 0.1), erase_aspect=(1.0, 1.0),
)


def garment(seed, shape=(28, 28, 1)):
    """A bright blob with texture on a black background, like a Fashion-MNIST item."""
    rng = np.random.default_rng(seed)
    height, width, channels = shape
    image = np.zeros(shape, dtype=np.uint8)
    top, left = rng.integers(1, max(2, min(height, width) // 5) + 1, size=2)
    rows, cols = np.mgrid[0:height - 2 * top, 0:width - 2 * left]
    phase = rng.uniform(0, 2 * np.pi, size=channels)
    shading = 165 + 80 * np.sin(rows[..., None] / 3.0 + cols[..., None] / 5.0 + phase)
    image[top:height - top, left:width - left] = shading.astype(np.uint8)
    return image


def test_same_seed_same_view_other_seed_or_view_differs():
    image = garment(0)
    for level in LEVELS:
        first = augmented_views(image, level, seed=3, item=7, views=[0, 1])
        again = augmented_views(image, level, seed=3, item=7, views=[0, 1])
        other_seed = augmented_views(image, level, seed=4, item=7, views=[0, 1])
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])
        assert not np.array_equal(first[0], first[1])
        assert not np.array_equal(first[0], other_seed[0])
        assert first[0].dtype == np.uint8 and first[0].shape == image.shape


def test_view_generator_depends_only_on_its_arguments():
    a = view_generator(0, "strong", 5, 2).uniform(size=4)
    b = view_generator(0, "strong", 5, 2).uniform(size=4)
    np.testing.assert_array_equal(a, b)
    for other in (view_generator(1, "strong", 5, 2), view_generator(0, "mild", 5, 2),
                  view_generator(0, "strong", 6, 2), view_generator(0, "strong", 5, 3)):
        assert not np.array_equal(a, other.uniform(size=4))


@pytest.mark.parametrize("shape", [(28, 28, 1), (20, 33, 3)])
def test_identity_level_returns_the_image(shape):
    image = garment(1, shape)
    np.testing.assert_array_equal(augment_image(image, IDENTITY, np.random.default_rng(0)), image)


def test_flip_mirrors_columns():
    image = garment(2, (12, 17, 3))
    flipped = augment_image(image, dataclasses.replace(IDENTITY, flip_probability=1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, image[:, ::-1])


def brute_force_resample(image, matrix):
    """grid_sample's bilinear/zeros/align_corners=False, one output pixel at a time."""
    height, width, channels = image.shape
    out = np.zeros(image.shape, dtype=np.float64)
    for row in range(height):
        for col in range(width):
            u = (2 * col + 1) / width - 1
            v = (2 * row + 1) / height - 1
            x_norm, y_norm = matrix @ np.array([u, v, 1.0])
            x = ((x_norm + 1) * width - 1) / 2
            y = ((y_norm + 1) * height - 1) / 2
            x0, y0 = math.floor(x), math.floor(y)
            for dy in (0, 1):
                for dx in (0, 1):
                    weight = (1 - abs(x - (x0 + dx))) * (1 - abs(y - (y0 + dy)))
                    if 0 <= x0 + dx < width and 0 <= y0 + dy < height:
                        out[row, col] += weight * image[y0 + dy, x0 + dx]
    return out


def test_resample_matches_brute_force_bilinear():
    image = garment(3, (7, 9, 3))
    for seed in range(3):
        matrix = augment.geometry_matrix(np.random.default_rng(seed), LEVELS["strong"], 7, 9)
        np.testing.assert_allclose(augment.resample(image, matrix), brute_force_resample(image, matrix), atol=1e-3)


def test_geometry_matrix_scales_by_the_crop_box_and_rotates_in_pixels():
    level = dataclasses.replace(IDENTITY, crop_area=(0.25, 0.25), rotation_degrees=40.0)
    height, width = 10, 30
    for seed in range(5):
        matrix = augment.geometry_matrix(np.random.default_rng(seed), level, height, width)
        in_pixels = np.diag([width / 2, height / 2]) @ matrix[:, :2] @ np.diag([2 / width, 2 / height])
        # Output pixel steps map to input steps of half length (area 1/4, aspect 1), rotated: a scaled rotation.
        np.testing.assert_allclose(in_pixels.T @ in_pixels, 0.25 * np.eye(2), atol=1e-12)
        # The box (half the image side) stays inside the image without translation.
        assert np.all(np.abs(matrix[:, 2]) <= 0.5 + 1e-12)


def test_erase_fills_one_rectangle_with_one_value():
    level = dataclasses.replace(IDENTITY, erase_probability=1.0, erase_area=(0.05, 0.2), erase_aspect=(0.5, 2.0))
    image = np.full((30, 30, 1), 7, dtype=np.uint8)
    for seed in range(10):
        pixels = augment.erase(image.astype(np.float64), np.random.default_rng(seed), level)
        changed = np.argwhere(pixels[:, :, 0] != 7)
        if len(changed) == 0:  # the drawn grey level rounded to 7: astronomically unlikely with float draws
            continue
        (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0)
        box = pixels[top:bottom + 1, left:right + 1]
        assert np.all(box == box[0, 0])
        assert 0.05 * 900 - 30 <= box.size <= 0.2 * 900 + 30  # rounding of the sides


def test_photometric_without_noise_is_brightness_then_contrast_about_the_mean():
    level = dataclasses.replace(IDENTITY, brightness=0.5, contrast=0.5)
    pixels = garment(4).astype(np.float64)
    rng = np.random.default_rng(0)
    brightness, contrast = np.random.default_rng(0).uniform(0.5, 1.5, size=2)
    expected = (pixels * brightness - pixels.mean() * brightness) * contrast + pixels.mean() * brightness
    np.testing.assert_allclose(augment.photometric(pixels, rng, level), expected)


def test_mild_changes_images_less_than_strong():
    def mean_change(level):
        changes = []
        for item in range(40):
            image = garment(100 + item)
            view = augmented_views(image, level, seed=0, item=item, views=[1])[0]
            changes.append(np.abs(view.astype(np.float64) - image).mean())
        return np.mean(changes)

    mild, strong = mean_change("mild"), mean_change("strong")
    assert 0 < mild < 0.6 * strong


def test_rejects_unknown_level_and_bad_images():
    with pytest.raises(ValueError, match="level"):
        augmented_views(garment(0), "medium", 0, 0, [0])
    with pytest.raises(ValueError, match="uint8"):
        augment_image(garment(0).astype(np.float32), LEVELS["mild"], np.random.default_rng(0))
