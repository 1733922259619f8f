"""The API's argument checks and torch-like semantics: misuse that used to give silently wrong
results or NumPy's errors from deep inside is refused, or handled as torch handles it."""

from collections import OrderedDict

import numpy as np
import pytest

import scratchcnn
from scratchcnn import models, nn
from scratchcnn.reference.torch_models import build_torch_model


@pytest.fixture
def grad_mode():
    """Restores the grad mode, so a failing plain-call test cannot leave it off for the rest."""
    yield
    nn.set_grad_enabled(True)


def _mlp(rng: np.random.Generator) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4, dtype=np.float64, rng=rng), nn.ReLU(),
                         nn.Linear(4, 2, dtype=np.float64, rng=rng))


def test_a_module_used_twice_is_refused():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"appears twice \(as '0' and '2'\).*own instance.*cache"):
        nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match=r"appears twice \(as '0.0' and '1'\)"):
        nn.Sequential(nn.Sequential(lin), lin)  # nested Sequentials count too
    model = nn.Sequential(lin, nn.ReLU())
    with pytest.raises(ValueError, match="appears twice"):
        model.append(lin)
    with pytest.raises(ValueError, match="appears twice"):
        model.append(model)
    assert len(model) == 2
    model.append(nn.Linear(4, 4))  # a fresh instance is fine
    setattr(model, "1", nn.ReLU())  # replacing a child by a new one is fine
    assert len(model) == 3


def test_second_backward_for_one_forward_is_refused(torch, rng):
    model = _mlp(rng)
    x, grad = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    twin.double().load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    out = twin(torch.from_numpy(x))
    out.backward(torch.from_numpy(grad))
    with pytest.raises(RuntimeError, match="second time"):
        out.backward(torch.from_numpy(grad))
    model(x)
    model.backward(grad)
    first = [p.grad.copy() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"backward already ran.*forward again"):
        model.backward(grad)
    for param, kept in zip(model.parameters(), first, strict=True):
        np.testing.assert_array_equal(param.grad, kept)  # the refused call added nothing
    # Forward + backward per batch still accumulates, as in torch.
    model(x)
    model.backward(grad)
    out = twin(torch.from_numpy(x))
    out.backward(torch.from_numpy(grad))
    for param, twin_param in zip(model.parameters(), twin.parameters(), strict=True):
        np.testing.assert_allclose(param.grad, twin_param.grad.numpy(), rtol=1e-12)
    # A grad_output refused before any gradient was added leaves the backward available.
    model(x)
    with pytest.raises(ValueError, match="grad_output has shape"):
        model.backward(grad[:, :1])
    model.backward(grad)


def test_manual_seed_makes_a_built_models_dropout_repeatable():
    model = models.build_model("bn-cnn")
    x = np.ones((2, 1, 28, 28), np.float32)
    scratchcnn.manual_seed(3)
    first = model(x)
    scratchcnn.manual_seed(3)
    np.testing.assert_array_equal(model(x), first)
    # An explicit generator still drives the masks, as before.
    generator = np.random.default_rng(5)
    seeded = models.build_model("bn-cnn", rng=generator)
    assert all(layer.rng is generator for layer in seeded if isinstance(layer, nn.Dropout))


def test_slicing_keeps_the_childrens_names_as_torch(torch):
    sliced = models.build_model("tiny-cnn", dtype=np.float64)[3:]
    twin = build_torch_model("tiny-cnn", dtype=np.float64)[3:]
    assert list(sliced.state_dict()) == list(twin.state_dict()) == ["4.weight", "4.bias"]
    named = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3), relu=nn.ReLU(), flat=nn.Flatten()))
    assert [name for name, _ in named[1:].named_children()] == ["relu", "flat"]
    with pytest.raises(ValueError, match="'3' is already taken"):
        models.build_model("tiny-cnn")[1:4].append(nn.ReLU())


def test_append_refuses_a_non_module(torch):
    with pytest.raises(TypeError, match="int is not a Module subclass"):
        torch.nn.Sequential().append(3)
    model = nn.Sequential()
    with pytest.raises(TypeError, match="int is not a Module subclass"):
        model.append(3)
    assert len(model) == 0 and "0" not in vars(model)


def test_sizes_must_be_ints_and_linear_takes_zero_inputs(torch):
    for bad in (4.7, "4", True):
        with pytest.raises(ValueError, match="Linear: in_features must be a non-negative int"):
            nn.Linear(bad, 3)
    with pytest.raises(ValueError, match="BatchNorm2d: num_features must be a positive int"):
        nn.BatchNorm2d(2.5)
    assert nn.Linear(np.int64(4), 3).in_features == 4
    layer = nn.Linear(0, 3, dtype=np.float64)
    with pytest.warns(UserWarning, match="zero-element"):
        twin = torch.nn.Linear(0, 3).double()
    x = np.empty((2, 0))
    out = layer(x)
    np.testing.assert_array_equal(out, twin(torch.from_numpy(x)).detach().numpy())
    assert layer.backward(np.ones_like(out)).shape == (2, 0)
    np.testing.assert_array_equal(layer.bias.grad, [2.0, 2.0, 2.0])


def test_set_grad_enabled_as_a_plain_call(torch, grad_mode):
    torch.set_grad_enabled(False)
    assert not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    nn.set_grad_enabled(False)
    assert not nn.is_grad_enabled()
    nn.set_grad_enabled(True)
    assert nn.is_grad_enabled()
    with nn.set_grad_enabled(False):
        assert not nn.is_grad_enabled()
    assert nn.is_grad_enabled()

    @nn.set_grad_enabled(False)
    def inside() -> bool:
        return nn.is_grad_enabled()

    assert nn.is_grad_enabled() and not inside() and nn.is_grad_enabled()


def test_int_rng_is_a_seed_and_other_rngs_are_refused_at_construction():
    np.testing.assert_array_equal(nn.Linear(3, 3, rng=42).weight.data,
                                  nn.Linear(3, 3, rng=np.random.default_rng(42)).weight.data)
    by_seed = models.build_model("tiny-cnn", rng=0).state_dict()
    by_generator = models.build_model("tiny-cnn", rng=np.random.default_rng(0)).state_dict()
    for key, value in by_seed.items():
        np.testing.assert_array_equal(value, by_generator[key])
    x = np.ones((4, 6))
    np.testing.assert_array_equal(nn.Dropout(rng=42)(x), nn.Dropout(rng=42)(x))
    for make in (lambda: nn.Dropout(rng="seed"), lambda: nn.Linear(3, 3, rng=1.5),
                 lambda: models.build_model("tiny-cnn", rng=object())):
        with pytest.raises(TypeError, match=r"rng must be a numpy\.random\.Generator, an int seed"):
            make()


def test_manual_seed_refuses_negative_and_non_integer_seeds():
    with pytest.raises(ValueError, match="manual_seed: the seed must be a non-negative int"):
        scratchcnn.manual_seed(-1)
    with pytest.raises(TypeError, match="manual_seed: the seed must be an int"):
        scratchcnn.manual_seed(1.5)
    scratchcnn.manual_seed(np.uint8(3))


def test_to_takes_devices_torch_dtypes_and_none(torch, rng):
    model = _mlp(rng)
    before = model.state_dict()
    assert model.to("cpu") is model and model.to(device="cpu") is model
    assert model.to(torch.device("cpu")) is model
    assert model.to(None) is model and model.to() is model
    assert all(p.dtype == np.float64 for p in model.parameters())  # not cast to float32
    with pytest.raises(ValueError, match="device 'cuda:0' is not available"):
        model.to("cuda:0")
    model.to(torch.float32)
    assert all(p.dtype == np.float32 for p in model.parameters())
    model.to("cpu", torch.float64)
    assert all(p.dtype == np.float64 for p in model.parameters())
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key].astype(np.float32))
    with pytest.raises(ValueError, match="float32 or float64, got 'bfloat16'"):
        model.to(torch.bfloat16)


def test_load_state_dict_refuses_non_arrays_clearly(torch, rng):
    model = _mlp(rng)
    with pytest.raises(TypeError, match="Expected state_dict to be dict-like, got list"):
        model.load_state_dict([1, 2])
    state = model.state_dict()
    for bad, message in ((None, "must be an array of numbers, got a NoneType"),
                         ("abc", "must be an array of numbers, got a str"),
                         ([[1.0, 2.0, 3.0], [4.0]], "'0.weight' is a list that is not an array")):
        with pytest.raises(ValueError, match=message):
            model.load_state_dict({**state, "0.weight": bad})
    with pytest.raises(TypeError, match="dict-like"):
        torch.nn.Linear(2, 2).load_state_dict([1, 2])


def test_train_mode_must_be_boolean(torch, rng):
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        torch.nn.Linear(2, 2).train("False")
    model = _mlp(rng)
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        model.train("False")
    assert model.train(False) is model and not model.training
    assert model.train(np.bool_(True)).training
