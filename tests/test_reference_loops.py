"""The loop-based textbook functions against the vectorised layers and against PyTorch: each pair
checks the other, and agreement with torch checks the oracle itself."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck import assert_close
from scratchcnn.nn import AvgPool2d, Conv2d, MaxPool2d
from scratchcnn.nn import reference_loops as ref

CONV_CASES = [
    # (x shape, out_channels, kernel, stride, padding, bias)
    ((2, 3, 6, 5), 4, 3, 1, 1, True),
    ((1, 2, 7, 7), 3, (2, 3), (2, 1), (0, 2), False),
    ((3, 1, 5, 8), 2, 4, 3, 2, True),
    ((2, 2, 4, 4), 2, 1, 1, 0, True),
]

POOL_CASES = [
    # (x shape, kernel, stride, padding)
    ((2, 3, 6, 6), 2, None, 0),
    ((2, 2, 7, 5), 3, 2, 1),
    ((1, 3, 6, 7), (2, 3), 1, (1, 0)),
    ((2, 2, 5, 8), (3, 2), (2, 3), (1, 1)),
]


@pytest.mark.parametrize(("shape", "out_channels", "kernel", "stride", "padding", "bias"),
                         CONV_CASES)
def test_conv_reference_equals_vectorised_layer(rng, shape, out_channels, kernel, stride,
                                                padding, bias):
    layer = Conv2d(shape[1], out_channels, kernel, stride, padding, bias=bias,
                   dtype=np.float64, rng=rng)
    x = rng.standard_normal(shape)
    out = layer(x)
    upstream = rng.standard_normal(out.shape)
    grad_x = layer.backward(upstream)

    bias_data = layer.bias.data if bias else None
    assert_close(ref.conv2d_forward(x, layer.weight.data, bias_data, stride, padding), out,
                 what="forward")
    ref_grad_x, ref_grad_w, ref_grad_b = ref.conv2d_backward(upstream, x, layer.weight.data,
                                                             stride, padding)
    assert_close(ref_grad_x, grad_x, what="grad input")
    assert_close(ref_grad_w, layer.weight.grad, what="grad weight")
    if bias:
        assert_close(ref_grad_b, layer.bias.grad, what="grad bias")


@pytest.mark.parametrize(("shape", "kernel", "stride", "padding"), POOL_CASES)
@pytest.mark.parametrize("values", ["continuous", "tied"])
def test_maxpool_reference_equals_vectorised_layer(rng, shape, kernel, stride, padding, values):
    x = (rng.standard_normal(shape) if values == "continuous"
         else rng.integers(0, 2, size=shape).astype(np.float64))
    layer = MaxPool2d(kernel, stride, padding)
    out = layer(x)
    upstream = rng.integers(1, 9, size=out.shape).astype(np.float64)  # exact sums
    np.testing.assert_array_equal(ref.maxpool2d_forward(x, kernel, stride, padding), out)
    np.testing.assert_array_equal(
        ref.maxpool2d_backward(upstream, x, kernel, stride, padding), layer.backward(upstream))


@pytest.mark.parametrize(("shape", "kernel", "stride", "padding"), POOL_CASES)
def test_avgpool_reference_equals_vectorised_layer(rng, shape, kernel, stride, padding):
    x = rng.standard_normal(shape)
    layer = AvgPool2d(kernel, stride, padding)
    out = layer(x)
    upstream = rng.standard_normal(out.shape)
    assert_close(ref.avgpool2d_forward(x, kernel, stride, padding), out, what="forward")
    assert_close(ref.avgpool2d_backward(upstream, x, kernel, stride, padding),
                 layer.backward(upstream), what="grad input")


def test_reference_conv_matches_torch(torch, rng):
    x = rng.standard_normal((2, 3, 7, 6))
    weight = rng.standard_normal((4, 3, 3, 2))
    bias = rng.standard_normal(4)
    out = ref.conv2d_forward(x, weight, bias, (2, 1), (1, 0))
    upstream = rng.standard_normal(out.shape)
    grad_x, grad_w, grad_b = ref.conv2d_backward(upstream, x, weight, (2, 1), (1, 0))

    x_t, w_t, b_t = (torch.from_numpy(a).requires_grad_(True) for a in (x, weight, bias))
    out_t = torch.nn.functional.conv2d(x_t, w_t, b_t, stride=(2, 1), padding=(1, 0))
    out_t.backward(torch.from_numpy(upstream))
    assert_close(out, out_t.detach().numpy(), what="forward")
    assert_close(grad_x, x_t.grad.numpy(), what="grad input")
    assert_close(grad_w, w_t.grad.numpy(), what="grad weight")
    assert_close(grad_b, b_t.grad.numpy(), what="grad bias")


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_reference_pooling_matches_torch_with_ties(torch, rng, kind):
    x = rng.integers(0, 2, size=(2, 2, 7, 6)).astype(np.float64)
    forward, backward, torch_fn = {
        "max": (ref.maxpool2d_forward, ref.maxpool2d_backward, torch.nn.functional.max_pool2d),
        "avg": (ref.avgpool2d_forward, ref.avgpool2d_backward, torch.nn.functional.avg_pool2d),
    }[kind]
    out = forward(x, 3, 2, 1)
    upstream = rng.integers(1, 9, size=out.shape).astype(np.float64)
    x_t = torch.from_numpy(x).requires_grad_(True)
    out_t = torch_fn(x_t, 3, 2, 1)
    out_t.backward(torch.from_numpy(upstream))
    assert_close(out, out_t.detach().numpy(), what="forward")
    assert_close(backward(upstream, x, 3, 2, 1), x_t.grad.numpy(), what="grad input")
