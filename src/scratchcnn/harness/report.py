"""The comparison report as JSON (machine-readable) and Markdown (for people), written
atomically: a temporary file in the same directory, then a rename."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from scratchcnn.atomic import atomic_write_text


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report without private entries (keys starting with "_", e.g. arrays for the plots)."""
    return {key: value for key, value in report.items() if not key.startswith("_")}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (also inside dicts, lists and tuples) replaced
    by None: JSON has no NaN/inf, and null is better than invalid JSON."""
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def to_json(report: dict[str, Any]) -> str:
    cleaned = finite_or_none(json.loads(json.dumps(public_report(report), default=_json_default)))
    return json.dumps(cleaned, indent=2, allow_nan=False) + "\n"


def write_json_and_markdown(
    report: dict[str, Any], out_dir: Path, stem: str, markdown: str
) -> dict[str, Path]:
    """``STEM.json`` (``report`` as JSON) and ``STEM.md`` in ``out_dir`` (created if needed),
    each written atomically."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    atomic_write_text(paths["json"], to_json(report))
    atomic_write_text(paths["markdown"], markdown)
    return paths


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    return write_json_and_markdown(report, out_dir, "report", render_markdown(report))


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{value:.2%}"
    if kind == "s":
        return f"{value:.2f} s"
    if kind == "rate":
        return f"{value:,.0f}/s"
    if kind == "mb":
        return f"{value:.1f} MB"
    return f"{value:.4f}"


SUMMARY_ROWS = (
    ("Untrained test accuracy", ("untrained", "test_accuracy"), "pct"),
    ("Untrained evaluation time", ("untrained", "eval_seconds"), "s"),
    ("Test accuracy", ("test_accuracy",), "pct"),
    ("Test loss", ("test_loss",), "num"),
    ("Training time", ("train_seconds",), "s"),
    ("Training throughput", ("train_samples_per_second",), "rate"),
    ("Evaluation time", ("eval_seconds",), "s"),
    ("Evaluation throughput", ("eval_samples_per_second",), "rate"),
    ("Peak memory (training + eval)", ("peak_memory_mb",), "mb"),
)


def _lookup(entry: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        entry = entry.get(key) if isinstance(entry, dict) else None
    return entry


def summary_table(report: dict[str, Any]) -> str:
    """The side-by-side Markdown table also printed at the end of a run."""
    names = list(report["frameworks"])
    lines = ["| Metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, path, kind in SUMMARY_ROWS:
        cells = [_fmt(_lookup(report["frameworks"][name], path), kind) for name in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def epochs_table(report: dict[str, Any]) -> str:
    lines = ["| Framework | Epoch | Train loss | Test loss | Test accuracy | Time |",
             "|---|---|---|---|---|---|"]
    by_epoch = sorted(
        ((epoch["epoch"], name, epoch)
         for name, side in report["frameworks"].items() for epoch in side["epochs"]),
        key=lambda item: item[0],
    )
    for number, name, epoch in by_epoch:
        lines.append(
            f"| {name} | {number} | {_fmt(epoch['train_loss'], 'num')} | "
            f"{_fmt(epoch['test_loss'], 'num')} | {_fmt(epoch['test_accuracy'], 'pct')} | "
            f"{_fmt(epoch['seconds'], 's')} |"
        )
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    dataset, config, env = report["dataset"], report["config"], report["environment"]
    blas = env.get("blas") or {}
    parts = [f"# scratchcnn compare: {report['model']} on {dataset['name']}", ""]
    if dataset.get("fallback"):
        parts += [f"> **WARNING: {dataset['fallback']}**", ""]
    parts += [
        f"- Dataset: {dataset['name']} ({dataset['train_size']} training, "
        f"{dataset['test_size']} test images) from `{dataset.get('source')}`",
        f"- Training: {config['epochs']} epoch(s), batch size {config['batch_size']}, "
        f"{config['optimizer']} lr={config['lr']}, seed {config['seed']}, {config['dtype']}",
        f"- Machine: {env['cpu']}, {env['threads']} thread(s); Python {env['python']}, "
        f"NumPy {env['numpy']} ({blas.get('library')} {blas.get('version')}), "
        f"PyTorch {env.get('torch')}",
        "",
        "## Summary",
        "",
        summary_table(report),
        "",
        "## Per epoch",
        "",
        epochs_table(report),
        "",
    ]
    agreement = report.get("agreement") or {}
    if agreement.get("initial_weights_max_abs_diff") is not None:
        step_difference = agreement.get("first_epoch_step_loss_max_rel_diff")
        parts += [
            "## Agreement",
            "",
            f"- Largest initial weight difference: "
            f"{agreement['initial_weights_max_abs_diff']:.3g}",
            "- Largest relative difference between the two sides' first-epoch step losses: "
            + ("n/a" if step_difference is None else f"{step_difference:.3g}"),
            "",
        ]
    plots = report.get("plots") or {}
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{name}]({file})" for name, file in plots.items()]
        parts.append("")
    parts += ["## Notes", ""] + [f"- {note}" for note in report.get("notes", [])] + [""]
    return "\n".join(parts)
