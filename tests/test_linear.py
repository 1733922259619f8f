"""Linear against torch.nn.Linear, finite differences, dtypes and error messages."""

import numpy as np
import pytest

from gradcheck import assert_close, check_module_gradients
from scratchcnn.nn import Linear, no_grad


def torch_twin(torch, layer: Linear):
    twin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           dtype=torch.float64)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    return twin


@pytest.mark.parametrize("seed", range(8))
def test_matches_torch_forward_and_all_gradients(torch, seed):
    rng = np.random.default_rng(seed)
    n, fan_in, fan_out = (int(v) for v in rng.integers(1, 9, size=3))
    bias = bool(seed % 2)
    lead = () if seed < 5 else (int(rng.integers(1, 4)),)  # (*, in) inputs too
    layer = Linear(fan_in, fan_out, bias=bias, dtype=np.float64, rng=rng)
    twin = torch_twin(torch, layer)
    x = rng.standard_normal((*lead, n, fan_in))
    upstream = rng.standard_normal((*lead, n, fan_out))

    out = layer(x)
    x_t = torch.from_numpy(x).requires_grad_()
    out_t = twin(x_t)
    out_t.backward(torch.from_numpy(upstream))
    grad_x = layer.backward(upstream)

    assert_close(out, out_t.detach().numpy(), what="output")
    assert_close(grad_x, x_t.grad.numpy(), what="input grad")
    assert_close(layer.weight.grad, twin.weight.grad.numpy(), what="weight grad")
    if bias:
        assert_close(layer.bias.grad, twin.bias.grad.numpy(), what="bias grad")
    else:
        assert layer.bias is None and list(layer.state_dict()) == ["weight"]


@pytest.mark.parametrize("bias", [True, False])
def test_finite_differences(rng, bias):
    layer = Linear(4, 3, bias=bias, dtype=np.float64, rng=rng)
    check_module_gradients(layer, rng.standard_normal((5, 4)), rng)


def test_float32_stays_float32(rng):
    layer = Linear(6, 4, rng=rng)
    assert layer.weight.dtype == np.float32 and layer.bias.dtype == np.float32
    x = rng.standard_normal((3, 6)).astype(np.float32)
    out = layer(x)
    grad_x = layer.backward(np.ones_like(out))
    assert out.dtype == grad_x.dtype == np.float32
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == np.float32


def test_accepts_non_contiguous_input(rng):
    layer = Linear(5, 3, dtype=np.float64, rng=rng)
    x = rng.standard_normal((5, 4)).T  # a transposed view, (4, 5)
    upstream = rng.standard_normal((4, 3))
    out = layer(x)
    grad_x = layer.backward(upstream)
    np.testing.assert_allclose(out, np.ascontiguousarray(x) @ layer.weight.data.T + layer.bias.data)
    np.testing.assert_allclose(grad_x, upstream @ layer.weight.data)


def test_gradients_accumulate_and_zero_grad_clears(rng):
    layer = Linear(3, 2, dtype=np.float64, rng=rng)
    x, upstream = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    layer(x)
    layer.backward(upstream)
    first = layer.weight.grad.copy()
    layer(x)
    layer.backward(upstream)
    np.testing.assert_allclose(layer.weight.grad, 2 * first)
    layer.zero_grad()
    assert layer.weight.grad is None and layer.bias.grad is None


def test_default_init_matches_torch_bounds_and_is_seeded():
    layer = Linear(64, 200, rng=np.random.default_rng(3))
    bound = 1 / np.sqrt(64)
    for values in (layer.weight.data, layer.bias.data):
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.95 * bound  # uniform over the whole range, not narrower
    assert abs(layer.weight.data.std() - bound / np.sqrt(3)) < 0.05 * bound
    again = Linear(64, 200, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(layer.weight.data, again.weight.data)
    np.testing.assert_array_equal(layer.bias.data, again.bias.data)


def test_wrong_feature_count_names_layer_and_shapes():
    layer = Linear(1568, 128)
    with pytest.raises(ValueError) as error:
        layer(np.zeros((64, 1600), dtype=np.float32))
    message = str(error.value)
    assert "Linear(in_features=1568, out_features=128, bias=True)" in message
    assert "(N, 1568)" in message and "(64, 1600)" in message


def test_wrong_rank_and_dtype_are_refused():
    layer = Linear(3, 2)
    with pytest.raises(ValueError, match=r"\(N, 3\).*\(3,\)"):
        layer(np.zeros(3, dtype=np.float32))
    with pytest.raises(TypeError, match=r"float64.*float32"):
        layer(np.zeros((2, 3)))  # float64 input, float32 layer: no silent cast


def test_backward_checks_its_cache_and_grad_shape(rng):
    layer = Linear(3, 2, dtype=np.float64)
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(np.zeros((4, 2)))
    with no_grad():
        layer(rng.standard_normal((4, 3)))
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(np.zeros((4, 2)))
    layer(rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*returned shape \(4, 2\)"):
        layer.backward(np.zeros((4, 3)))
