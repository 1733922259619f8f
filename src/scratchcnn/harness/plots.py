"""The comparison's PNG charts, drawn with matplotlib's non-interactive Agg backend.

matplotlib is imported inside ``write_plots`` only, so the rest of the harness works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

COLORS = {"numpy": "tab:blue", "torch": "tab:orange"}
MISCLASSIFIED_SHOWN = 24


def write_plots(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Draw every chart into ``out_dir``; returns {chart name: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = report["_artifacts"]
    charts = {
        "curves": ("curves.png", lambda: _curves(plt, report)),
        "timing": ("timing.png", lambda: _timing(plt, report)),
        "confusion": ("confusion.png", lambda: _confusion(plt, report, artifacts)),
        "misclassified": ("misclassified.png", lambda: _misclassified(plt, artifacts)),
        "filters": ("filters.png", lambda: _filters(plt, artifacts)),
    }
    written: dict[str, str] = {}
    for name, (file_name, draw) in charts.items():
        figure = draw()
        if figure is None:
            continue
        figure.savefig(out_dir / file_name, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written[name] = file_name
    return written


def _title(report: dict[str, Any]) -> str:
    return f"{report['model']} on {report['dataset']['name']}"


# Both sides usually overlap almost exactly: draw NumPy wide and pale, PyTorch thin on top.
_STYLE = {"numpy": {"linewidth": 4, "alpha": 0.5}, "torch": {"linewidth": 1.3, "alpha": 1.0}}


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    sums = np.cumsum(np.insert(values, 0, 0.0))
    return (sums[window:] - sums[:-window]) / window


def _curves(plt, report):
    """Per-step training loss (running mean), per-epoch train/test loss and test accuracy, both
    frameworks on the same axes; epoch 0 is the untrained model."""
    figure, (step_axes, loss_axes, accuracy_axes) = plt.subplots(1, 3, figsize=(15, 4))
    for name, side in report["frameworks"].items():
        style = {"color": COLORS.get(name), **_STYLE.get(name, {})}
        steps = np.concatenate([np.asarray(losses, dtype=float)
                                for losses in side.get("step_losses", [])] or [np.zeros(0)])
        if len(steps):
            window = max(1, len(steps) // 50)
            smooth = _running_mean(steps, window)
            step_axes.plot(np.arange(window, len(steps) + 1), smooth, label=name, **style)
            step_axes.set_title(f"Training loss per step (mean of {window})")
        epochs = [epoch["epoch"] for epoch in side["epochs"]]
        loss_axes.plot(epochs, [e["train_loss"] for e in side["epochs"]], "o-",
                       label=f"{name} train (mean over the epoch)", **style)
        test_losses = [side["untrained"].get("test_loss")]
        test_losses += [e["test_loss"] for e in side["epochs"]]
        loss_axes.plot([0, *epochs], test_losses, "s--", label=f"{name} test (after the epoch)",
                       **style)
        accuracies = [side["untrained"]["test_accuracy"]]
        accuracies += [e["test_accuracy"] for e in side["epochs"]]
        accuracy_axes.plot([0, *epochs], 100 * np.asarray(accuracies), "o-", label=name, **style)
    step_axes.set(xlabel="step", ylabel="cross-entropy loss")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss",
                  title="Loss per epoch\n(train: running mean while learning; test: at the end)")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for axes in (step_axes, loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.get_major_locator().set_params(integer=True)
    both = len(report["frameworks"]) > 1
    figure.suptitle(_title(report) + (" (same initial weights, same batches)" if both else ""))
    figure.tight_layout()
    return figure


def _timing(plt, report):
    names = list(report["frameworks"])
    groups = [("untrained eval\n(incl. one-time start-up)",
               lambda s: s["untrained"]["eval_seconds"]),
              ("training, all epochs\n(epoch 1 incl. start-up)", lambda s: s["train_seconds"]),
              ("final eval", lambda s: s["eval_seconds"])]
    figure, axes = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(names), 1)
    positions = np.arange(len(groups))
    for i, name in enumerate(names):
        values = [value(report["frameworks"][name]) for _, value in groups]
        bars = axes.bar(positions + i * width, values, width, label=name, color=COLORS.get(name))
        axes.bar_label(bars, fmt="%.2f s", fontsize=8)
    axes.set_xticks(positions + width * (len(names) - 1) / 2, [label for label, _ in groups])
    axes.set(ylabel="seconds", title=f"Time, {_title(report)}")
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    return figure


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def _confusion(plt, report, artifacts):
    predictions = artifacts["predictions"]
    classes = artifacts["classes"]
    figure, axes_row = plt.subplots(1, len(predictions), figsize=(5.5 * len(predictions), 5),
                                    squeeze=False)
    for axes, (name, predicted) in zip(axes_row[0], predictions.items(), strict=True):
        counts = confusion_matrix(artifacts["test_labels"], predicted, len(classes))
        axes.imshow(counts, cmap="Blues")
        for (row, column), count in np.ndenumerate(counts):
            if count:
                dark = count > counts.max() / 2
                axes.text(column, row, str(count), ha="center", va="center", fontsize=7,
                          color="white" if dark else "black")
        ticks = np.arange(len(classes))
        axes.set_xticks(ticks, classes, rotation=45 if max(map(len, classes)) > 2 else 0,
                        ha="right" if max(map(len, classes)) > 2 else "center")
        axes.set_yticks(ticks, classes)
        accuracy = float(np.mean(predicted == artifacts["test_labels"]))
        axes.set(xlabel="predicted", ylabel="true", title=f"{name}: {accuracy:.2%} correct")
    figure.suptitle("Confusion matrices on the test set")
    figure.tight_layout()
    return figure


def _misclassified(plt, artifacts):
    """The first test images the NumPy model gets wrong (else the first framework's)."""
    predictions = artifacts["predictions"]
    name = "numpy" if "numpy" in predictions else next(iter(predictions))
    predicted, labels = predictions[name], artifacts["test_labels"]
    wrong = np.flatnonzero(predicted != labels)[:MISCLASSIFIED_SHOWN]
    columns = 8
    rows = max(1, -(-len(wrong) // columns))
    figure, axes_grid = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.5),
                                     squeeze=False)
    classes = artifacts["classes"]
    for axes in axes_grid.flat:
        axes.axis("off")
    for axes, index in zip(axes_grid.flat, wrong, strict=False):
        axes.imshow(artifacts["test_images"][index, 0], cmap="gray_r")
        axes.set_title(f"true {classes[labels[index]]}\n{name}: {classes[predicted[index]]}",
                       fontsize=7)
    if not len(wrong):
        axes_grid[0, 0].text(0, 0.5, f"{name} misclassified no test image", fontsize=10)
    figure.suptitle(f"Test images {name} misclassified ({np.count_nonzero(predicted != labels)}"
                    f" in total, first {len(wrong)} shown)")
    return figure


def _filters(plt, artifacts):
    """The first convolution's filters of each framework after training (one row each), plus
    the initial filters (shared when both ran); all on one colour scale per row."""
    rows = [(f"{name} trained", weight) for name, weight in artifacts["first_layer"].items()
            if weight is not None]
    initial = next((w for w in artifacts["initial_first_layer"].values() if w is not None), None)
    if not rows:
        return None
    if initial is not None:
        shared = sum(w is not None for w in artifacts["initial_first_layer"].values()) > 1
        rows.insert(0, ("initial (both)" if shared else "initial", initial))
    count = min(rows[0][1].shape[0], 32)
    figure, axes_grid = plt.subplots(len(rows), count, figsize=(count * 0.7, len(rows) * 0.9),
                                     squeeze=False)
    for row, (label, weight) in enumerate(rows):
        limit = float(np.max(np.abs(weight[:count, 0]))) or 1.0
        for column in range(count):
            axes = axes_grid[row, column]
            axes.imshow(weight[column, 0], cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes.set_xticks([])
            axes.set_yticks([])
        axes_grid[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle("First convolution's filters (input channel 0; red > 0 > blue)")
    return figure
