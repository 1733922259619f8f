"""Normalisation, the seeded BatchSampler and train_val_split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchcnn.data import BatchSampler, compute_mean_std, normalize, train_val_split

# ----------------------------------------------------------------------------- normalisation


def test_mean_std_match_the_float_formula(rng):
    images = rng.integers(0, 256, size=(37, 1, 5, 6), dtype=np.uint8)
    mean, std = compute_mean_std(images)
    scaled = images.astype(np.float64) / 255
    assert mean == pytest.approx(scaled.mean(), rel=1e-12)
    assert std == pytest.approx(scaled.std(), rel=1e-12)  # population std, like torch's stats
    assert isinstance(mean, float) and isinstance(std, float)


def test_mean_std_of_constant_images():
    assert compute_mean_std(np.full((3, 1, 2, 2), 51, np.uint8)) == pytest.approx((0.2, 0.0))


def test_mean_std_across_histogram_chunks(monkeypatch, rng):
    from scratchcnn.data import preprocessing

    monkeypatch.setattr(preprocessing, "HISTOGRAM_CHUNK", 7)
    images = rng.integers(0, 256, size=(4, 1, 3, 3), dtype=np.uint8)
    scaled = images / 255
    assert compute_mean_std(images) == pytest.approx((scaled.mean(), scaled.std()), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_formula_and_dtype(rng, dtype):
    images = rng.integers(0, 256, size=(6, 1, 4, 4), dtype=np.uint8)
    result = normalize(images, 0.1307, 0.3081, dtype=dtype)
    expected = (images.astype(np.float64) / 255 - 0.1307) / 0.3081
    assert result.dtype == dtype and result.shape == images.shape
    tolerance = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(result, expected, rtol=tolerance, atol=tolerance)


def test_normalize_with_own_stats_gives_zero_mean_unit_std(rng):
    images = rng.integers(0, 256, size=(50, 1, 8, 8), dtype=np.uint8)
    result = normalize(images, *compute_mean_std(images), dtype=np.float64)
    assert abs(result.mean()) < 1e-12 and abs(result.std() - 1) < 1e-12


def test_normalize_rejects_bad_input(rng):
    images = rng.integers(0, 256, size=(2, 1, 3, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        normalize(images.astype(np.float32), 0.1, 0.3)
    with pytest.raises(ValueError, match="positive std"):
        normalize(images, 0.1, 0.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        normalize(images, 0.1, 0.3, dtype=np.float16)
    with pytest.raises(ValueError, match="empty"):
        compute_mean_std(np.zeros((0, 1, 28, 28), np.uint8))


# ------------------------------------------------------------------------------ BatchSampler


@settings(max_examples=80, deadline=None)
@given(num_samples=st.integers(0, 300), batch_size=st.integers(1, 64), shuffle=st.booleans(),
       drop_last=st.booleans(), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 1000))
def test_batches_partition_the_indices(num_samples, batch_size, shuffle, drop_last, seed, epoch):
    sampler = BatchSampler(num_samples, batch_size, shuffle=shuffle, seed=seed,
                           drop_last=drop_last)
    batches = sampler.epoch(epoch)
    assert len(batches) == len(sampler)
    full, rest = divmod(num_samples, batch_size)
    assert len(sampler) == full + (1 if rest and not drop_last else 0)
    assert all(batch.dtype == np.int64 for batch in batches)
    sizes = [len(batch) for batch in batches]
    assert all(size == batch_size for size in sizes[:full])
    if rest and not drop_last:
        assert sizes[-1] == rest
    seen = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    assert len(np.unique(seen)) == len(seen) == sum(sizes)
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(num_samples))
    if not shuffle:
        assert seen.tolist() == list(range(len(seen)))


def test_epoch_is_a_pure_function_of_seed_and_epoch():
    sampler = BatchSampler(1000, 32, seed=5)
    first = sampler.epoch(3)
    sampler.epoch(0), sampler.epoch(7)  # other calls in between change nothing
    again = BatchSampler(1000, 32, seed=5).epoch(3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    order = np.concatenate(first)
    assert not np.array_equal(order, np.concatenate(sampler.epoch(4)))
    assert not np.array_equal(order, np.concatenate(BatchSampler(1000, 32, seed=6).epoch(3)))
    assert not np.array_equal(order, np.arange(1000))


def test_drop_last_drops_only_the_partial_batch():
    sampler = BatchSampler(10, 4, seed=1, drop_last=True)
    batches = sampler.epoch(0)
    assert [len(b) for b in batches] == [4, 4]
    np.testing.assert_array_equal(np.concatenate(batches),
                                  BatchSampler(10, 4, seed=1).order(0)[:8])


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(10, 0)
    with pytest.raises(ValueError, match="num_samples"):
        BatchSampler(-1, 4)
    with pytest.raises(ValueError, match="epoch"):
        BatchSampler(10, 4).epoch(-1)


# --------------------------------------------------------------------------- train_val_split


@settings(max_examples=60, deadline=None)
@given(num_samples=st.integers(2, 500), fraction=st.floats(0.01, 0.9), seed=st.integers(0, 99))
def test_split_is_a_seeded_partition(num_samples, fraction, seed):
    expected_val = round(fraction * num_samples)
    if expected_val == 0:
        with pytest.raises(ValueError, match="empty validation"):
            train_val_split(num_samples, fraction, seed)
        return
    train, val = train_val_split(num_samples, fraction, seed)
    assert len(val) == expected_val and train.dtype == np.int64 and val.dtype == np.int64
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(num_samples))
    again = train_val_split(num_samples, fraction, seed)
    np.testing.assert_array_equal(val, again[1])


def test_split_depends_on_the_seed_and_is_random():
    _, first = train_val_split(1000, 0.1, seed=0)
    _, second = train_val_split(1000, 0.1, seed=1)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(100)) and first.max() > 500


def test_split_edges():
    train, val = train_val_split(10, 0.0)
    assert train.tolist() == list(range(10)) and val.size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        train_val_split(10, 1.0)


def test_pytorch_dataloader_replays_the_same_batches(torch):
    sampler = BatchSampler(50, 8, seed=11)
    values = torch.arange(100, 150)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(values), batch_sampler=sampler.epoch(2)
    )
    for ours, (theirs,) in zip(sampler.epoch(2), loader, strict=True):
        np.testing.assert_array_equal(theirs.numpy(), ours + 100)
