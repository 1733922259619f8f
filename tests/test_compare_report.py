"""What ``scratchcnn compare``'s report says: step-loss agreement beyond one max, the whole
training recipe, MiB, one-framework runs, the memory probe, run metadata and disturbed-host
warnings, start-up costs, train vs test loss, and the per-epoch column names. Synthetic reports
where possible; one tiny NumPy-only run for what only a run produces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scratchcnn.harness import compare, plots
from scratchcnn.harness import report as markdown_report
from scratchcnn.harness.report import render_markdown, summary_table, to_json


def run_warnings(report):
    return markdown_report.run_warnings(report)


def _side(seconds=(3.0, 2.0), lr=(0.0005, 0.0005), method=None):
    epochs = [{"epoch": i, "train_loss": 0.156, "test_loss": 0.052, "test_accuracy": 0.98,
               "seconds": s, "eval_seconds": 0.03, "lr": rate, "augment_seconds": 0.12}
              for i, (s, rate) in enumerate(zip(seconds, lr, strict=True), 1)]
    return {"untrained": {"test_accuracy": 0.1, "eval_seconds": 0.09, "test_loss": 2.3},
            "epochs": epochs, "test_accuracy": 0.98, "test_loss": 0.052,
            "train_seconds": sum(seconds), "eval_seconds": 0.03, "peak_memory_mib": 42.0,
            "peak_memory_method": method or "VmHWM (peak RSS), reset at start",
            "step_losses": [[2.3, 1.9, 1.2], [0.5, 0.4, 0.3]][: len(seconds)]}


def _report(frameworks=("numpy", "torch"), **config_extra):
    config = {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.001, "seed": 0,
              "dtype": "float32", "optimizer_options": {}, "augment": "none",
              "lr_schedule": "constant", "warmup_epochs": 0, "lr_step_size": None,
              **config_extra}
    sides = {"numpy": _side(method="VmHWM (peak RSS), reset at start + child processes' "
                                   "private memory sampled every 2 ms"),
             "torch": _side()}
    return {
        "run": {"started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:00+00:00",
                "scratchcnn_version": "0.1.0", "git_commit": "0123456789abcdef" * 2 + "01234567",
                "git_dirty": False, "command": "scratchcnn compare --epochs 2"},
        "dataset": {"name": "mnist", "train_size": 10, "test_size": 5, "source": "x"},
        "model": "simple-cnn", "config": config,
        "frameworks": {name: sides[name] for name in frameworks},
        "environment": {"python": "3", "numpy": "2", "torch": "2.13.0", "blas": {},
                        "cpu": "cpu", "threads": 2, "available_cores": 2,
                        "allocator": "the C library's default (not changed)"},
        "load_average": {"start": [0.1, 0.2, 0.3], "end": [2.1, 1.0, 0.5]},
        "matmul_peak": {"gflops": 330.0, "size": 2048, "dtype": "float32"},
        "agreement": {"initial_weights_max_abs_diff": 0.0},
        "notes": [],
    }


# 1. Agreement: the first step, the leading agreeing steps, the largest, the epoch means.

def test_step_loss_agreement_reports_first_step_leading_steps_and_largest():
    torch_side = np.full(938, 0.1)
    numpy_side = torch_side.copy()
    numpy_side[:190] *= 1 + 6e-7
    numpy_side[190] *= 1 + 2e-4            # step 191 is the first beyond 1e-4
    numpy_side[860] = 0.153                # step 861: the largest, 0.53
    result = compare.step_loss_agreement(numpy_side, torch_side)
    assert result["steps"] == 938
    assert result["first_step_rel_diff"] == pytest.approx(6e-7)
    assert result["steps_within_tolerance"] == 190
    assert result["first_step_beyond_tolerance"] == 191
    assert result["max_rel_diff"] == pytest.approx(0.53)
    assert result["max_rel_diff_step"] == 861
    same = compare.step_loss_agreement(torch_side, torch_side)
    assert same["steps_within_tolerance"] == 938 and same["first_step_beyond_tolerance"] is None

    report = _report()
    report["agreement"].update({
        "step_loss_tolerance": 1e-4, "first_epoch_steps": 938,
        "first_epoch_first_step_loss_rel_diff": 6e-7,
        "first_epoch_steps_within_tolerance": 190, "first_epoch_first_step_beyond_tolerance": 191,
        "first_epoch_step_loss_max_rel_diff": 0.53, "first_epoch_step_loss_max_rel_diff_step": 861,
        "epoch_train_loss_rel_diff": [5.1e-5], "note": "float32 runs drift apart by rounding",
    })
    markdown = render_markdown(report)
    assert "first training step's loss: 6e-07" in markdown
    assert "agree to 0.0001: 190 of 938 (the first beyond it: step 191)" in markdown
    assert "0.53 (step 861)" in markdown
    assert "epoch-mean training loss: 5.1e-05 (epoch 1)" in markdown
    assert "drift apart by rounding" in markdown


# 2. The whole training recipe, and each epoch's lr.

def test_training_line_names_optimizer_options_schedule_warmup_and_augmentation():
    report = _report(optimizer="adamw", optimizer_options={"weight_decay": 0.05},
                     augment="shift", lr_schedule="cosine", warmup_epochs=1)
    markdown = render_markdown(report)
    training = next(line for line in markdown.splitlines() if line.startswith("- Training:"))
    for words in ("adamw lr=0.001", "weight decay 0.05", "cosine", "warm-up from lr/2 over 1",
                  "augmentation shift"):
        assert words in training, words
    step = render_markdown(_report(lr_schedule="step", lr_step_size=4, epochs=8))
    assert "lr x0.1 every 4 epoch(s)" in step
    assert "| Framework | Epoch | LR | Train loss |" in markdown
    assert "| numpy | 1 | 0.0005 | 0.1560 |" in markdown
    assert "without augmenting the epoch's images" in markdown and "augment_seconds" in markdown
    assert "augment_seconds" not in render_markdown(_report())


# 3. MiB, and the JSON key that says so.

def test_memory_is_labelled_mib():
    report = _report()
    table = summary_table(report)
    assert "42.0 MiB" in table and " MB" not in table
    assert " MB" not in render_markdown(report)
    side = json.loads(to_json(report))["frameworks"]["torch"]
    assert side["peak_memory_mib"] == 42.0 and "peak_memory_mb" not in side


# 4, 5. One framework only; the memory probe's real step count, in a separate process.

@pytest.fixture(scope="module")
def numpy_only():
    config = compare.CompareConfig(dataset="mnist-sample", model="tiny-cnn", epochs=1,
                                   batch_size=32, limit_train=96, limit_test=40,
                                   frameworks=("numpy",), quiet=True)
    return compare.run_compare(config)


def test_one_framework_run_does_not_claim_a_comparison(numpy_only):
    report = numpy_only
    notes = " ".join(report["notes"])
    assert "copied into PyTorch" not in notes and "alternate" not in notes
    markdown = render_markdown(report)
    machine = next(line for line in markdown.splitlines() if line.startswith("- Machine:"))
    assert "PyTorch" not in machine
    assert "## Agreement" not in markdown
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = plots._curves(plt, report)
    assert "same initial weights" not in curves._suptitle.get_text()
    filters = plots._filters(plt, report["_artifacts"])
    labels = [axes.get_ylabel() for axes in filters.axes if axes.get_ylabel()]
    assert labels[0] == "initial" and "both" not in " ".join(labels)
    plt.close("all")
    both = _report()
    both["_artifacts"] = {**report["_artifacts"], "initial_first_layer": {
        "numpy": report["_artifacts"]["initial_first_layer"]["numpy"],
        "torch": report["_artifacts"]["initial_first_layer"]["numpy"]}}
    assert "same initial weights" in plots._curves(plt, both)._suptitle.get_text()
    plt.close("all")


def test_memory_note_states_the_probe_steps_and_process(numpy_only):
    report = numpy_only
    # 96 images at batch 32: the probe trains 3 steps, not PROBE_STEPS.
    assert report["memory_probe"] == {"steps": 3, "test_images": 40, "separate_process": True}
    note = next(note for note in report["notes"] if note.startswith("Peak memory"))
    assert "trains 3 step(s)" in note and "separate probe" in note
    assert f"{compare.PROBE_STEPS} training steps" not in note
    assert "upper bound" not in note  # one process each: nothing added up
    table = summary_table(report)
    assert "separate probe process" in table and "MiB (upper bound)" not in table


# 6. Timestamp, version, command, load average, matmul peak, allocator; disturbed-host warnings.

def test_run_metadata_reaches_json_and_markdown(numpy_only):
    report = numpy_only
    run = report["run"]
    assert run["started"] <= run["finished"] and run["started"].endswith("+00:00")
    assert run["scratchcnn_version"] == "0.1.0"
    assert run["command"].startswith("scratchcnn compare --dataset mnist-sample")
    assert "--frameworks numpy" in run["command"] and "--limit-train 96" in run["command"]
    assert len(report["load_average"]["start"]) == 3 and len(report["load_average"]["end"]) == 3
    assert report["matmul_peak"]["gflops"] > 0
    markdown = render_markdown(report)
    assert f"- Run: {run['started']}" in markdown and "scratchcnn 0.1.0" in markdown
    assert f"`{run['command']}`" in markdown
    assert "1-minute load average" in markdown and "GFLOP/s" in markdown
    assert f"memory allocator: {report['environment']['allocator']}" in markdown
    assert json.loads(to_json(report))["run"]["command"] == run["command"]


def test_widely_spread_epoch_times_and_a_busy_host_are_flagged():
    report = _report()
    assert run_warnings(report) == []
    report["frameworks"]["torch"] = _side(seconds=(3.0, 1.0, 1.6), lr=(1e-3,) * 3)
    (warning,) = run_warnings(report)
    assert warning.startswith("WARNING: torch's epoch times spread widely")
    assert f"> **{warning}**" in render_markdown(report)
    report["frameworks"]["torch"] = _side(seconds=(3.0, 1.0, 1.4), lr=(1e-3,) * 3)
    assert run_warnings(report) == []  # epoch 1's start-up costs alone do not count
    report["load_average"]["start"] = [1.8, 1.0, 0.5]
    (busy,) = run_warnings(report)
    assert "machine was busy" in busy


# 7, 8, 9. Start-up costs, train vs test loss, the column's name.

def _pyplot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def test_untrained_evaluation_and_epoch_one_are_said_to_carry_startup_costs():
    report = _report()
    markdown = render_markdown(report)
    assert "| Untrained evaluation time (incl. one-time start-up) |" in markdown
    assert "epoch 1 also carries one-time start-up costs" in markdown
    plt = _pyplot()
    timing = plots._timing(plt, report)
    ticks = [label.get_text() for label in timing.axes[0].get_xticklabels()]
    assert "one-time start-up" in ticks[0] and "epoch 1 incl. start-up" in ticks[1]
    plt.close("all")


def test_train_loss_is_said_to_be_a_running_mean_and_test_loss_end_of_epoch():
    report = _report()
    markdown = render_markdown(report)
    assert "mean of the epoch's step losses" in markdown and "test set after the epoch" in markdown
    plt = _pyplot()
    curves = plots._curves(plt, report)
    legend = [text.get_text() for text in curves.axes[1].get_legend().get_texts()]
    assert "numpy train (mean over the epoch)" in legend
    assert "numpy test (after the epoch)" in legend
    plt.close("all")


def test_epoch_notes_use_the_column_names(numpy_only):
    markdown = render_markdown(numpy_only)
    assert "| Time |" in markdown
    assert "'seconds'" not in markdown and "Time: the epoch's training time" in markdown
