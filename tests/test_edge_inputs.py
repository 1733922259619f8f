"""Edge inputs, handled as torch handles them or refused clearly: an all-ignored cross-entropy
batch, a float ignore_index and (N, 1) targets, optimizer state left in the old dtype by
model.double(), normalize with 0-255 statistics or torchvision-style tuples, a negative
augmentation seed, empty batches through one-channel convolutions and training BatchNorm."""

import warnings

import numpy as np
import pytest

from scratchcnn import nn, optim
from scratchcnn.data import normalize
from scratchcnn.data.augment import augment_epoch
from scratchcnn.models import build_model

MODELS = ["simple-cnn", "tiny-cnn", "scratch-notebook-cnn", "lenet5", "bn-cnn"]


# -- 1. every target ignored ----------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("target", [[-100, -100, -100], [0, -100, 0]])
def test_cross_entropy_with_nothing_counted_matches_torch(torch, rng, reduction,
                                                          label_smoothing, weighted, target):
    # [0, -100, 0] with class 0 weighted 0 also leaves "mean" a divisor of 0.
    logits = rng.standard_normal((3, 4))
    weight = np.array([0.0, 1.0, 2.0, 3.0]) if weighted else None
    target = np.array(target)
    ours = nn.CrossEntropyLoss(weight, reduction=reduction, label_smoothing=label_smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value" warning from a 0 / 0
        loss = ours(logits, target)
        grad = ours.backward(np.ones(3) if reduction == "none" else 1.0)
    z = torch.tensor(logits, requires_grad=True)
    twin = torch.nn.CrossEntropyLoss(None if weight is None else torch.tensor(weight),
                                     reduction=reduction, label_smoothing=label_smoothing)
    expected = twin(z, torch.tensor(target))
    expected.sum().backward()
    np.testing.assert_allclose(loss, expected.detach().numpy(), rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-12, atol=0, equal_nan=True)


def test_an_adam_step_after_an_all_ignored_batch_keeps_the_weights_finite(rng):
    model = nn.Linear(4, 3)
    optimizer = optim.Adam(model.parameters())
    criterion = nn.CrossEntropyLoss()
    criterion(model(rng.standard_normal((2, 4)).astype(np.float32)), np.array([-100, -100]))
    model.backward(criterion.backward())
    optimizer.step()
    assert all(np.isfinite(p.data).all() for p in model.parameters())




# -- 2. ignore_index and target shape -------------------------------------------------------------

def test_ignore_index_must_be_an_int_and_n_by_1_targets_are_told_to_flatten(torch):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        nn.CrossEntropyLoss(ignore_index=1.5)
    with pytest.raises(TypeError):  # torch refuses it too, when it runs
        torch.nn.CrossEntropyLoss(ignore_index=1.5)(torch.zeros(2, 3), torch.tensor([0, 1]))
    assert nn.CrossEntropyLoss(ignore_index=np.int64(3)).ignore_index == 3
    with pytest.raises(ValueError, match=r"shape \(2, 1\); .*shape \(2,\).*ravel\(\)") as error:
        nn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([[0], [1]]))
    assert "astype" not in str(error.value)
    with pytest.raises(ValueError, match=r"astype\(np.int64\)"):  # still the advice for floats
        nn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0.0, 1.0]))


# -- 3. optimizer state after model.double() ------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda params: optim.Adam(params),
    lambda params: optim.AdamW(params, amsgrad=True),
    lambda params: optim.SGD(params, lr=0.1, momentum=0.9),
])
@pytest.mark.parametrize("flat", [False, True])
def test_a_step_after_the_parameters_changed_dtype_is_refused(torch, rng, make, flat):
    # What torch does for Adam (its SGD keeps a float32 momentum buffer and silently rounds).
    twin = torch.nn.Linear(3, 2).float()
    torch_adam = torch.optim.Adam(twin.parameters())
    twin(torch.ones(1, 3, dtype=torch.float32)).sum().backward()
    torch_adam.step()
    twin.double()
    twin(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError):
        torch_adam.step()

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    if flat:
        nn.flatten_parameters(list(model.parameters()))
    optimizer = make(model.parameters())
    x = rng.standard_normal((5, 3))
    model(x.astype(np.float32))
    model.backward(np.ones((5, 2), np.float32))
    optimizer.step()
    model.double()
    if flat:
        nn.flatten_parameters(list(model.parameters()))
    optimizer.zero_grad()
    model(x)
    model.backward(np.ones((5, 2)))
    before = [p.data.copy() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"changed dtype.*new optimizer"):
        optimizer.step()
    for param, old in zip(model.parameters(), before, strict=True):
        np.testing.assert_array_equal(param.data, old)
    optimizer.load_state_dict(optimizer.state_dict())  # the fix the message offers: casts it
    optimizer.step()
    states = [array for state in optimizer.state.values() for array in state.values()
              if isinstance(array, np.ndarray)]
    assert states and all(array.dtype == np.float64 for array in states)


# -- 4. normalize's statistics --------------------------------------------------------------------

def test_normalize_refuses_0_255_statistics_and_takes_one_element_tuples(rng):
    images = rng.integers(0, 256, size=(3, 1, 5, 5), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\[0, 1\] scale.*by 255.*0\.1307, std 0\.3081"):
        normalize(images, 33.3, 78.6)
    with pytest.raises(ValueError, match="by 255"):
        normalize(images, 0.1307, 78.6)
    expected = normalize(images, 0.1307, 0.3081)
    for mean, std in [((0.1307,), (0.3081,)), ([0.1307], np.array([0.3081]))]:
        np.testing.assert_array_equal(normalize(images, mean, std), expected)
    with pytest.raises(ValueError, match=r"mean must be one number.*3 values"):
        normalize(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="std must be a number"):
        normalize(images, 0.1307, "wide")


# -- 5. augmentation seeds ------------------------------------------------------------------------

def test_augment_epoch_refuses_a_negative_seed_or_epoch(rng):
    images = rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        augment_epoch(images, "shift", -1, 0)
    with pytest.raises(ValueError, match="epoch must be a non-negative int, got -3"):
        augment_epoch(images, "shift", 0, -3)
    np.testing.assert_array_equal(augment_epoch(images, "shift", 2**64 - 1, 0),
                                  augment_epoch(images, "shift", 2**64 - 1, 0))


# -- 6. empty batches -----------------------------------------------------------------------------

def test_one_channel_conv_on_an_empty_batch_matches_torch(torch):
    conv = nn.Conv2d(1, 4, 3, dtype=np.float64)
    out = conv(np.zeros((0, 1, 8, 8)))
    grad_input = conv.backward(np.zeros_like(out))
    twin = torch.nn.Conv2d(1, 4, 3).double()
    x = torch.zeros(0, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    expected = twin(x)
    expected.sum().backward()
    assert out.shape == tuple(expected.shape) == (0, 4, 6, 6)
    assert grad_input.shape == (0, 1, 8, 8)
    np.testing.assert_array_equal(conv.weight.grad, twin.weight.grad.numpy())
    np.testing.assert_array_equal(conv.bias.grad, twin.bias.grad.numpy())


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_training_batchnorm_on_an_empty_batch_matches_torch(torch, momentum, shape):
    layer = nn.BatchNorm2d(3, momentum=momentum, dtype=np.float64)
    twin = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    for stats in (layer, twin):  # running statistics that a mean of nothing would spoil
        stats.load_state_dict({"weight": np.full(3, 2.0), "bias": np.full(3, 0.5),
                               "running_mean": np.full(3, 0.25), "running_var": np.full(3, 3.0),
                               "num_batches_tracked": np.array(4)}
                              if stats is layer else
                              {k: torch.as_tensor(v) for k, v in layer.state_dict().items()})
    out = layer(np.zeros(shape))
    grad_input = layer.backward(np.zeros(shape))
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    expected = twin(x)
    expected.sum().backward()
    assert out.shape == grad_input.shape == tuple(expected.shape) == shape
    for key, value in twin.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[key], value.numpy(), err_msg=key)
    np.testing.assert_array_equal(layer.weight.grad, twin.weight.grad.numpy())
    np.testing.assert_array_equal(layer.bias.grad, twin.bias.grad.numpy())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("training", [False, True])
def test_every_model_accepts_an_empty_batch(rng, name, training):
    model = build_model(name, rng=np.random.default_rng(1))
    model.train(training)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    out = model(x[:0])
    assert out.shape == (0, 10) and out.dtype == np.float32
    model.backward(np.zeros_like(out))
    for param in model.parameters():
        assert param.grad is not None and param.grad.shape == param.data.shape
        assert not param.grad.any()
