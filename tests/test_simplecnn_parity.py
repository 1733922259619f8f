"""The notebooks' SimpleCNN built with scratchcnn.nn agrees with the same torch.nn.Sequential:
logits, loss, every parameter gradient and several Adam steps, on MNIST-like images whose zero
background makes ties (in ReLU and max-pooling) common."""

import importlib

import numpy as np
import pytest

from gradcheck import assert_close
from scratchcnn import nn


def simple_cnn(dtype, rng, batchnorm=False):
    # Before BatchNorm a conv bias is redundant (its exact gradient is 0, so only rounding noise
    # would be compared): drop it, as is usual.
    bn = [nn.BatchNorm2d(16, dtype=dtype)] if batchnorm else []
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=not batchnorm, dtype=dtype, rng=rng), *bn,
        nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, dtype=dtype, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1568, 128, dtype=dtype, rng=rng), nn.ReLU(),
        nn.Linear(128, 10, dtype=dtype, rng=rng),
    )


def torch_simple_cnn(torch, dtype, batchnorm=False):
    t = torch.nn
    bn = [t.BatchNorm2d(16, dtype=dtype)] if batchnorm else []
    return t.Sequential(
        t.Conv2d(1, 16, 3, padding=1, bias=not batchnorm, dtype=dtype), *bn,
        t.ReLU(), t.MaxPool2d(2),
        t.Conv2d(16, 32, 3, padding=1, dtype=dtype), t.ReLU(), t.MaxPool2d(2),
        t.Flatten(),
        t.Linear(1568, 128, dtype=dtype), t.ReLU(),
        t.Linear(128, 10, dtype=dtype),
    )


def mnist_like(rng, n):
    """Digit-ish images: a few thick random strokes of 8-bit intensities on an exactly zero
    background, normalised like MNIST. The flat background gives many exactly tied values."""
    images = np.zeros((n, 28, 28))
    rows, cols = np.mgrid[0:28, 0:28]
    for _ in range(3):  # strokes: segments between random points, vectorised over the batch
        start = rng.uniform(6, 22, (n, 2, 1, 1))
        end = rng.uniform(6, 22, (n, 2, 1, 1))
        t = np.linspace(0, 1, 12).reshape(1, 12, 1, 1)
        points_r = start[:, 0] + t[:, :, 0] * (end[:, 0] - start[:, 0])  # (n, 12, 1)
        points_c = start[:, 1] + t[:, :, 0] * (end[:, 1] - start[:, 1])
        distance = np.min(
            (rows - points_r[..., None]) ** 2 + (cols - points_c[..., None]) ** 2, axis=1
        )
        images = np.maximum(images, np.clip(2.5 - np.sqrt(distance), 0, 1))
    images = np.round(images * 255) / 255  # 8-bit quantisation, like the real data
    labels = rng.integers(0, 10, n)
    return ((images - 0.1307) / 0.3081)[:, None], labels


def twin_of(torch, model, dtype, batchnorm=False):
    twin = torch_simple_cnn(torch, dtype, batchnorm)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return twin


def step_both(torch, model, twin, images, labels):
    """One forward and backward on each side; returns both losses (gradients are left in
    the parameters)."""
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(model(images), labels)
    model.backward(loss_fn.backward())
    loss_t = torch.nn.CrossEntropyLoss()(twin(torch.from_numpy(images)), torch.from_numpy(labels))
    loss_t.backward()
    return loss, loss_t


def assert_models_agree(model, twin, tol, grads=True, what=""):
    torch_params = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        assert_close(param.data, torch_params[name].detach().numpy(), tol, f"{what} {name}")
        if grads:
            assert_close(param.grad, torch_params[name].grad.numpy(), tol, f"{what} grad {name}")


@pytest.mark.parametrize("batchnorm", [False, True], ids=["simple-cnn", "with-batchnorm"])
def test_float64_logits_loss_and_gradients_match_torch(torch, batchnorm):
    rng = np.random.default_rng(0)
    model = simple_cnn(np.float64, rng, batchnorm)
    twin = twin_of(torch, model, torch.float64, batchnorm)
    images, labels = mnist_like(rng, 32)
    # The data really has the ties this test is about.
    assert np.mean(images == images.min()) > 0.5

    logits = model(images)
    logits_t = twin(torch.from_numpy(images))
    assert_close(logits, logits_t.detach().numpy(), what="logits")
    model.zero_grad()
    loss, loss_t = step_both(torch, model, twin, images, labels)
    assert_close(np.asarray(loss), loss_t.item(), what="loss")
    assert_models_agree(model, twin, 1e-8, what="float64")
    if batchnorm:
        for key, value in twin.state_dict().items():
            assert_close(model.state_dict()[key], value.numpy(), what=key)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["simple-cnn", "with-batchnorm"])
def test_adam_steps_match_torch(torch, batchnorm):
    optim = importlib.import_module("scratchcnn.optim")
    if not hasattr(optim, "Adam"):
        pytest.skip("scratchcnn.optim.Adam is not written yet")
    rng = np.random.default_rng(1)
    model = simple_cnn(np.float64, rng, batchnorm)
    twin = twin_of(torch, model, torch.float64, batchnorm)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    optimizer_t = torch.optim.Adam(twin.parameters(), lr=1e-3)
    for step in range(4):
        images, labels = mnist_like(rng, 16)
        optimizer.zero_grad()
        optimizer_t.zero_grad()
        loss, loss_t = step_both(torch, model, twin, images, labels)
        assert_close(np.asarray(loss), loss_t.item(), what=f"loss at step {step}")
        optimizer.step()
        optimizer_t.step()
        assert_models_agree(model, twin, 1e-8, grads=False, what=f"after step {step}")
    # The weights really moved (Adam moves each by up to lr per step): the steps are not no-ops.
    start = simple_cnn(np.float64, np.random.default_rng(1), batchnorm)
    for p, q in zip(model.parameters(), start.parameters(), strict=True):
        assert np.max(np.abs(p.data - q.data)) > 1e-3


def test_float32_run_stays_float32_and_agrees_with_torch(torch):
    rng = np.random.default_rng(2)
    model = simple_cnn(np.float32, rng)
    twin = twin_of(torch, model, torch.float32)
    images, labels = mnist_like(rng, 32)
    images = images.astype(np.float32)
    logits = model(images)
    assert logits.dtype == np.float32
    assert_close(logits, twin(torch.from_numpy(images)).detach().numpy(), 1e-5, "float32 logits")
    model.zero_grad()
    loss, loss_t = step_both(torch, model, twin, images, labels)
    assert isinstance(loss, np.float32)
    assert_close(np.asarray(loss), loss_t.item(), 1e-5, "float32 loss")
    for param in model.parameters():
        assert param.grad.dtype == np.float32
    assert_models_agree(model, twin, 1e-5, what="float32")
