"""Deterministic batching and splitting: the same seed gives the same index order on the NumPy
and the PyTorch side, so both models see identical batches."""

from __future__ import annotations

import numpy as np


def _check_count(value: int, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


class BatchSampler:
    """Splits ``range(num_samples)`` into batches of ``batch_size`` indices, each epoch.

    With ``shuffle`` the order is a fresh permutation every epoch, drawn from a generator seeded
    by ``(seed, epoch)``: ``epoch(e)`` is a pure function, so any epoch can be replayed or handed
    to another framework. The last, smaller batch is kept unless ``drop_last``.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        self.num_samples = _check_count(num_samples, "BatchSampler: num_samples", 0)
        self.batch_size = _check_count(batch_size, "BatchSampler: batch_size", 1)
        self.seed = _check_count(seed, "BatchSampler: seed", 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """All indices in the order epoch ``epoch`` visits them (int64)."""
        epoch = _check_count(epoch, "BatchSampler: epoch", 0)
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_samples).astype(np.int64, copy=False)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The batches of epoch ``epoch``: int64 index arrays, together a permutation of
        ``range(num_samples)`` (minus the last partial batch when ``drop_last``)."""
        order = self.order(epoch)
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        return [order[start:start + self.batch_size] for start in starts]

    def __repr__(self) -> str:
        return (f"BatchSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last})")


def train_val_split(num_samples: int, val_fraction: float, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 indices (train, validation): ``round(val_fraction * num_samples)`` samples
    chosen at random (seeded) for validation, the rest for training."""
    num_samples = _check_count(num_samples, "train_val_split: num_samples", 0)
    seed = _check_count(seed, "train_val_split: seed", 0)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction must be in [0, 1), got {val_fraction}")
    num_val = round(val_fraction * num_samples)
    if val_fraction > 0 and num_val == 0:
        raise ValueError(
            f"train_val_split: val_fraction {val_fraction} of {num_samples} samples leaves an "
            "empty validation set; use a larger fraction or more samples"
        )
    permutation = np.random.default_rng(seed).permutation(num_samples).astype(np.int64)
    return np.sort(permutation[num_val:]), np.sort(permutation[:num_val])
