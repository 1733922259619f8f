"""Dropout: mask statistics and scaling, backward with the same mask, eval, determinism."""

import numpy as np
import pytest

import scratchcnn
from scratchcnn.nn import Dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mask_fraction_and_scaling(p):
    layer = Dropout(p, rng=np.random.default_rng(1))
    x = np.ones((200, 500))
    out = layer(x)
    dropped = out == 0
    # 100k Bernoulli draws: the dropped fraction is within ~5 standard deviations of p.
    assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / x.size)
    np.testing.assert_allclose(out[~dropped], 1 / (1 - p))
    assert abs(out.mean() - 1) < 0.02  # inverted dropout keeps the expectation


def test_backward_uses_the_forward_mask(rng):
    layer = Dropout(0.4, rng=rng)
    x = rng.standard_normal((6, 7)) + 5  # no zeros in the input
    out = layer(x)
    upstream = rng.standard_normal(x.shape)
    grad = layer.backward(upstream)
    kept = out != 0
    np.testing.assert_allclose(grad[kept], upstream[kept] / 0.6)
    assert np.all(grad[~kept] == 0)
    assert 0 < kept.sum() < kept.size


def test_eval_and_p_zero_are_identity(rng):
    x = rng.standard_normal((4, 5))
    layer = Dropout(0.5, rng=rng).eval()
    assert layer(x) is x
    upstream = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(layer.backward(upstream), upstream)
    np.testing.assert_array_equal(Dropout(0.0)(x), x)


def test_p_one_gives_zeros_and_zero_grads(rng):
    layer = Dropout(1.0, rng=rng)
    out = layer(rng.standard_normal((3, 4)))
    assert np.all(out == 0) and not np.isnan(out).any()
    assert np.all(layer.backward(np.ones((3, 4))) == 0)


def test_same_seed_same_mask_and_default_generator_follows_manual_seed():
    x = np.ones((8, 9), dtype=np.float32)
    first = Dropout(rng=np.random.default_rng(7))(x)
    second = Dropout(rng=np.random.default_rng(7))(x)
    np.testing.assert_array_equal(first, second)
    layer = Dropout()
    scratchcnn.manual_seed(11)
    a = layer(x)
    b = layer(x)
    scratchcnn.manual_seed(11)
    np.testing.assert_array_equal(layer(x), a)
    assert not np.array_equal(a, b)  # successive calls draw fresh masks


def test_float32_channels_last_and_inplace(rng):
    x = np.ascontiguousarray(
        rng.standard_normal((2, 4, 3, 3)).astype(np.float32).transpose(0, 2, 3, 1)
    ).transpose(0, 3, 1, 2)
    layer = Dropout(0.5, rng=np.random.default_rng(2))
    out = layer(x)
    assert out.dtype == np.float32
    assert layer.backward(np.ones_like(out)).dtype == np.float32
    # The mask is drawn in logical order, so memory layout does not change it.
    same = Dropout(0.5, rng=np.random.default_rng(2))(np.ascontiguousarray(x))
    np.testing.assert_array_equal(out, same)
    inplace = Dropout(0.5, inplace=True, rng=np.random.default_rng(2))
    y = np.ascontiguousarray(x)
    assert inplace(y) is y
    np.testing.assert_array_equal(y, same)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_invalid_probability(p):
    with pytest.raises(ValueError, match=f"between 0 and 1, but got {p}"):
        Dropout(p)


def test_backward_needs_forward():
    with pytest.raises(RuntimeError, match="call forward first"):
        Dropout().backward(np.zeros(3))


def test_p_zero_draws_no_random_numbers():
    x = np.ones((6, 7))
    gen = np.random.default_rng(3)
    Dropout(0.0, rng=gen)(x)
    after_p_zero = Dropout(0.5, rng=gen)(x)
    alone = Dropout(0.5, rng=np.random.default_rng(3))(x)
    np.testing.assert_array_equal(after_p_zero, alone)
