"""Normalisation with the training set's statistics: (x / 255 - mean) / std, as
``torchvision.transforms.Normalize`` after ``ToTensor`` does."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# MNIST's training-set statistics on the [0, 1] scale, as torchvision's examples quote them
# (compute_mean_std gives these to four places); the default for MNIST-like inputs.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
HISTOGRAM_CHUNK = 1 << 20


def _require_uint8(images: np.ndarray, where: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"{where}: expected uint8 images with values 0-255 (as load_dataset returns), "
            f"got {images.dtype} of shape {images.shape}"
        )
    return images


def compute_mean_std(images: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of all pixels on the [0, 1] scale.

    Computed exactly from the 256-bin histogram, so it needs no float copy of the images.
    MNIST's training set gives (0.1307, 0.3081) to four places.
    """
    images = _require_uint8(images, "compute_mean_std")
    if images.size == 0:
        raise ValueError("compute_mean_std: no images (the array is empty)")
    pixels = images.reshape(-1)
    # bincount widens to intp, so count in chunks to keep that copy small.
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, pixels.size, HISTOGRAM_CHUNK):
        counts += np.bincount(pixels[start:start + HISTOGRAM_CHUNK], minlength=256)
    counts = counts.astype(np.float64)
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum()
    mean = float(counts @ levels / total)
    variance = float(counts @ (levels - mean) ** 2 / total)
    return mean, float(np.sqrt(variance))


def _statistic(value: float | Sequence[float] | np.ndarray, name: str) -> float:
    """``value`` as one float: a number, or a one-element sequence (torchvision's ``(0.1307,)``
    for single-channel images)."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"normalize: {name} must be a number, got {value!r}") from None
    if array.size != 1 or array.ndim > 1:
        raise ValueError(
            f"normalize: {name} must be one number (the images have one channel), got "
            f"{value!r} ({array.size} values); per-channel statistics are not supported"
        )
    return float(array.reshape(()))


def normalize(images: np.ndarray, mean: float | Sequence[float],
              std: float | Sequence[float], dtype: DTypeLike = np.float32,
              ) -> np.ndarray:
    """``(images / 255 - mean) / std`` as ``dtype`` (float32 or float64), same shape.

    ``mean`` and ``std`` are on the [0, 1] scale, as ``compute_mean_std`` returns them (MNIST:
    0.1307, 0.3081); a one-element sequence, torchvision-style, is accepted for either.
    Every uint8 level is mapped through a 256-entry table computed in float64, so each output is
    the correctly rounded value of the formula and float32 and float64 results agree to rounding.
    """
    images = _require_uint8(images, "normalize")
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"normalize: dtype must be float32 or float64, got {dtype}")
    mean, std = _statistic(mean, "mean"), _statistic(std, "std")
    if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        raise ValueError(f"normalize: need a finite mean and a positive std, got {mean}, {std}")
    # Statistics of 0-255 pixels (mean 33.3, std 78.6) would map every image to about -0.4.
    if not 0.0 <= mean <= 1.0 or std > 1.0:
        raise ValueError(
            f"normalize: mean and std are on the [0, 1] scale of pixel / 255 (mean in [0, 1], "
            f"std in (0, 1]), got mean={mean}, std={std}; divide statistics computed on 0-255 "
            "pixels by 255 (MNIST: mean 0.1307, std 0.3081)"
        )
    table = ((np.arange(256, dtype=np.float64) / 255.0 - mean) / std).astype(dtype)
    return table[images]
