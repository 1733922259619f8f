"""nn.init draws from the same distributions as torch.nn.init (bounds, standard deviations)."""

import math

import numpy as np
import pytest

from scratchcnn.nn import Parameter, init

SHAPES = [(64, 32, 3, 3), (128, 1568), (10, 128)]


def _torch_fill(torch, name, shape, **kwargs):
    tensor = torch.empty(shape, dtype=torch.float64)
    # A generator of its own: torch's global one depends on the tests run before, and 1,280
    # samples leave this comparison a few percent of chance to fail on an unlucky draw.
    generator = torch.Generator().manual_seed(0)
    getattr(torch.nn.init, name)(tensor, generator=generator, **kwargs)
    return tensor.numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("kaiming_uniform_", {"a": math.sqrt(5)}),
        ("kaiming_uniform_", {"nonlinearity": "relu"}),
        ("kaiming_uniform_", {"mode": "fan_out", "nonlinearity": "relu"}),
        ("kaiming_normal_", {"nonlinearity": "relu"}),
        ("xavier_uniform_", {}),
        ("xavier_normal_", {"gain": 2.0}),
    ],
)
def test_distribution_matches_torch(torch, shape, name, kwargs, rng):
    ours = getattr(init, name)(np.empty(shape), rng=rng, **kwargs)
    theirs = _torch_fill(torch, name, shape, **kwargs)
    # Same spread (5% covers sampling noise at >= 1,280 samples) ...
    assert ours.std() == pytest.approx(theirs.std(), rel=0.05)
    assert abs(ours.mean()) < 4 * theirs.std() / math.sqrt(ours.size)
    # ... and, for uniform draws, the same support.
    if "uniform" in name:
        bound = np.abs(theirs).max()
        assert np.abs(ours).max() <= bound * 1.02
        assert np.abs(ours).max() >= bound * 0.95


@pytest.mark.parametrize("nonlinearity", ["linear", "relu", "tanh", "leaky_relu", "selu"])
def test_calculate_gain_matches_torch(torch, nonlinearity):
    assert init.calculate_gain(nonlinearity) == pytest.approx(
        torch.nn.init.calculate_gain(nonlinearity)
    )


def test_fan_in_and_fan_out():
    assert init.calculate_fan_in_and_fan_out((16, 8, 3, 5)) == (8 * 15, 16 * 15)
    assert init.calculate_fan_in_and_fan_out((10, 128)) == (128, 10)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.calculate_fan_in_and_fan_out((5,))


def test_fills_parameters_in_place_keeping_dtype_and_is_seeded():
    first = Parameter(np.empty((4, 3), dtype=np.float32))
    second = Parameter(np.empty((4, 3), dtype=np.float32))
    init.xavier_uniform_(first, rng=np.random.default_rng(7))
    init.xavier_uniform_(second, rng=np.random.default_rng(7))
    assert first.data.dtype == np.float32
    np.testing.assert_array_equal(first.data, second.data)
    init.zeros_(first)
    assert not first.data.any()
    init.ones_(first)
    assert (first.data == 1).all()


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="mode"):
        init.kaiming_uniform_(np.empty((3, 3)), mode="fan_avg")
    with pytest.raises(ValueError, match="nonlinearity"):
        init.calculate_gain("swish")
