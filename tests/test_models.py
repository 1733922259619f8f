"""scratchcnn.models and its PyTorch twin: same layers, same keys, same weights, same outputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gradcheck import assert_close
from scratchcnn.models import ARCHITECTURES, MODEL_NAMES, build_model


def _images(rng: np.random.Generator, n: int, dtype=np.float64) -> np.ndarray:
    """MNIST-like: mostly zero background with a bright blob, so ReLU/max-pool see ties."""
    images = np.zeros((n, 1, 28, 28))
    images[:, :, 8:20, 10:18] = rng.uniform(0.5, 3.0, size=(n, 1, 12, 8))
    return images.astype(dtype)


def test_model_names_match_the_issue():
    assert set(MODEL_NAMES) == {"simple-cnn", "tiny-cnn", "scratch-notebook-cnn", "lenet5",
                                "bn-cnn"}
    assert tuple(ARCHITECTURES) == MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_model_maps_images_to_ten_logits_in_its_dtype(name, dtype, rng):
    model = build_model(name, dtype=dtype, rng=rng)
    logits = model(_images(rng, 3, dtype))
    assert logits.shape == (3, 10)
    assert logits.dtype == dtype
    assert all(p.dtype == dtype for p in model.parameters())


def test_notebook_architectures_have_the_documented_layers():
    described = {name: [layer for layer, _ in layers] for name, layers in ARCHITECTURES.items()}
    assert described["simple-cnn"] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU",
                                       "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    assert described["tiny-cnn"] == ["Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    assert described["scratch-notebook-cnn"] == ["Conv2d", "ReLU", "Flatten", "Linear", "ReLU",
                                                 "Linear"]
    shapes = {k: v.shape for k, v in build_model("simple-cnn").state_dict().items()}
    assert shapes == {"0.weight": (16, 1, 3, 3), "0.bias": (16,), "3.weight": (32, 16, 3, 3),
                      "3.bias": (32,), "7.weight": (128, 1568), "7.bias": (128,),
                      "9.weight": (10, 128), "9.bias": (10,)}
    assert build_model("scratch-notebook-cnn").state_dict()["3.weight"].shape == (64, 6272)
    assert build_model("tiny-cnn").state_dict()["4.weight"].shape == (10, 1568)
    assert "BatchNorm2d" in described["bn-cnn"] and "Dropout" in described["bn-cnn"]


def test_build_is_deterministic_given_the_generator():
    first = build_model("lenet5", rng=np.random.default_rng(7)).state_dict()
    again = build_model("lenet5", rng=np.random.default_rng(7)).state_dict()
    other = build_model("lenet5", rng=np.random.default_rng(8)).state_dict()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["0.weight"], other["0.weight"])


def test_unknown_model_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model .resnet.*simple-cnn"):
        build_model("resnet")
    with pytest.raises(ValueError, match="float32 or float64"):
        build_model("tiny-cnn", dtype=np.int32)


def test_importing_models_does_not_import_torch():
    code = ("import sys, scratchcnn, scratchcnn.models, scratchcnn.reference, scratchcnn.harness."
            "compare, scratchcnn.cli.compare; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torch_twin_has_identical_weights_and_outputs(name, torch, rng):
    from scratchcnn.reference.torch_models import build_torch_model, torch_twin

    model = build_model(name, dtype=np.float64, rng=rng)
    twin = torch_twin(model, name)
    state = model.state_dict()
    twin_state = twin.state_dict()
    # Same keys in the same order as a torch model built independently.
    assert list(build_torch_model(name).state_dict()) == list(twin_state)
    for key, value in twin_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert value.dtype == torch.float64
        assert np.array_equal(value.numpy(), state[key]), key
    model.eval()
    twin.eval()
    images = _images(rng, 4)
    with torch.no_grad():
        expected = twin(torch.from_numpy(images)).numpy()
    assert_close(model(images), expected, 1e-10, f"{name} eval logits")


def test_twin_in_training_mode_agrees_for_batchnorm(torch, rng):
    """bn-cnn in train mode uses batch statistics; Dropout must be off to compare, so check the
    part before the first Dropout."""
    from scratchcnn.reference.torch_models import torch_twin

    model = build_model("bn-cnn", dtype=np.float64, rng=rng)
    twin = torch_twin(model, "bn-cnn")
    cut = next(i for i, (layer, _) in enumerate(ARCHITECTURES["bn-cnn"]) if layer == "Dropout")
    images = _images(rng, 5) + rng.normal(0, 0.1, size=(5, 1, 28, 28))
    ours = model[:cut](images)
    theirs = twin[:cut](torch.from_numpy(images)).detach().numpy()
    assert_close(ours, theirs, 1e-9, "bn-cnn features in train mode")


def test_twin_weights_are_copies_not_shared(torch, rng):
    from scratchcnn.reference.torch_models import torch_twin

    model = build_model("tiny-cnn", rng=rng)
    twin = torch_twin(model, "tiny-cnn")
    assert twin[0].weight.dtype == torch.float32
    model[0].weight.data += 1.0
    assert not np.array_equal(twin[0].weight.detach().numpy(), model[0].weight.data)


def test_state_dict_round_trip_and_mismatch_error(torch, rng):
    from scratchcnn.reference.torch_models import (
        from_torch_state_dict,
        to_torch_state_dict,
        torch_twin,
    )

    model = build_model("simple-cnn", rng=rng)
    back = from_torch_state_dict(to_torch_state_dict(model.state_dict()))
    state = model.state_dict()
    assert list(back) == list(state)
    assert all(back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="does not match architecture 'lenet5'"):
        torch_twin(build_model("tiny-cnn"), "lenet5")
