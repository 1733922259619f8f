"""Data augmentation for 28x28 images (digits, clothes), vectorised over the whole batch.

Every kind is one inverse mapping per image: output pixel (i, j) reads the source image at
``(y, x) = A_n · ((i, j) - c) + c + t_n (+ a smooth displacement field for "elastic")``, sampled
bilinearly with zeros (black background) outside, and rounded back to uint8. Working on the raw
uint8 images keeps ``normalize`` the single place where pixels become floats, so both frameworks
get identical augmented arrays.

Kinds (``AUGMENTATIONS``):

- ``none``:    the images unchanged.
- ``shift``:   integer translations of up to ``MAX_SHIFT`` pixels in x and y (exact, no blur).
- ``shift-flip``: ``shift``, and a left-right mirror of half the images (exact too). For
  Fashion-MNIST, whose clothes are symmetric; never for digits, which a mirror turns into others.
- ``affine``:  rotation up to ``MAX_ROTATION_DEGREES``, scaling by 1 ± ``MAX_SCALE``, and
  fractional translation up to ``MAX_SHIFT`` pixels.
- ``elastic``: the affine transform plus Simard et al. (2003) elastic distortion: a uniform(-1, 1)
  displacement field per image, Gaussian-smoothed (``ELASTIC_SIGMA``) and scaled by
  ``ELASTIC_ALPHA`` pixels.

``augment_epoch(images, kind, seed, epoch)`` is a pure function of its arguments, so a resumed
run, or the other framework, sees the very same images. NumPy only.
"""

from __future__ import annotations

import numpy as np

from scratchcnn.random import resolve_rng

AUGMENTATIONS = ("none", "shift", "shift-flip", "affine", "elastic")
MAX_SHIFT = 2
MAX_ROTATION_DEGREES = 12.0
MAX_SCALE = 0.1
ELASTIC_ALPHA = 34.0
ELASTIC_SIGMA = 4.0
# Images resampled at once: bounds the temporaries (~15 float32 arrays of chunk x H x W).
CHUNK = 8192
# Mixed into the seed so augmentation draws never coincide with the batch order's.
_STREAM = 0x61756720  # "aug "


def check_augmentation(kind: str) -> str:
    if kind not in AUGMENTATIONS:
        raise ValueError(
            f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}"
        )
    return kind


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (
        images.ndim == 4 and images.shape[1] != 1
    ):
        raise ValueError(
            "augment: expected raw uint8 images of shape (N, H, W) or (N, 1, H, W), got "
            f"{images.dtype} {images.shape}; augment before normalize"
        )
    return images


def augment(
    images: np.ndarray, kind: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """A randomly transformed copy of ``images`` (uint8, (N, H, W) or (N, 1, H, W), same shape
    and dtype out), with every random draw from ``rng`` (default: the package generator)."""
    images = _check_images(images)
    check_augmentation(kind)
    rng = resolve_rng(rng)
    if kind == "none" or len(images) == 0:
        return images.copy()
    flat = images.reshape(len(images), images.shape[-2], images.shape[-1])
    n, height, width = flat.shape
    matrices, shifts = _draw_affine(n, kind, rng)
    out = np.empty_like(flat)
    for start in range(0, n, CHUNK):
        part = slice(start, start + CHUNK)
        displacement = None
        if kind == "elastic":
            # Drawn chunk after chunk in C order: the same stream as one (n, 2, H, W) draw, so
            # the result does not depend on CHUNK.
            size = (len(flat[part]), 2, height, width)
            field = rng.uniform(-1.0, 1.0, size=size).astype(np.float32)
            displacement = ELASTIC_ALPHA * _gaussian_blur(field, ELASTIC_SIGMA)
            displacement = displacement.transpose(1, 0, 2, 3)
        out[part] = _resample(flat[part], matrices[part], shifts[part], displacement)
    return out.reshape(images.shape)


def augment_epoch(images: np.ndarray, kind: str, seed: int, epoch: int) -> np.ndarray:
    """``augment`` with a generator seeded by (seed, epoch): the same arguments always give the
    same images, whatever ran before. ``seed`` and ``epoch`` are non-negative ints."""
    for name, value in (("seed", seed), ("epoch", epoch)):
        # NumPy's seed sequence would only say "expected non-negative integer".
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"augment_epoch: {name} must be a non-negative int, got {value!r}")
    return augment(images, kind, np.random.default_rng([_STREAM, seed, epoch]))


def _draw_affine(n: int, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-image inverse maps: (N, 2, 2) float32 matrices on (y, x) and (N, 2) shifts."""
    if kind in ("shift", "shift-flip"):
        shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(n, 2)).astype(np.float32)
        matrices = np.broadcast_to(np.eye(2, dtype=np.float32), (n, 2, 2))
        if kind == "shift-flip":
            # x -> -x about the centre: pixel j reads j' = W - 1 - j, an integer, so no blur.
            mirrored = rng.random(n) < 0.5
            matrices = matrices.copy()
            matrices[mirrored, 1, 1] = -1.0
        return matrices, shifts
    angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES, size=n))
    scales = rng.uniform(1.0 - MAX_SCALE, 1.0 + MAX_SCALE, size=n)
    shifts = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=(n, 2)).astype(np.float32)
    cos, sin = np.cos(angles) / scales, np.sin(angles) / scales
    # Inverse map (output -> source) of "scale then rotate": rotate back, divide by the scale.
    matrices = np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1)
    return matrices.astype(np.float32), shifts


def _gaussian_blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian smoothing of (..., H, W) with zero padding, as two matrix products
    G_H · field · G_Wᵀ, where G[i, k] = exp(-(i - k)² / 2σ²) / Σ_k exp(-k² / 2σ²)."""
    def matrix(size: int) -> np.ndarray:
        distance = np.arange(size)[:, None] - np.arange(size)[None, :]
        weights = np.exp(-0.5 * (distance / sigma) ** 2)
        radius = int(np.ceil(3 * sigma))
        norm = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
        return (weights / norm).astype(field.dtype)

    return matrix(field.shape[-2]) @ field @ matrix(field.shape[-1]).T


def _resample(
    images: np.ndarray,
    matrices: np.ndarray,
    shifts: np.ndarray,
    displacement: np.ndarray | None,
) -> np.ndarray:
    """Bilinear sampling of each image n at A_n · (p - c) + c + t_n (+ displacement[:, n, p]).

    images (N, H, W) uint8, matrices (N, 2, 2) acting on (y, x), shifts (N, 2) as (dy, dx),
    displacement (2, N, H, W) or None -> (N, H, W) uint8.
    """
    n, height, width = images.shape
    centre = np.array([(height - 1) / 2, (width - 1) / 2], dtype=np.float32)
    grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1)
    offsets = (grid.astype(np.float32) - centre).reshape(-1, 2)            # (P, 2)
    coords = (matrices.reshape(-1, 2) @ offsets.T).reshape(n, 2, -1).transpose(1, 0, 2)
    coords = coords + (centre[None, :] + shifts).T[:, :, None]                # (2, N, P)
    if displacement is not None:
        coords += displacement.reshape(2, n, -1)
    # A one-pixel zero border: every corner of a clipped coordinate lands inside the padded
    # image, and anything outside the original reads the black border.
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1))).reshape(n, -1).astype(np.float32)
    y = np.clip(coords[0], -1.0, height) + 1.0
    x = np.clip(coords[1], -1.0, width) + 1.0
    y0 = np.minimum(y.astype(np.int32), height)  # floor: y >= 0
    x0 = np.minimum(x.astype(np.int32), width)
    wy, wx = y - y0, x - x0
    top_left = y0 * (width + 2) + x0
    top = _gather(padded, top_left) * (1 - wx) + _gather(padded, top_left + 1) * wx
    bottom_left = top_left + (width + 2)
    bottom = _gather(padded, bottom_left) * (1 - wx) + _gather(padded, bottom_left + 1) * wx
    result = top * (1 - wy) + bottom * wy
    return np.clip(np.rint(result), 0, 255).astype(np.uint8).reshape(n, height, width)


def _gather(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    return np.take_along_axis(rows, index, axis=1)
