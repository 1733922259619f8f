"""The harness behind ``scratchcnn train``: a TrainingRun restored from its checkpoint holds the
same state and trains on identically; a diverging epoch writes nothing; helpers."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from scratchcnn.formats.checkpoint import CheckpointError, save_checkpoint
from scratchcnn.harness.report import finite_or_none
from scratchcnn.harness.training import NonFiniteLossError
from scratchcnn.harness.training_run import (
    TrainingRun,
    load_resumable,
    optimizer_options,
)
from scratchcnn.models import build_model


def make_config(**overrides: Any) -> dict[str, Any]:
    return {
        "model": "tiny-cnn", "dataset": "mnist-sample", "batch_size": 40, "optimizer": "sgd",
        "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "seed": 3, "limit_train": 80,
        "limit_test": 40, "dtype": "float64", "framework": "numpy", "augment": "none",
        "lr_schedule": "cosine", "warmup_epochs": 1, "lr_step_size": None, "schedule_epochs": 3,
        **overrides,
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal nested state: dicts, lists, arrays or tensors (compared bit for bit), scalars."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    elif hasattr(a, "shape"):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
        assert np.asarray(a).dtype == np.asarray(b).dtype, where
    else:
        assert a == b, where


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # SGD with momentum, warm-up + cosine
        {"framework": "torch", "optimizer": "adamw", "lr": 0.002, "momentum": 0.0,
         "lr_schedule": "step", "lr_step_size": 1, "augment": "shift"},
    ],
)
def test_run_restored_from_its_checkpoint_has_identical_state_and_continues_identically(
    tmp_path, overrides, request
):
    config = make_config(**overrides)
    if config["framework"] == "torch":
        request.getfixturevalue("torch")
    straight = TrainingRun(config, tmp_path / "straight")
    first = straight.run_epoch()
    assert first.epoch == 1 and straight.completed_epochs == 1
    assert straight.last_saved == tmp_path / "straight" / "last.npz"

    resumed = TrainingRun(config, tmp_path / "resumed",
                          checkpoint=load_resumable(straight.last_saved))
    assert resumed.completed_epochs == 1 and resumed.last_saved == straight.last_saved
    assert (resumed.mean, resumed.std) == (straight.mean, straight.std)
    assert resumed.history == straight.history
    assert resumed.best_accuracy == straight.best_accuracy
    assert_same(resumed.state.model_state(), straight.state.model_state(), "model")
    assert_same(resumed.state.optimizer.state_dict(), straight.state.optimizer.state_dict(),
                "optimizer")
    assert_same([s.state_dict() for s in resumed.state.schedulers],
                [s.state_dict() for s in straight.state.schedulers], "schedulers")
    assert_same(resumed.state.random_state(), straight.state.random_state(), "rng")

    # Two more epochs each: same losses, same learning rates, bit-identical weights.
    results = [list(run.train(3)) for run in (straight, resumed)]
    assert [r.epoch for r in results[0]] == [2, 3] == [r.epoch for r in results[1]]
    for a, b in zip(*results, strict=True):
        assert (a.train_loss, a.test_loss, a.test_accuracy, a.lr, a.improved) == (
            b.train_loss, b.test_loss, b.test_accuracy, b.lr, b.improved)
    assert_same(resumed.state.model_state(), straight.state.model_state(), "model")
    assert resumed.completed_epochs == 3 and list(resumed.train(3)) == []


def test_best_checkpoint_is_rewritten_only_when_the_accuracy_improves(tmp_path):
    run = TrainingRun(make_config(), tmp_path)
    results = list(run.train(3))
    accuracies = [r.test_accuracy for r in results]
    assert [r.improved for r in results] == [
        a > max(accuracies[:i], default=-1.0) for i, a in enumerate(accuracies)
    ]
    best = load_resumable(run.best_path)
    assert best.epoch == 1 + int(np.argmax(accuracies))
    assert best.metadata["best_accuracy"] == max(accuracies) == run.best_accuracy
    assert [h["epoch"] for h in load_resumable(run.last_path).metadata["history"]] == [1, 2, 3]


def test_diverging_epoch_raises_and_writes_nothing(tmp_path):
    run = TrainingRun(make_config(), tmp_path)
    next(iter(run.state.model.parameters())).data[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteLossError) as caught:
        run.run_epoch()
    assert (caught.value.epoch, caught.value.step) == (1, 1)
    assert run.completed_epochs == 0 and run.last_saved is None and run.history == []
    assert list(tmp_path.iterdir()) == []


def test_load_resumable_refuses_a_checkpoint_without_training_state(tmp_path):
    model = build_model("tiny-cnn", dtype="float32", rng=np.random.default_rng(0))
    path = save_checkpoint(tmp_path / "weights.npz", model.state_dict(), {
        "architecture": "tiny-cnn", "dataset": "mnist", "classes": [str(d) for d in range(10)],
        "normalization": {"mean": 0.1, "std": 0.3}, "dtype": "float32", "epoch": 1,
    })
    with pytest.raises(CheckpointError, match="has no training state to resume from"):
        load_resumable(path)


def test_optimizer_options_pass_momentum_to_sgd_only():
    assert optimizer_options(make_config()) == {"weight_decay": 1e-4, "momentum": 0.9}
    adam = make_config(optimizer="adam", momentum=0.0)
    assert optimizer_options(adam) == {"weight_decay": 1e-4}
    with pytest.raises(ValueError, match="--momentum applies to --optimizer sgd only"):
        optimizer_options({**adam, "momentum": 0.5})


def test_finite_or_none_replaces_nan_and_inf_at_any_depth():
    value = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], "d": (np.float32("nan"), 2),
             "e": "nan", "f": 0.0}
    assert finite_or_none(value) == {"a": None, "b": [1.5, None, {"c": None}],
                                     "d": [None, 2], "e": "nan", "f": 0.0}
    assert finite_or_none(math.nan) is None and finite_or_none(3.25) == 3.25


def test_importing_the_module_does_not_import_torch():
    code = ("import sys, scratchcnn.harness.training_run, scratchcnn.cli.train; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
