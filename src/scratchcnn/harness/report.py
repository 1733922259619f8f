"""The comparison report as JSON (machine-readable) and Markdown (for people), written
atomically: a temporary file in the same directory, then a rename."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from scratchcnn.atomic import atomic_write_text
from scratchcnn.harness.measure import adds_child_processes


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
    if kind == "mib":
        return f"{value:.1f} MiB"
    return f"{value:.4f}"


SUMMARY_ROWS = (
    ("Untrained test accuracy", ("untrained", "test_accuracy"), "pct"),
    ("Untrained evaluation time (incl. one-time start-up)", ("untrained", "eval_seconds"), "s"),
    ("Test accuracy", ("test_accuracy",), "pct"),
    ("Test loss", ("test_loss",), "num"),
    ("Training time", ("train_seconds",), "s"),
    ("Training throughput", ("train_samples_per_second",), "rate"),
    ("Evaluation time", ("eval_seconds",), "s"),
    ("Evaluation throughput", ("eval_samples_per_second",), "rate"),
    ("Peak memory (training + eval, separate probe process)", ("peak_memory_mib",), "mib"),
)
# A side whose slowest epoch after the first took more than this times its fastest epoch ran on a
# disturbed host (epoch 1 is left out as the slow one: it carries one-time start-up costs).
EPOCH_SPREAD_LIMIT = 1.5


def run_warnings(report: dict[str, Any]) -> list[str]:
    """WARNING lines for timings taken on a disturbed host: a busy load average (as ``bench``
    judges it) and, per side, epoch times spread wider than ``EPOCH_SPREAD_LIMIT``."""
    from scratchcnn.harness.bench_report import busy_warning

    warnings = []
    load = report.get("load_average") or {}
    if load.get("start") and load.get("end"):
        environment = report.get("environment") or {}
        cores = environment.get("available_cores") or environment.get("threads") or 1
        if busy := busy_warning(load, cores):
            warnings.append(busy)
    for name, side in report["frameworks"].items():
        seconds = [epoch["seconds"] for epoch in side.get("epochs", [])]
        if len(seconds) < 2 or min(seconds) <= 0:
            continue
        slowest = max(seconds[1:])
        if slowest > EPOCH_SPREAD_LIMIT * min(seconds):
            warnings.append(
                f"WARNING: {name}'s epoch times spread widely ({min(seconds):.2f}-{slowest:.2f} "
                f"s; its slowest epoch after the first took {slowest / min(seconds):.1f}x its "
                f"fastest), so the host was disturbed during the run: its training times are "
                "unreliable; use `scratchcnn bench` for speed."
            )
    return warnings


def _lookup(entry: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        entry = entry.get(key) if isinstance(entry, dict) else None
    return entry


def summary_table(report: dict[str, Any]) -> str:
    """The side-by-side Markdown table also printed at the end of a run."""
    names = list(report["frameworks"])
    lines = ["| Metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, path, kind in SUMMARY_ROWS:
        cells = []
        for name in names:
            side = report["frameworks"][name]
            cell = _fmt(_lookup(side, path), kind)
            if kind == "mib" and adds_child_processes(side.get("peak_memory_method")):
                cell += " (upper bound)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def epochs_table(report: dict[str, Any]) -> str:
    lines = ["| Framework | Epoch | LR | Train loss | Test loss | Test accuracy | Time |",
             "|---|---|---|---|---|---|---|"]
    by_epoch = sorted(
        ((epoch["epoch"], name, epoch)
         for name, side in report["frameworks"].items() for epoch in side["epochs"]),
        key=lambda item: item[0],
    )
    for number, name, epoch in by_epoch:
        lr = epoch.get("lr")
        lines.append(
            f"| {name} | {number} | {'n/a' if lr is None else f'{lr:.3g}'} | "
            f"{_fmt(epoch['train_loss'], 'num')} | "
            f"{_fmt(epoch['test_loss'], 'num')} | {_fmt(epoch['test_accuracy'], 'pct')} | "
            f"{_fmt(epoch['seconds'], 's')} |"
        )
    return "\n".join(lines)


def training_description(config: dict[str, Any]) -> str:
    """The training recipe in words: optimizer and its options, lr schedule with warm-up and
    step size, augmentation, seed and dtype."""
    options = config.get("optimizer_options") or {}
    optimizer = f"{config['optimizer']} lr={config['lr']}"
    optimizer += "".join(f", {name.replace('_', ' ')} {value}"
                         for name, value in sorted(options.items()))
    optimizer += " (other settings torch's defaults)"
    schedule = config.get("lr_schedule") or "constant"
    epochs = config["epochs"]
    if schedule == "step":
        from scratchcnn.harness.compare import step_size_for

        step = step_size_for(epochs, config.get("lr_step_size"))
        schedule = f"step (lr x0.1 every {step} epoch(s))"
    elif schedule == "cosine":
        schedule = f"cosine (to 0 over {epochs} epoch(s))"
    warmup = config.get("warmup_epochs") or 0
    if warmup:
        schedule += (f", after a linear warm-up from lr/{warmup + 1} over {warmup} epoch(s)")
    return (f"{epochs} epoch(s), batch size {config['batch_size']}, {optimizer}; lr schedule "
            f"{schedule} (each epoch's lr is in the per-epoch table); augmentation "
            f"{config.get('augment') or 'none'}; seed {config['seed']}, {config['dtype']}")


def _run_lines(report: dict[str, Any]) -> list[str]:
    """Timestamp, version, command, load average and matmul peak, where the report has them."""
    run, lines = report.get("run") or {}, []
    if run:
        version = f"scratchcnn {run.get('scratchcnn_version')}"
        if run.get("git_commit"):
            version += f" (git {run['git_commit'][:12]}"
            version += ", with uncommitted changes)" if run.get("git_dirty") else ")"
        lines.append(f"- Run: {run.get('started')} to {run.get('finished')} (UTC), {version}")
    if run.get("command"):
        lines.append(f"- Command (equivalent): `{run['command']}`")
    load, peak = report.get("load_average") or {}, report.get("matmul_peak") or {}
    host = []
    if load.get("start") and load.get("end"):
        host.append(f"1-minute load average {load['start'][0]:.2f} at start, "
                    f"{load['end'][0]:.2f} at end")
    if peak.get("gflops"):
        host.append(f"matmul peak ({peak['dtype']}, {peak['size']}^2, best "
                    "of start and end) "
                    f"{peak['gflops']:.1f} GFLOP/s")
    if host:
        lines.append("- Host: " + "; ".join(host))
    return lines


def _machine_line(report: dict[str, Any]) -> str:
    env = report["environment"]
    blas = env.get("blas") or {}
    line = (f"- Machine: {env['cpu']}, {env['threads']} thread(s); Python {env['python']}, "
            f"NumPy {env['numpy']} ({blas.get('library')} {blas.get('version')})")
    if "torch" in report["frameworks"]:
        line += f", PyTorch {env.get('torch')}"
    if env.get("allocator"):
        line += f"; memory allocator: {env['allocator']}"
    return line


def _epochs_note(report: dict[str, Any]) -> str:
    augmented = (report["config"].get("augment") or "none") != "none"
    note = ("Train loss: the mean of the epoch's step losses, taken while the weights change "
            "during the epoch; test loss and accuracy: the test set after the epoch, so the "
            "train loss is usually the higher one. LR: the learning rate during the epoch. "
            "Time: the epoch's training time, without the test evaluation")
    if augmented:
        first_side = next(iter(report["frameworks"].values()))
        known = [epoch["augment_seconds"] for epoch in first_side["epochs"]
                 if epoch.get("augment_seconds") is not None]
        note += (" and without augmenting the epoch's images (done once per epoch for both "
                 "sides: `augment_seconds` in report.json"
                 + (f", {min(known):.2f}-{max(known):.2f} s" if known else "") + ")")
    return note + "; epoch 1 also carries one-time start-up costs."


def _agreement_lines(agreement: dict[str, Any]) -> list[str]:
    def number(key: str) -> str:
        value = agreement.get(key)
        return "n/a" if value is None else f"{value:.3g}"

    steps = agreement.get("first_epoch_steps")
    within = agreement.get("first_epoch_steps_within_tolerance")
    tolerance = agreement.get("step_loss_tolerance", 1e-4)
    lines = [
        "## Agreement",
        "",
        f"- Largest initial weight difference: {number('initial_weights_max_abs_diff')}",
        f"- Relative difference of the first training step's loss: "
        f"{number('first_epoch_first_step_loss_rel_diff')}",
    ]
    if within is not None:
        beyond = agreement.get("first_epoch_first_step_beyond_tolerance")
        lines.append(
            f"- Leading steps of epoch 1 whose losses agree to {tolerance:g}: {within} of {steps}"
            + (f" (the first beyond it: step {beyond})" if beyond else " (all of them)"))
    worst_step = agreement.get("first_epoch_step_loss_max_rel_diff_step")
    lines.append(
        "- Largest relative difference of one step's loss in epoch 1: "
        + number("first_epoch_step_loss_max_rel_diff")
        + (f" (step {worst_step})" if worst_step else ""))
    per_epoch = agreement.get("epoch_train_loss_rel_diff")
    if per_epoch:
        lines.append("- Relative difference of the epoch-mean training loss: " + ", ".join(
            f"{value:.3g} (epoch {number})" for number, value in enumerate(per_epoch, 1)))
    if agreement.get("note"):
        lines.append(f"- {agreement['note']}")
    return [*lines, ""]


def _onnxruntime_lines(report: dict[str, Any]) -> list[str]:
    """A line under the summary: the trained NumPy model's evaluation in ONNX Runtime (the
    practitioner's CPU inference engine) beside NumPy's, when it was measured."""
    ort = report.get("onnxruntime")
    if not ort:
        return []
    if ort.get("problem"):
        return [f"ONNX Runtime: {ort['problem']}", ""]
    line = (f"ONNX Runtime {ort['version']} ({ort['threads']} thread(s), the trained NumPy "
            f"weights exported to ONNX): evaluation time {_fmt(ort['eval_seconds'], 's')}, "
            f"test accuracy {_fmt(ort['test_accuracy'], 'pct')}")
    numpy_seconds = (report["frameworks"].get("numpy") or {}).get("eval_seconds")
    if numpy_seconds and ort["eval_seconds"]:
        line += f"; NumPy's evaluation took {numpy_seconds / ort['eval_seconds']:.2f}x its time"
    return [line + ".", ""]


def render_markdown(report: dict[str, Any]) -> str:
    dataset, config = report["dataset"], report["config"]
    parts = [f"# scratchcnn compare: {report['model']} on {dataset['name']}", ""]
    if dataset.get("fallback"):
        parts += [f"> **WARNING: {dataset['fallback']}**", ""]
    for warning in run_warnings(report):
        parts += [f"> **{warning}**", ""]
    parts += [
        *_run_lines(report),
        f"- Dataset: {dataset['name']} ({dataset['train_size']} training, "
        f"{dataset['test_size']} test images) from `{dataset.get('source')}`",
        f"- Training: {training_description(config)}",
        _machine_line(report),
        "",
        "## Summary",
        "",
        summary_table(report),
        "",
        *_onnxruntime_lines(report),
        "## Per epoch",
        "",
        epochs_table(report),
        "",
        _epochs_note(report),
        "",
    ]
    agreement = report.get("agreement") or {}
    if agreement.get("initial_weights_max_abs_diff") is not None:
        parts += _agreement_lines(agreement)
    plots = report.get("plots") or {}
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{name}]({file})" for name, file in plots.items()]
        parts.append("")
    parts += ["## Notes", ""] + [f"- {note}" for note in report.get("notes", [])] + [""]
    return "\n".join(parts)
