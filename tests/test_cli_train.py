"""End-to-end ``scratchcnn train`` / ``evaluate`` runs on a few hundred mnist-sample images:
checkpoints per epoch, resume == uninterrupted run, NaN stop, option clashes."""

from __future__ import annotations

import re

import numpy as np
import pytest

from scratchcnn.cli import main
from scratchcnn.formats.checkpoint import load_checkpoint
from scratchcnn.harness import training

# One plain process (in-process, so monkeypatching reaches it); MPI ranks: test_cli_ranks.py.
ONE = ["--threads", "1"]
TINY = [
    "--dataset", "mnist-sample", "--limit-train", "200", "--limit-test", "100",
    "--batch-size", "40", "--no-progress", "--threads", "1",
]


def train(out, *options: str) -> int:
    return main(["train", "--out", str(out), *TINY, *options])


def arrays_of(path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint except the metadata (whose timestamps differ)."""
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files if k != "__metadata__"}


def assert_same_training_state(path_a, path_b) -> None:
    a, b = arrays_of(path_a), arrays_of(path_b)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta_a, meta_b = load_checkpoint(path_a).metadata, load_checkpoint(path_b).metadata
    assert meta_a["rng"]["numpy"] == meta_b["rng"]["numpy"]
    assert meta_a["epoch"] == meta_b["epoch"]
    strip = [{k: v for k, v in h.items() if k != "train_seconds"} for h in meta_a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "train_seconds"}
                     for h in meta_b["history"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train(out, "--model", "tiny-cnn", "--epochs", "2", "--lr", "0.05") == 0
    return out


def test_train_writes_checkpoints_each_epoch_with_metadata(trained):
    last = load_checkpoint(trained / "last.npz")
    assert last.epoch == 2 and last.architecture == "tiny-cnn"
    assert last.dtype == np.float32
    assert last.classes == tuple(str(d) for d in range(10))
    assert [h["epoch"] for h in last.metadata["history"]] == [1, 2]
    assert last.metadata["config"]["lr"] == 0.05
    assert last.std > 0 and 0 < last.mean < 1
    best = load_checkpoint(trained / "best.npz")
    accuracies = [h["test_accuracy"] for h in last.metadata["history"]]
    assert best.metadata["best_accuracy"] == max(accuracies)
    assert best.epoch == 1 + int(np.argmax(accuracies))
    assert sorted(p.name for p in trained.iterdir()) == ["best.npz", "last.npz"]


def test_evaluate_reports_the_accuracy_recorded_during_training(trained, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(trained / "last.npz"), "--limit-test", "100"]) == 0
    out = capsys.readouterr().out
    recorded = load_checkpoint(trained / "last.npz").metadata["history"][-1]
    assert f"accuracy {100 * recorded['test_accuracy']:.2f}%" in out
    assert f"loss {recorded['test_loss']:.4f}" in out
    per_class = re.findall(r"^\s+(\d)\s+([\d.]+)%\s+\((\d+) images\)$", out, re.MULTILINE)
    assert [name for name, _, _ in per_class] == [str(d) for d in range(10)]
    counts = np.array([int(n) for _, _, n in per_class])
    correct = np.array([float(a) / 100 for _, a, _ in per_class]) * counts
    assert counts.sum() == 100
    assert round(correct.sum()) == round(100 * recorded["test_accuracy"])


@pytest.mark.parametrize(
    ("framework", "model", "optimizer"),
    [
        ("numpy", "tiny-cnn", ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01"]),
        ("numpy", "bn-cnn", ["--optimizer", "adam", "--lr", "0.001"]),  # dropout + BN buffers
        ("torch", "tiny-cnn", ["--optimizer", "adamw", "--lr", "0.001"]),
    ],
)
def test_resume_after_interruption_equals_uninterrupted_run(
    tmp_path, monkeypatch, framework, model, optimizer, request
):
    if framework == "torch":
        request.getfixturevalue("torch")
    options = ["--model", model, "--framework", framework, "--dtype", "float64", *optimizer]
    if model == "bn-cnn":
        options += ["--limit-train", "48", "--limit-test", "16", "--batch-size", "16"]
    assert train(tmp_path / "straight", *options, "--epochs", "2") == 0

    real_train_epoch = training.train_epoch

    def interrupted(*args, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of epoch 2
        return real_train_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    assert train(tmp_path / "resumed", *options, "--epochs", "2") == 130
    monkeypatch.undo()
    last = tmp_path / "resumed" / "last.npz"
    assert load_checkpoint(last).epoch == 1

    assert main(["train", "--resume", str(last), "--epochs", "2", "--no-progress", *ONE]) == 0
    assert_same_training_state(tmp_path / "straight" / "last.npz", last)


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good(
    tmp_path, monkeypatch, capsys
):
    real_train_epoch = training.train_epoch

    def poisoned(framework, model, *args, epoch, **kwargs):
        if epoch == 2:
            next(iter(model.parameters())).data[0, 0, 0, 0] = np.nan
        return real_train_epoch(framework, model, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(training, "train_epoch", poisoned)
    assert train(tmp_path, "--model", "tiny-cnn", "--epochs", "3") == 3
    err = capsys.readouterr().err
    assert "loss became nan at epoch 2, step 1" in err
    assert f"last good checkpoint {tmp_path / 'last.npz'} (epoch 1) is kept" in err
    kept = load_checkpoint(tmp_path / "last.npz")
    assert kept.epoch == 1 and all(np.isfinite(v).all() for v in kept.model_state.values())


def test_divergent_learning_rate_stops_before_any_checkpoint(tmp_path, capsys):
    assert train(tmp_path, "--model", "tiny-cnn", "--lr", "1e6", "--epochs", "2") == 3
    err = capsys.readouterr().err
    assert re.search(r"loss became (nan|inf) at epoch 1, step \d+", err)
    assert "No checkpoint was written" in err
    assert not (tmp_path / "last.npz").exists()


def test_resume_refuses_contradicting_options_and_skips_finished_runs(trained, capsys):
    last = str(trained / "last.npz")
    assert main(["train", "--resume", last, "--epochs", "3", "--lr", "0.5", *ONE]) == 2
    assert "--lr 0.5 (checkpoint: 0.05)" in capsys.readouterr().err
    before = (trained / "last.npz").read_bytes()
    assert main(["train", "--resume", last, "--epochs", "2", *ONE]) == 0
    assert "already completed 2 epoch(s)" in capsys.readouterr().out
    assert (trained / "last.npz").read_bytes() == before


def test_resume_from_tampered_checkpoint_is_refused(tmp_path, trained, capsys):
    copy = tmp_path / "last.npz"
    data = bytearray((trained / "last.npz").read_bytes())
    data[len(data) // 3] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert main(["train", "--resume", str(copy), "--epochs", "3", *ONE]) == 2
    err = capsys.readouterr().err
    assert str(copy) in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("framework", "recipe"),
    [
        ("numpy", ["--lr-schedule", "cosine", "--warmup-epochs", "1", "--augment", "affine"]),
        ("torch", ["--lr-schedule", "step", "--lr-step-size", "1", "--augment", "shift"]),
    ],
)
def test_resume_with_lr_schedule_and_augmentation_equals_uninterrupted_run(
    tmp_path, monkeypatch, framework, recipe, request
):
    if framework == "torch":
        request.getfixturevalue("torch")
    options = ["--model", "tiny-cnn", "--framework", framework, "--dtype", "float64",
               "--optimizer", "adam", "--lr", "0.002", *recipe]
    assert train(tmp_path / "straight", *options, "--epochs", "3") == 0

    real_train_epoch = training.train_epoch
    seen: dict[int, np.ndarray] = {}

    def interrupted(framework, model, optimizer, images, *args, epoch, **kwargs):
        seen[epoch] = images.copy()
        if epoch == 3:
            raise KeyboardInterrupt
        return real_train_epoch(framework, model, optimizer, images, *args, epoch=epoch,
                                **kwargs)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    assert train(tmp_path / "resumed", *options, "--epochs", "3") == 130
    monkeypatch.undo()
    last = tmp_path / "resumed" / "last.npz"
    assert load_checkpoint(last).epoch == 2
    # Augmentation really changes the images, differently each epoch.
    assert not np.array_equal(seen[1], seen[2])

    assert main(["train", "--resume", str(last), "--epochs", "3", "--no-progress", *ONE]) == 0
    assert_same_training_state(tmp_path / "straight" / "last.npz", last)
    meta = load_checkpoint(last).metadata
    lrs = [h["lr"] for h in meta["history"]]
    if "cosine" in recipe:  # warm-up x1/2, then cosine over 3 epochs, chained as in torch
        np.testing.assert_allclose(lrs, [0.001, 0.002 * 0.75, 0.002 * 0.25], rtol=1e-12)
    else:
        np.testing.assert_allclose(lrs, [0.002, 0.0002, 0.00002], rtol=1e-12)
    assert meta["config"]["augment"] == recipe[-1]
    assert meta["lr_schedulers"][-1]["last_epoch"] == 3


def test_resume_refuses_a_different_schedule_or_augmentation(trained, capsys):
    last = str(trained / "last.npz")
    assert main(["train", "--resume", last, "--epochs", "3", "--augment", "shift", *ONE]) == 2
    assert "--augment shift (checkpoint: none)" in capsys.readouterr().err
    assert main(["train", "--resume", last, "--epochs", "3", "--lr-schedule", "cosine", *ONE]) == 2
    assert "--lr-schedule cosine (checkpoint: constant)" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [
    ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"),
    ("--momentum", "-0.5"), ("--weight-decay", "nan"),
])
def test_bad_optimizer_numbers_are_refused_before_any_data_is_read(
        tmp_path, monkeypatch, capsys, option, value):
    import scratchcnn.harness.training_run as training_run

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the options were checked")

    monkeypatch.setattr(training_run, "TrainingRun", no_data)
    assert train(tmp_path, option, value) != 0
    error = capsys.readouterr().err
    assert option in error and "must be" in error
