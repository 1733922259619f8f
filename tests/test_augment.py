"""Data augmentation: exact integer shifts, bilinear affine resampling against torch's
grid_sample, Gaussian smoothing against a direct convolution, purity in (seed, epoch), errors."""

from __future__ import annotations

import numpy as np
import pytest

import scratchcnn
from scratchcnn.data import augment as aug


def _digits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Blobs of ink inside the central 20x20 box, like MNIST digits."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 4:24, 4:24] = rng.integers(0, 256, size=(n, 20, 20))
    images[:, 4:24, 4:24] *= rng.random((n, 20, 20)) < 0.4
    return images


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[i, j] = image[i + dy, j + dx], zero outside."""
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)] = \
        image[max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
    return out


def test_shift_is_an_exact_integer_translation_within_the_limit(rng):
    images = _digits(rng, 64)
    out = aug.augment(images, "shift", np.random.default_rng(0))
    offsets = range(-aug.MAX_SHIFT, aug.MAX_SHIFT + 1)
    used = set()
    for image, result in zip(images, out, strict=True):
        matches = [(dy, dx) for dy in offsets for dx in offsets
                   if np.array_equal(_shifted(image, dy, dx), result)]
        assert matches, "output is not an integer shift of its input"
        used.add(matches[0])
    assert len(used) > 10  # the shifts really vary between images


def test_shift_flip_is_an_exact_shift_of_the_image_or_of_its_mirror(rng):
    images = _digits(rng, 64)
    out = aug.augment(images, "shift-flip", np.random.default_rng(0))
    offsets = range(-aug.MAX_SHIFT, aug.MAX_SHIFT + 1)
    mirrored = 0
    for image, result in zip(images, out, strict=True):
        plain = any(np.array_equal(_shifted(image, dy, dx), result)
                    for dy in offsets for dx in offsets)
        flipped = any(np.array_equal(_shifted(image[:, ::-1], dy, dx), result)
                      for dy in offsets for dx in offsets)
        assert plain or flipped, "output is neither a shift of the image nor of its mirror"
        mirrored += flipped and not plain
    assert 16 < mirrored < 48  # about half the images are mirrored


@pytest.mark.parametrize("kind", ["affine", "elastic"])
def test_output_shape_dtype_range_and_layouts(rng, kind):
    images = _digits(rng, 10)
    flat = aug.augment(images, kind, np.random.default_rng(1))
    channel = aug.augment(images[:, None], kind, np.random.default_rng(1))
    assert flat.dtype == np.uint8 and flat.shape == images.shape
    assert channel.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(channel[:, 0], flat)
    assert not np.array_equal(flat, images)
    # Small transforms of centred digits keep most of the ink (scaling changes the area by
    # at most (1 ± 0.1)², bilinear blur and elastic motion a little more).
    ratio = flat.reshape(10, -1).sum(1) / images.reshape(10, -1).sum(1)
    assert np.all((ratio > 0.7) & (ratio < 1.35)), ratio


def test_affine_resampling_matches_torch_grid_sample(torch, rng):
    """The same per-image inverse maps through torch's affine_grid + grid_sample (bilinear,
    zeros, align_corners=True) give the same pixels up to rounding to uint8."""
    import torch.nn.functional as F

    n = 32
    images = _digits(rng, n)
    angles = rng.uniform(-0.3, 0.3, n)
    scales = rng.uniform(0.85, 1.15, n)
    cos, sin = np.cos(angles) * scales, np.sin(angles) * scales
    matrices = np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1)  # on (y, x)
    shifts = rng.uniform(-3, 3, (n, 2))  # (dy, dx)
    ours = aug._resample(images, matrices.astype(np.float32), shifts.astype(np.float32), None)

    centre = (28 - 1) / 2
    # theta acts on normalised (x, y): swap the axes of the (y, x) matrix.
    theta = np.stack([
        np.stack([matrices[:, 1, 1], matrices[:, 1, 0], shifts[:, 1] / centre], 1),
        np.stack([matrices[:, 0, 1], matrices[:, 0, 0], shifts[:, 0] / centre], 1),
    ], 1)
    grid = F.affine_grid(torch.from_numpy(theta), (n, 1, 28, 28), align_corners=True)
    theirs = F.grid_sample(torch.from_numpy(images[:, None].astype(np.float64)), grid,
                           mode="bilinear", padding_mode="zeros", align_corners=True)
    theirs = theirs[:, 0].numpy()
    difference = np.abs(ours.astype(np.float64) - theirs)
    assert difference.max() <= 0.5 + 1e-3  # ours is the float32 value rounded to uint8


def test_identity_map_returns_the_images_exactly(rng):
    images = _digits(rng, 5)
    eye = np.broadcast_to(np.eye(2, dtype=np.float32), (5, 2, 2))
    out = aug._resample(images, eye, np.zeros((5, 2), np.float32), None)
    np.testing.assert_array_equal(out, images)


def test_gaussian_blur_equals_a_direct_zero_padded_convolution(rng):
    field = rng.standard_normal((3, 28, 28))
    sigma = 2.0
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    expected = np.apply_along_axis(lambda row: np.convolve(row, taps, mode="same"), 1, field)
    expected = np.apply_along_axis(lambda row: np.convolve(row, taps, mode="same"), 2, expected)
    # The matrix form also keeps the (tiny) weights beyond 3 sigma, hence the tolerance.
    np.testing.assert_allclose(aug._gaussian_blur(field, sigma), expected, atol=2e-3)


@pytest.mark.parametrize("kind", ["shift", "shift-flip", "affine", "elastic"])
def test_augment_epoch_is_a_pure_function_of_seed_and_epoch(rng, kind):
    images = _digits(rng, 20)
    first = aug.augment_epoch(images, kind, seed=3, epoch=2)
    np.random.default_rng(99).random(10)  # unrelated draws change nothing
    np.testing.assert_array_equal(aug.augment_epoch(images, kind, seed=3, epoch=2), first)
    assert not np.array_equal(aug.augment_epoch(images, kind, seed=3, epoch=3), first)
    assert not np.array_equal(aug.augment_epoch(images, kind, seed=4, epoch=2), first)


def test_chunking_does_not_change_the_result(rng, monkeypatch):
    images = _digits(rng, 23)
    whole = aug.augment_epoch(images, "elastic", seed=0, epoch=1)
    monkeypatch.setattr(aug, "CHUNK", 5)
    chunked = aug.augment_epoch(images, "elastic", seed=0, epoch=1)
    np.testing.assert_array_equal(chunked, whole)


def test_default_generator_follows_manual_seed(rng):
    images = _digits(rng, 8)
    scratchcnn.manual_seed(7)
    first = aug.augment(images, "affine")
    scratchcnn.manual_seed(7)
    np.testing.assert_array_equal(aug.augment(images, "affine"), first)


def test_none_returns_an_unchanged_copy(rng):
    images = _digits(rng, 4)
    out = aug.augment(images, "none")
    np.testing.assert_array_equal(out, images)
    assert out is not images


def test_bad_input_is_refused_with_a_clear_message(rng):
    with pytest.raises(ValueError, match=r"uint8.*augment before normalize"):
        aug.augment(np.zeros((2, 1, 28, 28), np.float32), "shift")
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aug.augment(np.zeros((2, 3, 28, 28), np.uint8), "shift")
    with pytest.raises(ValueError, match=r"unknown augmentation 'flip'.*none, shift"):
        aug.augment(_digits(rng, 2), "flip")
