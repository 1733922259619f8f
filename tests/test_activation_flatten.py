"""ReLU and Flatten against PyTorch, finite differences, memory layout and dtypes."""

import numpy as np
import pytest

from gradcheck import assert_close, check_module_gradients
from scratchcnn.nn import Flatten, ReLU, no_grad


def channels_last(x: np.ndarray) -> np.ndarray:
    """The same NCHW values stored channels-last (what conv and pooling layers return)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("seed", range(4))
def test_relu_matches_torch_including_zeros(torch, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 6, size=4))
    # Integer values make exact zeros common: the gradient there must be 0, as in torch.
    x = rng.integers(-2, 3, size=shape).astype(np.float64)
    upstream = rng.standard_normal(shape)
    layer = ReLU()
    out = layer(x)
    grad_x = layer.backward(upstream)
    x_t = torch.from_numpy(x).requires_grad_()
    out_t = torch.nn.ReLU()(x_t)
    out_t.backward(torch.from_numpy(upstream))
    assert_close(out, out_t.detach().numpy(), what="relu output")
    assert_close(grad_x, x_t.grad.numpy(), what="relu grad")
    assert np.all(grad_x[x == 0] == 0)


def test_relu_finite_differences(rng):
    x = rng.standard_normal((2, 3, 4))
    x[np.abs(x) < 0.1] += 0.3  # keep away from the kink at 0
    check_module_gradients(ReLU(), x, rng)


def test_relu_keeps_channels_last_layout_and_float32(rng):
    x = channels_last(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    layer = ReLU()
    out = layer(x)
    assert out.dtype == np.float32
    assert out.transpose(0, 2, 3, 1).flags.c_contiguous  # still channels-last, nothing copied
    grad = layer.backward(channels_last(np.ones((2, 3, 4, 5), dtype=np.float32)))
    assert grad.dtype == np.float32
    np.testing.assert_array_equal(grad, (x > 0).astype(np.float32))


def test_relu_inplace_writes_into_its_input(rng):
    x = rng.standard_normal((3, 4))
    expected = np.maximum(x, 0)
    out = ReLU(inplace=True)(x)
    assert out is x
    np.testing.assert_array_equal(x, expected)
    assert repr(ReLU(inplace=True)) == "ReLU(inplace=True)" and repr(ReLU()) == "ReLU()"


@pytest.mark.parametrize(
    ("shape", "start_dim", "end_dim"),
    [((2, 3, 4, 5), 1, -1), ((2, 3, 4, 5), 0, -1), ((2, 3, 4, 5), 1, 2), ((2, 3, 4, 5), -3, -2),
     ((3, 7), 1, -1)],
)
def test_flatten_matches_torch(torch, rng, shape, start_dim, end_dim):
    x = rng.standard_normal(shape)
    layer = Flatten(start_dim, end_dim)
    out = layer(x)
    expected = torch.nn.Flatten(start_dim, end_dim)(torch.from_numpy(x)).numpy()
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)
    upstream = rng.standard_normal(out.shape)
    np.testing.assert_array_equal(layer.backward(upstream), upstream.reshape(shape))


def test_flatten_of_channels_last_memory_uses_logical_order(torch, rng):
    x = rng.standard_normal((2, 3, 4, 4))
    layer = Flatten()
    out = layer(channels_last(x))
    np.testing.assert_array_equal(out, torch.flatten(torch.from_numpy(x), 1).numpy())
    upstream = rng.standard_normal(out.shape)
    grad = layer.backward(upstream)
    np.testing.assert_array_equal(grad[1, 2, 3, 0], upstream[1, 2 * 16 + 3 * 4 + 0])


def test_flatten_finite_differences(rng):
    check_module_gradients(Flatten(), rng.standard_normal((2, 2, 3, 2)), rng)


def test_flatten_bad_dims_and_backward_without_forward():
    with pytest.raises(ValueError, match=r"Flatten\(start_dim=2, end_dim=-1\).*\(4, 5\)"):
        Flatten(2)(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="start_dim <= end_dim"):
        Flatten(2, 1)(np.zeros((2, 3, 4)))
    layer = Flatten()
    with no_grad():
        layer(np.zeros((2, 3)))
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(np.zeros((2, 3)))
    layer(np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match=r"shape \(2, 5\).*returned shape \(2, 6\)"):
        layer.backward(np.zeros((2, 5)))


@pytest.mark.parametrize("grad_layout", ["nchw", "channels_last_crop"])
def test_relu_backward_takes_any_gradient_layout_and_returns_the_outputs(rng, grad_layout):
    """An NCHW gradient (from Flatten) for a channels-last output takes a transposing copy
    first; a channels-last crop of a larger buffer (from a conv's padded gradient) does not.
    Either way: exactly grad * (out > 0), laid out like the output."""
    x = rng.standard_normal((2, 5, 6, 3)).transpose(0, 3, 1, 2)  # channels-last memory
    x[0, 0, :2] = 0.0
    relu = ReLU()
    out = relu(x)
    values = rng.standard_normal(out.shape)
    if grad_layout == "nchw":
        grad = np.ascontiguousarray(values)
    else:
        buffer = np.zeros((2, 7, 8, 3))
        buffer[:, 1:6, 1:7] = values.transpose(0, 2, 3, 1)
        grad = buffer[:, 1:6, 1:7].transpose(0, 3, 1, 2)
    grad_input = relu.backward(grad)
    np.testing.assert_array_equal(grad_input, values * (out > 0))
    assert grad_input.strides == out.strides


def test_relu_no_grad_keeps_no_cache(rng):
    layer = ReLU()
    with no_grad():
        layer(rng.standard_normal((2, 3)))
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(np.zeros((2, 3)))
