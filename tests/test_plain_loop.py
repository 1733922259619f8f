"""The README's plain loop is the fast path (issue 19): the engine applies by itself what the
training harness used to apply by hand (ReLU->MaxPool2d pool-first, no input gradient for the
first layer, parameters and gradients end to end for the optimizer, no_grad inference in
pieces), with the same bits as those hand-applied rewrites for training, for every model in
models.py (inference: see blas_rounding.py)."""

from __future__ import annotations

import numpy as np
import pytest

from blas_rounding import assert_same_products
from scratchcnn import nn, optim
from scratchcnn.models import MODEL_NAMES, build_model
from scratchcnn.nn import MaxPool2d, ReLU, Sequential
from scratchcnn.nn.fused import fuse_first_for_training
from scratchcnn.nn.module import INFERENCE_PIECE


class _OldHarnessPath:
    """The rewrites the harness used to apply, by hand and independently of Sequential: the
    layers run one by one with each ReLU->MaxPool2d pair swapped, the first layer without an
    input gradient (``needs_input_grad = False``), parameters laid out by
    ``nn.flatten_parameters`` before the optimizer is created; and the one rewrite the engine
    added since, a first Conv2d with its pool and ReLU as one step (its own tests against the
    layers are in test_training_fusion.py)."""

    def __init__(self, model: Sequential) -> None:
        layers = list(model)
        for index in range(len(layers) - 1):
            if type(layers[index]) is ReLU and type(layers[index + 1]) is MaxPool2d:
                layers[index], layers[index + 1] = layers[index + 1], layers[index]
        layers[0].needs_input_grad = False
        self.layers = fuse_first_for_training(layers)
        nn.flatten_parameters(model.parameters())

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, grad: np.ndarray) -> None:
        for layer in reversed(self.layers):
            grad = layer.backward(grad)


def _images_and_labels(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    return gen.standard_normal((count, 1, 28, 28)).astype(np.float32), gen.integers(0, 10, count)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_plain_loop_gives_the_old_harness_paths_bits(name):
    """Three float32 Adam steps of batch 16 (training mode: dropout and batch statistics too),
    then no_grad inference of 150 images in eval mode, which the plain loop runs in pieces."""
    images, labels = _images_and_labels(48 + 150)
    results = []
    for plain in (True, False):
        model = build_model(name, rng=np.random.default_rng(3))
        run = model if plain else _OldHarnessPath(model)
        optimizer = optim.Adam(model.parameters(), lr=1e-3)
        criterion = nn.CrossEntropyLoss()
        losses = []
        for start in range(0, 48, 16):
            optimizer.zero_grad()
            loss = criterion(run.forward(images[start:start + 16]), labels[start:start + 16])
            run.backward(criterion.backward())
            optimizer.step()
            losses.append(loss)
        model.eval()
        with nn.no_grad():
            logits = run.forward(images[48:])
        results.append((losses, model.state_dict(), logits))
    (losses, state, logits), (old_losses, old_state, old_logits) = results
    assert losses == old_losses
    for key, value in state.items():
        np.testing.assert_array_equal(value, old_state[key], err_msg=key)
    # Inference in pieces, through the fused steps: the rows of its products move.
    assert_same_products(logits, old_logits)


def test_optimizer_lays_the_parameters_end_to_end_and_backward_writes_into_them(rng):
    model = build_model("tiny-cnn", rng=np.random.default_rng(0))
    params = list(model.parameters())
    before = model.state_dict()
    optimizer = optim.Adam(model.parameters())
    assert list(model.parameters()) == params  # the same Parameter objects, the same values
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    vector = params[0].data.base
    assert all(p.data.base is vector for p in params)
    images, labels = _images_and_labels(8)
    criterion = nn.CrossEntropyLoss()
    criterion(model(images), labels)
    model.backward(criterion.backward())
    assert all(p.grad is p.grad_buffer for p in params)  # written in place, no gathering copy
    optimizer.step()
    assert optimizer._flat_groups


def test_an_existing_layout_is_kept(rng):
    """Parameters laid out already (by DistributedDataParallel, or flatten_parameters) keep
    their arrays and gradient views: an optimizer never moves them."""
    model = build_model("tiny-cnn", rng=np.random.default_rng(0))
    nn.flatten_parameters(model.parameters())
    arrays = [(p.data, p.grad_buffer) for p in model.parameters()]
    optim.Adam(model.parameters())
    # Two groups (weights, biases) are each not end to end, but already have a gradient vector.
    optim.AdamW([{"params": [p for p in model.parameters() if p.data.ndim > 1]},
                 {"params": [p for p in model.parameters() if p.data.ndim == 1]}])
    assert all(p.data is data and p.grad_buffer is grad
               for p, (data, grad) in zip(model.parameters(), arrays, strict=True))


def test_mixed_dtypes_in_a_group_are_left_in_place_and_stepped_one_by_one(rng):
    params = [nn.Parameter(rng.standard_normal(3)),
              nn.Parameter(rng.standard_normal(2).astype(np.float32))]
    arrays = [p.data for p in params]
    optimizer = optim.Adam(params)
    for p in params:
        p.grad = np.ones_like(p.data)
    optimizer.step()
    assert all(p.data is array for p, array in zip(params, arrays, strict=True))
    assert not optimizer._flat_groups


def test_sequential_skips_the_first_input_gradient_unless_asked(rng):
    first = nn.Linear(3, 4, dtype=np.float64, rng=rng)
    model = Sequential(first, ReLU(), Sequential(nn.Linear(4, 4, dtype=np.float64, rng=rng)),
                       nn.Linear(4, 2, dtype=np.float64, rng=rng))
    x, upstream = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    model(x)
    assert model.backward(upstream) is None
    grads = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    model(x)
    grad_input = model.backward(upstream, input_grad=True)  # the nested one passed its own on
    assert grad_input.shape == x.shape
    for param, grad in zip(model.parameters(), grads, strict=True):
        np.testing.assert_array_equal(param.grad, grad)
    first(x)
    assert first.backward(np.ones((5, 4))).shape == x.shape  # a single layer: by default


def test_a_parameterless_first_layer_runs_no_backward(rng):
    """Its backward would compute only the input gradient nobody asked for."""
    model = Sequential(nn.Flatten(), nn.Linear(12, 2, dtype=np.float64, rng=rng))
    x = rng.standard_normal((2, 3, 4))
    model(x)
    calls = []
    model[0].backward = lambda grad: calls.append(grad)
    model.backward(np.ones((2, 2)))
    assert calls == []
    model(x)
    model.backward(np.ones((2, 2)), input_grad=True)
    assert len(calls) == 1


def test_inference_goes_in_pieces_through_the_layers_that_split_exactly(rng):
    """Under no_grad a large batch goes through the convolutions in pieces; BatchNorm2d (its
    batch statistics) only in eval mode; the Linear layers never (BLAS's bits depend on the
    batch size); with gradients on, everything in one pass, whose caches backward needs."""
    model = build_model("bn-cnn", rng=np.random.default_rng(0))
    x = rng.standard_normal((INFERENCE_PIECE * 2 + 5, 1, 28, 28)).astype(np.float32)
    sizes: dict[str, list[int]] = {"conv": [], "batchnorm": [], "linear": []}
    for key, layer in zip(sizes, (model[0], model[1], model[-1]), strict=True):
        layer.forward = lambda batch, forward=layer.forward, key=key: (
            sizes[key].append(len(batch)), forward(batch))[1]
    pieces = [INFERENCE_PIECE, INFERENCE_PIECE, 5]
    with nn.no_grad():
        model(x)  # training mode: BatchNorm's batch statistics mix samples
        assert sizes == {"conv": pieces, "batchnorm": [len(x)], "linear": [len(x)]}
        model.eval()
        for sizes_of_layer in sizes.values():
            sizes_of_layer.clear()
        model(x)
    assert sizes == {"conv": pieces, "batchnorm": pieces, "linear": [len(x)]}
    for sizes_of_layer in sizes.values():
        sizes_of_layer.clear()
    model(x)
    assert sizes == {"conv": [len(x)], "batchnorm": [len(x)], "linear": [len(x)]}
