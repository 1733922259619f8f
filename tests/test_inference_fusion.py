"""Inference under no_grad: F.conv2d_inference (convolution, tiling max pool, bias, ReLU in one
pass) against the textbook loops and the layers one by one, and the Sequential steps that fuse
them (nn/fused.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from blas_rounding import assert_same_products
from scratchcnn import nn
from scratchcnn.models import MODEL_NAMES, build_model
from scratchcnn.nn import functional as F
from scratchcnn.nn import reference_loops as loops
from scratchcnn.nn.fused import ConvPoolReLU, fuse_for_inference


def _layers_one_by_one(conv, pool, relu, x):
    """The plain path: each layer's forward with gradients on (its training-time code)."""
    y = conv(x)
    if pool is not None:
        y = pool(y)
    return relu(y) if relu is not None else y


GEOMETRIES = [  # in, out, kernel, stride, padding, dilation, input H x W, pool window
    (1, 16, 3, 1, 1, 1, (28, 28), (2, 2)),
    (16, 32, 3, 1, 1, 1, (14, 14), (2, 2)),
    (3, 5, (3, 2), (2, 1), (1, 0), 1, (11, 9), (2, 3)),  # odd sizes: the floor drops a remainder
    (2, 4, 3, 1, 2, 2, (7, 8), (3, 3)),
    (1, 6, 5, 1, 2, 1, (13, 13), (1, 1)),
    (4, 3, 1, 1, 0, 1, (5, 6), (5, 6)),  # one window covering the whole output
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_inference_is_the_layers_and_the_loops_in_float64(
        rng, geometry, relu, bias):
    c, o, kernel, stride, padding, dilation, (h, w), window = geometry
    results = {}
    for dtype in (np.float32, np.float64):
        conv = nn.Conv2d(c, o, kernel, stride, padding, dilation, bias=bias, dtype=dtype,
                         rng=np.random.default_rng(1))
        pool = None if window == (1, 1) else nn.MaxPool2d(window)
        x = rng.standard_normal((5, c, h, w)).astype(dtype)
        expected = _layers_one_by_one(conv, pool, nn.ReLU() if relu else None, x)
        with nn.no_grad():
            got = conv.inference_forward(x, window, relu)
        assert got.shape == expected.shape and got.dtype == dtype
        # The same products (rows in another order), the bias after the pool.
        assert_same_products(got, np.ascontiguousarray(expected))
        results[dtype] = (conv, pool, x, got)
    conv, pool, x, got = results[np.float64]
    if dilation == 1:  # the loops have no dilation
        bias_value = None if conv.bias is None else conv.bias.data
        want = loops.conv2d_forward(x, conv.weight.data, bias_value, conv.stride, conv.padding)
        if pool is not None:
            want = loops.maxpool2d_forward(want, window)
        np.testing.assert_allclose(got, np.maximum(want, 0) if relu else want, rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_conv2d_inference_in_pieces_of_samples_gives_the_same_values(rng, monkeypatch, pieces):
    conv = nn.Conv2d(3, 8, 3, padding=1, rng=rng)
    x = rng.standard_normal((10, 3, 12, 12)).astype(np.float32)
    with nn.no_grad():
        whole = conv.inference_forward(x, (2, 2), True)
        row_bytes = 4 * 6 * 6 * 27 * 4  # phases * pooled pixels * taps * itemsize
        monkeypatch.setattr(F, "INFERENCE_COLS_BYTES", pieces * row_bytes)
        assert_same_products(conv.inference_forward(x, (2, 2), True), whole)


def test_conv2d_inference_of_an_empty_batch():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with nn.no_grad():
        out = conv.inference_forward(np.zeros((0, 2, 8, 8), np.float32), (2, 2), True)
    assert out.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("channels", [1, 4])
def test_pooled_im2col_is_im2col_with_its_rows_in_phase_order(rng, channels):
    padded = rng.standard_normal((3, 10, 11, channels))
    kernel, stride, dilation, window = (3, 2), (1, 2), (2, 1), (2, 2)
    out_h, out_w = (F.conv_output_size(10, 3, 1, 0, 0, 2), F.conv_output_size(11, 2, 2, 0, 0))
    pooled = (out_h // 2, out_w // 2)
    plain = F.im2col(padded, kernel, (out_h, out_w), stride, dilation).reshape(
        3, out_h, out_w, -1)
    got = F.pooled_im2col(padded, kernel, stride, dilation, window, pooled)
    rows = plain[:, :pooled[0] * 2, :pooled[1] * 2].reshape(3, pooled[0], 2, pooled[1], 2, -1)
    np.testing.assert_array_equal(got, rows.transpose(2, 4, 0, 1, 3, 5).reshape(len(got), -1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_then_relu_is_the_bias_add_then_relu_bit_for_bit(rng, dtype):
    bias = np.array([0.5, -0.5, 0.0, -0.0, 1e-30, 3.0, np.nan, 2.0], dtype)
    special = np.array([-0.5, 0.5, -0.0, 0.0, -1e-30, -3.0000002, 1.0, np.nan], dtype)
    rows = np.concatenate([np.tile(special, (3, 1)), np.tile(-special, (3, 1)),
                           rng.standard_normal((500, 8)).astype(dtype) * 4,
                           np.full((2, 8), np.inf, dtype), np.full((2, 8), -np.inf, dtype)])
    for with_bias, relu in ((True, True), (True, False), (False, True)):
        expected = rows + bias if with_bias else rows.copy()
        if relu:
            expected = np.maximum(expected, 0)
        got = rows.copy()
        F.bias_then_relu(got, bias if with_bias else None, relu)
        # Bit for bit; a NaN stays a NaN (from a NaN bias, -NaN + NaN may carry another sign).
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(got), nan), (with_bias, relu)
        assert got[~nan].tobytes() == expected[~nan].tobytes(), (with_bias, relu)


@pytest.mark.parametrize("channels", [1, 3])
def test_im2col_into_a_scratch_buffer_is_im2col(rng, channels):
    padded = rng.standard_normal((2, 7, 6, channels)).astype(np.float32)
    args = ((3, 2), (3, 3), (2, 1), (1, 2))
    got = F.im2col(padded, *args, scratch_name="test_cols")
    np.testing.assert_array_equal(got, F.im2col(padded, *args))
    assert np.shares_memory(got, F.scratch("test_cols", (1,), np.float32))


def test_scratch_buffers_are_reused_per_name_and_thread_and_large_ones_are_not_kept():
    first = F.scratch("test", (10, 3), np.float32)
    again = F.scratch("test", (3, 5), np.float64)  # as many bytes
    assert np.shares_memory(first, again) and again.shape == (3, 5)
    assert not np.shares_memory(first, F.scratch("test", (100,), np.float32))  # grown
    assert not np.shares_memory(first, F.scratch("other", (10, 3), np.float32))
    large = (F.MAX_SCRATCH_BYTES // 8 + 1,)
    assert not np.shares_memory(F.scratch("big", large, np.float64),
                                F.scratch("big", large, np.float64))
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(F.scratch("test", (10, 3),
                                                                        np.float32)))
    thread.start()
    thread.join()
    assert not np.shares_memory(first, elsewhere[0])


def _kinds(steps):
    return [type(step).__name__ for step in steps]


def test_what_fuses():
    conv, pool, relu = nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU()
    assert _kinds(fuse_for_inference([conv, pool, relu, nn.Flatten()])) == [
        "ConvPoolReLU", "Flatten"]
    assert _kinds(fuse_for_inference([conv, relu])) == ["ConvPoolReLU"]
    assert _kinds(fuse_for_inference([conv, pool])) == ["ConvPoolReLU"]
    assert _kinds(fuse_for_inference([conv, nn.BatchNorm2d(2), relu])) == [
        "Conv2d", "BatchNorm2d", "ReLU"]
    for overlapping in (nn.MaxPool2d(3, stride=2), nn.MaxPool2d(2, padding=1),
                        nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(2, dilation=2),
                        nn.AvgPool2d(2)):
        assert _kinds(fuse_for_inference([conv, overlapping])) == [
            "Conv2d", type(overlapping).__name__]
    # One input channel and a 5x5 kernel: the pool and the ReLU run as themselves.
    assert _kinds(fuse_for_inference([nn.Conv2d(1, 2, 5), pool, relu])) == [
        "Conv2d", "MaxPool2d", "ReLU"]
    assert _kinds(fuse_for_inference([nn.Conv2d(2, 2, 5), pool, relu])) == ["ConvPoolReLU"]
    probed = nn.ReLU()
    probed.forward = lambda x: x  # a replaced forward runs as itself
    assert _kinds(fuse_for_inference([conv, probed])) == ["Conv2d", "ReLU"]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("batch", [1, 7, 130])
def test_models_under_no_grad_give_the_forward_with_gradients(name, batch):
    model = build_model(name, rng=np.random.default_rng(2)).eval()
    x = np.random.default_rng(batch).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    with nn.no_grad():
        fast = model(x)
    layers = model.execution_order()
    slow = x
    for layer in layers:  # each layer's own forward, gradients on
        slow = layer(slow)
    assert_same_products(fast, slow)


def test_a_fused_step_sees_new_weights_and_clears_the_training_caches(rng):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, dtype=np.float64, rng=rng), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten())
    x = rng.standard_normal((3, 1, 6, 6))
    model(x)  # caches for backward
    model[0].weight.data *= 2
    with nn.no_grad():
        out = model(x)
    expected = loops.maxpool2d_forward(np.maximum(loops.conv2d_forward(
        x, model[0].weight.data, model[0].bias.data, 1, 1), 0), 2).reshape(3, -1)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert model[0]._cols is None and model[1]._output is None and model[2]._argmax is None
    with pytest.raises(RuntimeError, match="call forward first"):
        model.backward(np.ones_like(out))


def test_a_too_small_input_gets_the_pools_own_message():
    step = ConvPoolReLU(nn.Conv2d(1, 2, 3), nn.MaxPool2d(4), nn.ReLU())
    with nn.no_grad(), pytest.raises(ValueError, match=r"MaxPool2d.*too small"):
        step(np.zeros((1, 1, 5, 5), np.float32))
    with nn.no_grad(), pytest.raises(ValueError, match=r"Conv2d.*smaller than the kernel"):
        step(np.zeros((1, 1, 2, 2), np.float32))
