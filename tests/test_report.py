"""The comparison report: JSON schema, Markdown tables and the PNG plots of one tiny CLI run."""

from __future__ import annotations

import json
import math
import struct

import pytest

from scratchcnn.cli import main
from scratchcnn.harness.report import render_markdown, summary_table, to_json, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("curves.png", "timing.png", "confusion.png", "misclassified.png", "filters.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("compare")
    status = main(["compare", "--dataset", "mnist-sample", "--model", "tiny-cnn",
                   "--limit-train", "192", "--limit-test", "100", "--epochs", "2",
                   "--batch-size", "32", "--seed", "5", "--threads", "1", "--quiet",
                   "--out", str(out)])
    assert status == 0
    return out, json.loads((out / "report.json").read_text())


def _is_fraction(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _is_seconds(value) -> bool:
    return isinstance(value, float) and 0.0 < value < 600


def test_json_has_every_required_key_with_sane_values(run):
    _, report = run
    assert report["dataset"] == {**report["dataset"], "name": "mnist-sample", "train_size": 192,
                                 "test_size": 100}
    assert report["dataset"]["fallback"] is None
    assert report["model"] == "tiny-cnn"
    config = report["config"]
    assert (config["epochs"], config["batch_size"], config["optimizer"], config["lr"],
            config["seed"], config["dtype"]) == (2, 32, "adam", 0.001, 5, "float32")
    assert set(report["frameworks"]) == {"numpy", "torch"}
    for side in report["frameworks"].values():
        assert _is_fraction(side["untrained"]["test_accuracy"])
        assert _is_seconds(side["untrained"]["eval_seconds"])
        assert [e["epoch"] for e in side["epochs"]] == [1, 2]
        for epoch in side["epochs"]:
            assert set(epoch) >= {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}
            assert math.isfinite(epoch["train_loss"]) and epoch["train_loss"] > 0
            assert math.isfinite(epoch["test_loss"]) and epoch["test_loss"] > 0
            assert _is_fraction(epoch["test_accuracy"]) and _is_seconds(epoch["seconds"])
        assert side["test_accuracy"] == side["epochs"][-1]["test_accuracy"]
        assert side["test_loss"] == side["epochs"][-1]["test_loss"]
        assert side["train_seconds"] == pytest.approx(sum(e["seconds"] for e in side["epochs"]))
        assert _is_seconds(side["eval_seconds"])
        assert isinstance(side["peak_memory_mib"], float) and 0 < side["peak_memory_mib"] < 4096
        assert "peak_memory_mb" not in side
        assert len(side["step_losses"]) == 2 and len(side["step_losses"][0]) == 6
    environment = report["environment"]
    assert set(environment) >= {"python", "numpy", "torch", "blas", "cpu", "threads"}
    assert environment["threads"] == 1 and environment["torch"].startswith("2.")
    assert report["agreement"]["initial_weights_max_abs_diff"] == 0.0
    assert any("Peak memory" in note for note in report["notes"])


def test_training_actually_learned_and_sides_agree(run):
    _, report = run
    numpy_side, torch_side = report["frameworks"]["numpy"], report["frameworks"]["torch"]
    assert numpy_side["untrained"]["test_accuracy"] == torch_side["untrained"]["test_accuracy"]
    assert numpy_side["test_loss"] < numpy_side["untrained"]["test_loss"]
    # float32 on both sides: close, not bit-identical.
    assert numpy_side["test_loss"] == pytest.approx(torch_side["test_loss"], rel=1e-3)
    assert report["agreement"]["first_epoch_step_loss_max_rel_diff"] < 1e-4


def test_markdown_report_holds_the_tables(run):
    out, report = run
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# scratchcnn compare: tiny-cnn on mnist-sample")
    assert "| Metric | numpy | torch |" in markdown
    accuracy_row = next(line for line in markdown.splitlines()
                        if line.startswith("| Test accuracy |"))
    assert f"{report['frameworks']['numpy']['test_accuracy']:.2%}" in accuracy_row
    epoch_rows = [line for line in markdown.splitlines() if line.startswith("| numpy | ")
                  or line.startswith("| torch | ")]
    assert len(epoch_rows) == 4
    for name in PLOTS:
        assert f"]({name})" in markdown


def test_plots_are_valid_pngs(run):
    pytest.importorskip("matplotlib")
    out, report = run
    assert sorted(report["plots"].values()) == sorted(PLOTS)
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        width, height = struct.unpack(">II", data[16:24])
        assert width > 200 and height > 100, (name, width, height)


def _minimal_report(**dataset_extra):
    side = {"untrained": {"test_accuracy": 0.1, "eval_seconds": 0.5, "test_loss": 2.3},
            "epochs": [{"epoch": 1, "train_loss": 0.5, "test_loss": float("nan"),
                        "test_accuracy": 0.9, "seconds": 3.0}],
            "test_accuracy": 0.9, "test_loss": 0.3, "train_seconds": 3.0, "eval_seconds": 0.4,
            "peak_memory_mib": None}
    return {"dataset": {"name": "mnist", "train_size": 10, "test_size": 5, **dataset_extra},
            "model": "simple-cnn",
            "config": {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.001,
                       "seed": 0, "dtype": "float32"},
            "frameworks": {"numpy": side},
            "environment": {"python": "3", "numpy": "2", "torch": None, "blas": {},
                            "cpu": "cpu", "threads": 2},
            "notes": [], "_artifacts": {"arrays": object()}}


def test_json_drops_private_entries_and_never_writes_nan():
    text = to_json(_minimal_report())
    parsed = json.loads(text)
    assert "_artifacts" not in parsed
    assert parsed["frameworks"]["numpy"]["epochs"][0]["test_loss"] is None
    assert "NaN" not in text


def test_summary_table_handles_one_framework_and_missing_memory():
    table = summary_table(_minimal_report()).splitlines()
    assert table[0] == "| Metric | numpy |"
    assert "| Test accuracy | 90.00% |" in table
    assert "| Peak memory (training + eval, separate probe process) | n/a |" in table


def test_fallback_warning_reaches_markdown_and_files_are_complete(tmp_path):
    report = _minimal_report(fallback="full MNIST is not available; FALLING BACK")
    assert "**WARNING: full MNIST is not available" in render_markdown(report)
    paths = write_report(report, tmp_path / "new" / "dir")
    assert json.loads(paths["json"].read_text())["dataset"]["fallback"].startswith("full")
    assert sorted(p.name for p in paths["json"].parent.iterdir()) == ["report.json", "report.md"]


def test_the_trained_numpy_model_is_saved_as_a_checkpoint_serve_finds(run):
    import numpy as np

    from scratchcnn import nn
    from scratchcnn.data import load_dataset, normalize
    from scratchcnn.formats.checkpoint import load_checkpoint
    from scratchcnn.serve.locate import newest_checkpoint

    out, report = run
    assert newest_checkpoint(out.parent) == out / "numpy-model.npz"
    checkpoint = load_checkpoint(out / "numpy-model.npz")
    assert (checkpoint.architecture, checkpoint.epoch, checkpoint.metadata["dataset"]) == (
        "tiny-cnn", 2, "mnist-sample")
    normalization = report["dataset"]["normalization"]
    assert (checkpoint.mean, checkpoint.std) == (normalization["mean"], normalization["std"])
    # The weights are the trained ones: they give the report's final test loss.
    test = load_dataset("mnist-sample").limit(0, 100)
    model = checkpoint.build_model().eval()
    with nn.no_grad():
        logits = model(normalize(test.test_images, checkpoint.mean, checkpoint.std,
                                 dtype=checkpoint.dtype))
    loss = nn.CrossEntropyLoss()(logits, test.test_labels).item()
    assert np.isclose(loss, report["frameworks"]["numpy"]["test_loss"], rtol=1e-5)
