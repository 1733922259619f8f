"""The shared training loop and ``scratchcnn compare`` end to end on tiny data: identical weights
and batches on both sides, float64 loss agreement, dataset fallback rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scratchcnn.cli import main
from scratchcnn.data import BatchSampler
from scratchcnn.harness import compare, training
from scratchcnn.models import build_model


def _data(rng: np.random.Generator, n: int, dtype=np.float64):
    images = np.zeros((n, 1, 28, 28))
    images[:, :, 6:22, 8:20] = rng.uniform(0.0, 2.5, size=(n, 1, 16, 12))
    return images.astype(dtype), rng.integers(0, 10, size=n)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_float64_step_losses_agree_between_frameworks(optimizer, torch, rng):
    from scratchcnn.reference.torch_models import from_torch_state_dict, torch_twin

    images, labels = _data(rng, 96)
    model = build_model("simple-cnn", dtype=np.float64, rng=np.random.default_rng(0))
    twin = torch_twin(model, "simple-cnn")
    options = {"momentum": 0.9} if optimizer == "sgd" else {}
    batches = BatchSampler(len(labels), 16, seed=3).epoch(1)
    losses = {}
    for framework, net in (("numpy", model), ("torch", twin)):
        opt = training.make_optimizer(framework, net.parameters(), optimizer, 1e-2, **options)
        steps: list[float] = []
        mean = training.train_epoch(framework, net, opt, images, labels, batches, epoch=1,
                                    progress=steps.append)
        assert len(steps) == len(batches)
        assert mean == pytest.approx(np.average(steps, weights=[len(b) for b in batches]))
        losses[framework] = np.array(steps)
    relative = np.abs(losses["numpy"] - losses["torch"]) / losses["torch"]
    assert relative.max() < 1e-8, relative
    # Learning happened (losses move), and the weights stay together too.
    assert losses["numpy"][0] != losses["numpy"][-1]
    theirs = from_torch_state_dict(twin.state_dict())
    for key, value in model.state_dict().items():
        assert np.allclose(value, theirs[key], rtol=1e-7, atol=1e-9), key


def test_evaluate_matches_between_frameworks_and_is_fractional(torch, rng):
    from scratchcnn.reference.torch_models import torch_twin

    images, labels = _data(rng, 50)
    model = build_model("tiny-cnn", dtype=np.float64, rng=rng)
    ours = training.evaluate("numpy", model, images, labels, batch_size=16)
    theirs = training.evaluate("torch", torch_twin(model, "tiny-cnn"), images, labels,
                               batch_size=7)
    assert np.array_equal(ours.predictions, theirs.predictions)
    assert ours.loss == pytest.approx(theirs.loss, rel=1e-10)
    assert ours.accuracy == pytest.approx(np.mean(ours.predictions == labels))
    assert 0.0 <= ours.accuracy <= 1.0 and ours.seconds > 0


def test_non_finite_loss_names_epoch_and_step_and_keeps_weights(rng):
    images, labels = _data(rng, 40, np.float32)
    model = build_model("tiny-cnn", rng=rng)
    optimizer = training.make_optimizer("numpy", model.parameters(), "sgd", 0.1)
    batches = [np.arange(0, 20), np.arange(20, 40)]
    poisoned = images.copy()
    poisoned[25] = np.nan  # in the second batch
    with pytest.raises(training.NonFiniteLossError, match="epoch 4, step 2") as caught:
        training.train_epoch("numpy", model, optimizer, poisoned, labels, batches, epoch=4)
    assert caught.value.step == 2
    assert all(np.isfinite(p.data).all() for p in model.parameters())


def test_make_optimizer_and_inputs_are_validated(rng):
    model = build_model("tiny-cnn", rng=rng)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        training.make_optimizer("numpy", model.parameters(), "rmsprop", 1e-3)
    with pytest.raises(ValueError, match="unknown framework 'jax'"):
        training.make_optimizer("jax", model.parameters(), "sgd", 1e-3)
    with pytest.raises(ValueError, match="learning rate must be a positive"):
        training.make_optimizer("numpy", model.parameters(), "adam", -1.0)
    with pytest.raises(ValueError, match="normalised float32/float64"):
        training.evaluate("numpy", model, np.zeros((2, 1, 28, 28), np.uint8), np.zeros(2, int))


@pytest.mark.parametrize("settings, message", [
    ({"lr": float("inf")}, "lr must be a positive number"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"optimizer": "sgd", "optimizer_options": {"momentum": -0.9}}, "momentum must be"),
    ({"optimizer_options": {"weight_decay": float("nan")}}, "weight_decay must be"),
])
def test_compare_config_refuses_bad_optimizer_numbers(settings, message):
    with pytest.raises(ValueError, match=message):
        compare.CompareConfig(dataset="mnist-sample", **settings).validate()


def test_compare_feeds_identical_weights_and_batches_to_both_sides(monkeypatch, torch):
    seen: list[tuple[str, int, list[np.ndarray], dict[str, np.ndarray]]] = []
    original = training.train_epoch

    def spy(framework, model, optimizer, images, labels, batches, *, epoch, progress=None):
        if framework == "numpy":
            state = dict(model.state_dict())
        else:
            state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        seen.append((framework, epoch, [b.copy() for b in batches], state))
        return original(framework, model, optimizer, images, labels, batches, epoch=epoch,
                        progress=progress)

    monkeypatch.setattr(training, "train_epoch", spy)
    config = compare.CompareConfig(dataset="mnist-sample", model="tiny-cnn", epochs=2,
                                   batch_size=32, limit_train=128, limit_test=64,
                                   measure_memory=False, quiet=True, dtype="float64")
    report = compare.run_compare(config)
    # Alternating order, and each epoch's batches are the same list for both frameworks.
    assert [(f, e) for f, e, _, _ in seen] == [("numpy", 1), ("torch", 1), ("numpy", 2),
                                               ("torch", 2)]
    for first, second in ((seen[0], seen[1]), (seen[2], seen[3])):
        assert len(first[2]) == len(second[2]) == 4
        assert all(np.array_equal(a, b) for a, b in zip(first[2], second[2], strict=True))
    assert not np.array_equal(seen[0][2][0], seen[2][2][0])  # reshuffled per epoch
    # Identical weights at the start of training.
    for key, value in seen[0][3].items():
        assert np.array_equal(value, seen[1][3][key]), key
    agreement = report["agreement"]
    assert agreement["initial_weights_max_abs_diff"] == 0.0
    assert agreement["first_epoch_step_loss_max_rel_diff"] < 1e-8
    assert agreement["first_epoch_first_step_loss_rel_diff"] < 1e-8
    assert agreement["first_epoch_steps_within_tolerance"] == agreement["first_epoch_steps"] == 4
    assert agreement["first_epoch_first_step_beyond_tolerance"] is None
    assert all(diff < 1e-8 for diff in agreement["epoch_train_loss_rel_diff"])
    assert len(agreement["epoch_train_loss_rel_diff"]) == 2


def _offline(monkeypatch, tmp_path):
    for variable in ("SCRATCHCNN_DATA", "HOME", "XDG_CACHE_HOME"):
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    monkeypatch.setenv("SCRATCHCNN_MIRRORS", "http://127.0.0.1:9/")


def test_explicit_dataset_never_falls_back(monkeypatch, tmp_path, capsys):
    _offline(monkeypatch, tmp_path)
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()  # exists, so the download is tried (and fails offline)
    status = main(["compare", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"),
                   "--limit-train", "64", "--epochs", "1", "--quiet", "--out", str(out),
                   "--threads", "1"])
    assert status == 2
    error = capsys.readouterr().err
    assert "scratchcnn compare: error:" in error and "train-images" in error
    assert "FALLING BACK" not in error
    assert not (out / "report.json").exists()


def test_no_dataset_offline_falls_back_to_the_sample_loudly(monkeypatch, tmp_path, capsys):
    _offline(monkeypatch, tmp_path)
    out = tmp_path / "out"
    status = main(["compare", "--limit-train", "96", "--limit-test", "48", "--epochs", "1",
                   "--model", "tiny-cnn", "--frameworks", "numpy", "--no-memory", "--no-plots",
                   "--quiet", "--out", str(out), "--threads", "1"])
    assert status == 0
    captured = capsys.readouterr()
    assert "FALLING BACK" in captured.err and "mnist-sample" in captured.err
    assert "WARNING" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["name"] == "mnist-sample"
    assert "mnist-sample" in report["dataset"]["fallback"]
    assert list(report["frameworks"]) == ["numpy"]
    assert "WARNING" in (out / "report.md").read_text()


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--frameworks", "numpy,jax"])
    with pytest.raises(SystemExit):
        main(["compare", "--epochs", "0"])
    assert main(["compare", "--optimizer", "adam", "--momentum", "0.9"]) == 2
    assert "--momentum" in capsys.readouterr().err


def test_augmentation_and_lr_schedule_are_identical_on_both_sides(monkeypatch, torch):
    """Each epoch both frameworks train on the same freshly augmented array (different from
    the plain images and from the previous epoch's) with the same per-epoch learning rate."""
    seen: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
    original = training.train_epoch

    def spy(framework, model, optimizer, images, labels, batches, *, epoch, progress=None):
        seen[framework, epoch] = (images.copy(), optimizer.param_groups[0]["lr"])
        return original(framework, model, optimizer, images, labels, batches, epoch=epoch,
                        progress=progress)

    monkeypatch.setattr(training, "train_epoch", spy)
    config = compare.CompareConfig(
        dataset="mnist-sample", model="tiny-cnn", epochs=3, batch_size=32, limit_train=96,
        limit_test=32, measure_memory=False, quiet=True, dtype="float64", lr=0.01,
        augment="affine", lr_schedule="step", lr_step_size=1, warmup_epochs=1,
    )
    report = compare.run_compare(config)
    for epoch in (1, 2, 3):
        np.testing.assert_array_equal(seen["numpy", epoch][0], seen["torch", epoch][0])
        assert seen["numpy", epoch][1] == seen["torch", epoch][1]
    assert not np.array_equal(seen["numpy", 1][0], seen["numpy", 2][0])
    # Warm-up from lr/2 chained with x0.1 per epoch, as torch's chainable schedulers give.
    lrs = [seen["numpy", epoch][1] for epoch in (1, 2, 3)]
    np.testing.assert_allclose(lrs, [0.005, 0.001, 0.0001], rtol=1e-12)
    assert [e["lr"] for e in report["frameworks"]["torch"]["epochs"]] == lrs
    assert report["config"]["augment"] == "affine" and report["config"]["lr_schedule"] == "step"
    assert report["agreement"]["first_epoch_step_loss_max_rel_diff"] < 1e-8
    accuracies = [report["frameworks"][f]["test_accuracy"] for f in ("numpy", "torch")]
    assert accuracies[0] == accuracies[1]


def test_cli_rejects_bad_recipe_options(capsys):
    assert main(["compare", "--warmup-epochs", "-1", "--no-plots"]) == 2
    assert "warmup_epochs must be at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--augment", "flip"])
