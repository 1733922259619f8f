"""A Sequential's first Conv2d, tiling MaxPool2d and ReLU as one training step (nn/fused.py):
the layers' values and gradients, the pool's ties and dead ReLUs included, for every geometry
that fuses; the input gradient when asked; what does and does not fuse."""

from __future__ import annotations

import numpy as np
import pytest

from blas_rounding import assert_same_products
from scratchcnn import nn
from scratchcnn.nn import functional as F
from scratchcnn.nn.fused import ConvPoolReLU, fuse_first_for_training


def _layers_loss_and_grads(model: nn.Sequential, x: np.ndarray, labels: np.ndarray):
    """Loss, input gradient and parameter gradients with the layers run one by one, in the
    order the Sequential runs them, with no fused step."""
    criterion = nn.CrossEntropyLoss()
    model.zero_grad()
    layers = model.execution_order()
    out = x
    for layer in layers:
        out = layer(out)
    loss = criterion(out, labels)
    grad = criterion.backward()
    for layer in reversed(layers):
        grad = layer.backward(grad)
    return out, loss, grad, [p.grad.copy() for p in model.parameters()]


def _sequential_loss_and_grads(model: nn.Sequential, x: np.ndarray, labels: np.ndarray):
    criterion = nn.CrossEntropyLoss()
    model.zero_grad()
    out = model(x)
    loss = criterion(out, labels)
    grad = model.backward(criterion.backward(), input_grad=True)
    return out, loss, grad, [p.grad.copy() for p in model.parameters()]


def _model(conv: nn.Conv2d, pool: nn.MaxPool2d, features: int, dtype=np.float64,
           relu_first: bool = True) -> nn.Sequential:
    gen = np.random.default_rng(7)
    head = [nn.ReLU(), pool] if relu_first else [pool, nn.ReLU()]
    return nn.Sequential(conv, *head, nn.Flatten(),
                         nn.Linear(features, 3, rng=gen, dtype=dtype)).to(dtype)


GEOMETRIES = {
    # name: (Conv2d arguments, pool window, input (C, H, W))
    "simple-cnn's": ((1, 4, 3, 1, 1), 2, (1, 8, 8)),
    "channels": ((3, 5, 3, 1, 1), 2, (3, 6, 6)),
    "odd size, floor": ((2, 3, 3, 1, 1), 2, (2, 7, 9)),  # the last row and column unpooled
    "3x3 windows": ((2, 3, 3, 1, 1), 3, (2, 9, 9)),
    "strided conv": ((2, 3, 3, 2, 1), 2, (2, 10, 10)),
    "1x1 window": ((1, 2, 3, 1, 0), 1, (1, 5, 5)),
}


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("relu_first", [True, False])
def test_fused_first_step_gives_the_layers_values_and_gradients(geometry, relu_first):
    """float64: outputs, loss and input gradient the same (bit for bit where the BLAS keeps a
    moved row's bits), parameter gradients to 1e-13 (the first convolution's weight gradient
    sums its rows in pool-phase order)."""
    (c, o, k, stride, padding), window, (_, h, w) = GEOMETRIES[geometry]
    gen = np.random.default_rng(3)
    conv = nn.Conv2d(c, o, k, stride=stride, padding=padding, rng=gen, dtype=np.float64)
    conv_h = (h + 2 * padding - k) // stride + 1
    conv_w = (w + 2 * padding - k) // stride + 1
    features = o * (conv_h // window) * (conv_w // window)
    model = _model(conv, nn.MaxPool2d(window), features, relu_first=relu_first)
    x = gen.standard_normal((5, c, h, w))
    labels = gen.integers(0, 3, 5)

    fused = _sequential_loss_and_grads(model, x, labels)
    assert isinstance(model._training_steps[0], ConvPoolReLU)
    layers = _layers_loss_and_grads(model, x, labels)
    assert_same_products(fused[0], layers[0])
    assert_same_products(np.float64(fused[1]), np.float64(layers[1]))
    assert_same_products(fused[2], layers[2])
    for got, expected in zip(fused[3], layers[3], strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-16)


def test_ties_and_dead_relus_go_where_the_layers_send_them():
    """Integer inputs, quarter weights and an integer output gradient: many tied maxima (the
    first in the window wins) and windows whose maximum is <= 0 (the ReLU passes nothing).
    Every product and sum is then exact, so any summation order gives the same bits, and a
    gradient sent to another tied position would show as a difference."""
    gen = np.random.default_rng(11)
    conv = nn.Conv2d(2, 3, 3, padding=1, rng=gen, dtype=np.float64)
    conv.weight.data[...] = np.round(conv.weight.data * 4) / 4
    conv.bias.data[...] = [0.0, -0.5, 0.25]
    pool, relu = nn.MaxPool2d(2), nn.ReLU()
    x = gen.integers(-2, 3, size=(6, 2, 6, 6)).astype(np.float64)
    x[0] = 0.0  # all ties
    grad_out = gen.integers(-3, 4, size=(6, 3, 3, 3)).astype(np.float64)

    step = ConvPoolReLU(conv, pool, relu)
    out = step(x)
    grad_x = step.backward(grad_out)
    fused_grads = [conv.weight.grad.copy(), conv.bias.grad.copy()]
    conv.zero_grad()
    expected_out = relu(pool(conv(x)))
    expected_x = conv.backward(pool.backward(relu.backward(grad_out)))
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_array_equal(grad_x, expected_x)
    np.testing.assert_array_equal(fused_grads[0], conv.weight.grad)
    np.testing.assert_array_equal(fused_grads[1], conv.bias.grad)
    assert np.count_nonzero(grad_x) > 0 and np.any(expected_out == 0)


def test_float32_values_and_gradients_to_rounding(rng):
    from scratchcnn.models import build_model

    model = build_model("simple-cnn", rng=np.random.default_rng(1))
    x = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    fused = _sequential_loss_and_grads(model, x, labels)
    layers = _layers_loss_and_grads(model, x, labels)
    assert_same_products(fused[0], layers[0])
    for got, expected in zip(fused[3], layers[3], strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)


def test_default_backward_skips_the_input_gradient_and_a_layer_may_refuse_it(rng):
    conv = nn.Conv2d(1, 2, 3, padding=1, rng=rng, dtype=np.float64)
    model = _model(conv, nn.MaxPool2d(2), 2 * 3 * 3)
    x = rng.standard_normal((2, 1, 6, 6))
    out = model(x)
    assert model.backward(np.ones_like(out)) is None
    assert conv.weight.grad is not None
    model(x)
    conv.needs_input_grad = False
    assert model.backward(np.ones_like(out), input_grad=True) is None


def test_backward_uses_the_last_forward(rng):
    """Two forwards of different batches, one backward: the gradients are the second's."""
    conv = nn.Conv2d(1, 2, 3, padding=1, rng=rng, dtype=np.float64)
    model = _model(conv, nn.MaxPool2d(2), 2 * 3 * 3)
    first, second = rng.standard_normal((4, 1, 6, 6)), rng.standard_normal((3, 1, 6, 6))
    labels = rng.integers(0, 3, 3)
    model(first)
    got = _sequential_loss_and_grads(model, second, labels)
    expected = _layers_loss_and_grads(model, second, labels)
    for a, b in zip(got[3], expected[3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13)


def test_no_grad_forward_drops_the_training_cache(rng):
    conv = nn.Conv2d(1, 2, 3, padding=1, rng=rng)
    model = _model(conv, nn.MaxPool2d(2), 2 * 3 * 3, dtype=np.float32)
    x = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    out = model(x)
    with nn.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="call forward first"):
        model.backward(np.ones_like(out))
    step = fuse_first_for_training(model.execution_order())[0]
    with pytest.raises(RuntimeError, match="call forward first"):
        step.backward(np.ones((2, 2, 3, 3), np.float32))


def test_a_too_small_input_runs_the_layers_and_their_messages():
    step = ConvPoolReLU(nn.Conv2d(1, 2, 3), nn.MaxPool2d(4), nn.ReLU())
    with pytest.raises(ValueError, match=r"MaxPool2d.*too small"):
        step(np.zeros((1, 1, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"Conv2d.*smaller than the kernel"):
        step(np.zeros((1, 1, 2, 2), np.float32))


def test_an_empty_batch_gives_empty_outputs_and_zero_gradients():
    model = _model(nn.Conv2d(1, 2, 3, padding=1, dtype=np.float64), nn.MaxPool2d(2), 18)
    out = model(np.zeros((0, 1, 6, 6)))
    assert out.shape == (0, 3)
    grad = model.backward(np.zeros((0, 3)), input_grad=True)
    assert grad.shape == (0, 1, 6, 6)
    assert not np.any(model[0].weight.grad)


def _kinds(steps):
    return [type(step).__name__ for step in steps]


def test_what_fuses_for_training():
    conv, pool, relu = nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU()
    assert _kinds(fuse_first_for_training([conv, pool, relu, nn.Flatten()])) == [
        "ConvPoolReLU", "Flatten"]
    assert _kinds(fuse_first_for_training([conv, pool, nn.Flatten()])) == [
        "ConvPoolReLU", "Flatten"]
    # Only the first step, and only with a tiling pool right after the convolution.
    assert _kinds(fuse_first_for_training([relu, conv, pool])) == ["ReLU", "Conv2d", "MaxPool2d"]
    assert _kinds(fuse_first_for_training([conv, relu])) == ["Conv2d", "ReLU"]
    for other in (nn.MaxPool2d(3, stride=2), nn.MaxPool2d(2, padding=1),
                  nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2)):
        assert _kinds(fuse_first_for_training([conv, other])) == [
            "Conv2d", type(other).__name__]
    # One input channel and a 5x5 kernel (LeNet): the phase order does not pay.
    assert _kinds(fuse_first_for_training([nn.Conv2d(1, 2, 5), pool])) == [
        "Conv2d", "MaxPool2d"]
    probed = nn.MaxPool2d(2)
    probed.forward = lambda x: x  # a replaced forward runs as itself
    assert _kinds(fuse_first_for_training([conv, probed])) == ["Conv2d", "MaxPool2d"]


def test_a_probed_layer_still_sees_its_forward_in_training(rng):
    conv = nn.Conv2d(1, 2, 3, padding=1, rng=rng)
    model = _model(conv, nn.MaxPool2d(2), 18, dtype=np.float32)
    seen = []
    original = conv.forward
    conv.forward = lambda x: seen.append(x.shape) or original(x)
    model(rng.standard_normal((2, 1, 6, 6)).astype(np.float32))
    assert seen == [(2, 1, 6, 6)]


def test_unpool_phases_and_back_to_the_layout(rng):
    grad = rng.standard_normal((6, 3))
    winner = np.array([[0, 1, 2], [3, 4, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]],
                      np.uint8)
    rows = F.unpool_phases(grad, winner, 4)
    assert rows.shape == (24, 3)
    blocks = rows.reshape(4, 6, 3)
    for phase in range(4):
        np.testing.assert_array_equal(blocks[phase], np.where(winner == phase, grad, 0.0))
    assert not np.any(blocks[:, winner == 4])  # no winner: no gradient anywhere
    # (PH, PW) = (2, 2) phases of a 1-sample, 2x3 pooled output of a 5x7 convolution.
    natural = F.phase_rows_to_nhwc(rows, 1, (2, 2), (2, 3), (5, 7))
    assert natural.shape == (1, 5, 7, 3)
    for index, (ph, pw) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        np.testing.assert_array_equal(natural[0, ph:4:2, pw:6:2], blocks[index].reshape(2, 3, 3))
    assert not np.any(natural[0, 4]) and not np.any(natural[0, :, 6])


def test_no_winner_where_widens_a_too_small_index_type():
    winner = np.array([3, 255], np.uint8)
    widened = F.no_winner_where(winner, np.array([True, False]), 256)
    assert widened.dtype == np.uint16 and widened.tolist() == [256, 255]
    same = F.no_winner_where(winner, np.array([False, True]), 4)
    assert same is winner and same.tolist() == [3, 4]
