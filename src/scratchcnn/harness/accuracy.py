"""The accuracy targets of issue 6, each a fixed ``compare`` recipe run over several seeds.

``run_target`` trains NumPy and its PyTorch twin from the same weights on the same (augmented)
batches once per seed, writes the per-seed results and their mean and spread to JSON after every
seed (so an interrupted run keeps what it finished), and checks the target. ``markdown_table``
turns such JSON files into the README table. These are long benchmarks, not tests.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from scratchcnn.harness.compare import CompareConfig, run_compare

FORMAT = "scratchcnn-accuracy"
VERSION = 1
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    config: CompareConfig
    min_numpy_accuracy: float             # mean over seeds, fraction
    max_gap_pp: float = 0.15              # |mean numpy - mean torch| in percentage points
    max_numpy_train_seconds: float | None = None  # per seed, training + augmentation
    notes: tuple[str, ...] = field(default_factory=tuple)


def _recipe(**overrides: Any) -> CompareConfig:
    # Explicit dataset (never the offline fallback), no memory probe: accuracy runs only. Not
    # quiet: a long run prints a line per framework and epoch on stderr.
    base = dict(dataset="mnist", model="simple-cnn", epochs=5, batch_size=64, optimizer="adam",
                lr=1e-3, dtype="float32", measure_memory=False, quiet=False)
    return CompareConfig(**{**base, **overrides})


# The strong recipe: bn-cnn (BatchNorm + Dropout), AdamW with decoupled weight decay, one
# warm-up epoch then cosine decay, random affine augmentation. Batch 128 halves the number of
# optimizer steps (and their per-step overhead) against batch 64; 6 epochs fit the 15-minute
# NumPy budget (see models.py for the measured per-epoch time).
_STRONG = dict(model="bn-cnn", epochs=6, batch_size=128, optimizer="adamw", lr=3e-3,
               optimizer_options={"weight_decay": 5e-2}, lr_schedule="cosine",
               warmup_epochs=1, augment="affine")

TARGETS: Mapping[str, Target] = {
    target.name: target
    for target in (
        Target("mnist-simple-b64", "simple-cnn on MNIST, 5 epochs, Adam 1e-3, batch 64",
               _recipe(), min_numpy_accuracy=0.989),
        Target("mnist-simple-b10", "simple-cnn on MNIST, 5 epochs, Adam 1e-3, batch 10 "
               "(the notebook's)", _recipe(batch_size=10), min_numpy_accuracy=0.989),
        Target("mnist-strong", "bn-cnn on MNIST, affine augmentation, AdamW + warm-up + cosine, "
               "at most 15 min of NumPy training", _recipe(**_STRONG),
               min_numpy_accuracy=0.995, max_numpy_train_seconds=15 * 60),
        Target("fashion-simple", "simple-cnn on Fashion-MNIST, 8 epochs, Adam 1e-3, cosine",
               _recipe(dataset="fashion-mnist", epochs=8, lr_schedule="cosine"),
               min_numpy_accuracy=0.91),
        # Fashion-MNIST's strong recipe differs from MNIST's in two measured ways: affine
        # rotations do not suit clothes photographed upright, a left-right mirror does; and 6
        # epochs underfit it (test loss below training loss; 3-seed attempt of 2026-11-22:
        # NumPy 93.19% and 92.50% on seeds 0 and 1 with shifts only), so it trains 10.
        Target("fashion-strong", "bn-cnn on Fashion-MNIST, 10 epochs, shift + mirror "
               "augmentation, AdamW + warm-up + cosine",
               _recipe(**{**_STRONG, "augment": "shift-flip", "epochs": 10},
                       dataset="fashion-mnist"),
               min_numpy_accuracy=0.93),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(
            f"unknown accuracy target {name!r}; choose one of {', '.join(TARGETS)}"
        ) from None


def default_results_path(target: str, seeds: Iterable[int], modified: bool) -> str:
    """Where a run writes without --out. Only the target's own recipe on its default seeds
    writes runs/accuracy/TARGET.json: a smoke test (modified) or other seeds must not replace
    an hours-long result that sits there."""
    seeds = list(seeds)
    name = target if seeds == list(DEFAULT_SEEDS) else \
        f"{target}-seeds-{'-'.join(map(str, seeds))}"
    return f"runs/accuracy/{'modified/' if modified else ''}{name}.json"


def command_for(name: str, seeds: Iterable[int] = DEFAULT_SEEDS, out: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None, data_dir: str | None = None,
                threads: int | None = None) -> str:
    """The ``scratchcnn accuracy`` command line of a run: what a results file records, so that
    a file from other seeds or a smoke test says how it was made."""
    words = ["scratchcnn", "accuracy", name, "--seeds", ",".join(map(str, seeds))]
    for key, value in (overrides or {}).items():
        words += [f"--{key.replace('_', '-')}", str(value)]
    if data_dir is not None:
        words += ["--data-dir", str(data_dir)]
    if threads is not None:
        words += ["--threads", str(threads)]
    words += ["--out", str(out if out is not None
                           else default_results_path(name, seeds, bool(overrides)))]
    return " ".join(shlex.quote(word) for word in words)


def seed_result(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one compare report that the accuracy table needs."""
    frameworks = report["frameworks"]
    result: dict[str, Any] = {"seed": report["config"]["seed"]}
    augment_seconds = sum(e.get("augment_seconds", 0.0) for e in frameworks["numpy"]["epochs"])
    for name, side in frameworks.items():
        result[name] = {
            "test_accuracy": side["test_accuracy"],
            "test_loss": side["test_loss"],
            "train_seconds": side["train_seconds"],
            "accuracy_per_epoch": [e["test_accuracy"] for e in side["epochs"]],
        }
    result["augment_seconds"] = augment_seconds
    if "torch" in frameworks:
        result["gap_pp"] = 100 * (frameworks["numpy"]["test_accuracy"]
                                  - frameworks["torch"]["test_accuracy"])
    return result


def mean_std(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (ddof 1; None for one value), min, max and count."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = sum(values) / len(values)
    std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
           if len(values) > 1 else None)
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def _exact_mean(values: Iterable[float]) -> Fraction:
    """The exact mean of accuracies, each a ratio correct / test images (at most 10**6 images):
    float means can fall a rounding error below a target that the counts meet exactly."""
    fractions = [Fraction(value).limit_denominator(10**6) for value in values]
    return sum(fractions, Fraction(0)) / len(fractions)


def summarize(target: Target, seeds: list[dict[str, Any]], modified: bool) -> dict[str, Any]:
    """Mean and spread per framework, and the verdict of each check (None: not checked)."""
    summary: dict[str, Any] = {}
    for framework in ("numpy", "torch"):
        if seeds and framework in seeds[0]:
            summary[framework] = {
                "test_accuracy": mean_std(s[framework]["test_accuracy"] for s in seeds),
                "train_seconds": mean_std(s[framework]["train_seconds"] for s in seeds),
            }
    if seeds and "gap_pp" in seeds[0]:
        summary["gap_pp"] = mean_std(s["gap_pp"] for s in seeds)
    checks: list[dict[str, Any]] = []
    numpy_mean = summary.get("numpy", {}).get("test_accuracy", {}).get("mean")
    if numpy_mean is not None:
        numpy_exact = _exact_mean(s["numpy"]["test_accuracy"] for s in seeds)
        checks.append({"check": f"mean NumPy test accuracy >= {100 * target.min_numpy_accuracy:g}%",
                       "value": numpy_mean,
                       "passed": numpy_exact >= Fraction(str(target.min_numpy_accuracy))})
    if "gap_pp" in summary:
        gap = summary["gap_pp"]["mean"]
        gap_exact = 100 * (numpy_exact - _exact_mean(s["torch"]["test_accuracy"] for s in seeds))
        checks.append({"check": f"|mean NumPy - mean PyTorch| <= {target.max_gap_pp} pp",
                       "value": gap,
                       "passed": abs(gap_exact) <= Fraction(str(target.max_gap_pp))})
    if target.max_numpy_train_seconds is not None and numpy_mean is not None:
        slowest = max(s["numpy"]["train_seconds"] + s["augment_seconds"] for s in seeds)
        checks.append({
            "check": f"NumPy training + augmentation <= {target.max_numpy_train_seconds:g} s "
                     "for every seed",
            "value": slowest, "passed": slowest <= target.max_numpy_train_seconds,
        })
    if modified or len(seeds) < 3:
        reason = "recipe modified" if modified else "fewer than 3 seeds"
        for check in checks:
            check["passed"] = None
            check["note"] = f"not a target result: {reason}"
    summary["checks"] = checks
    verdicts = [c["passed"] for c in checks]
    summary["target_met"] = None if None in verdicts or not verdicts else all(verdicts)
    return summary


def run_target(
    name: str,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    out: str | Path | None = None,
    *,
    data_dir: str | None = None,
    threads: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run target ``name`` once per seed and return (and write to ``out``) the results.

    ``overrides`` change the recipe (e.g. ``limit_train`` for a smoke test); the JSON then says
    so and no check is counted as passed or failed."""
    target = get_target(name)
    overrides = dict(overrides or {})
    base = replace(target.config, data_dir=data_dir, threads=threads, **overrides)
    base.validate()
    seeds = [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
    results: list[dict[str, Any]] = []
    document: dict[str, Any] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for seed in seeds:
        log(f"{name}: seed {seed} ({len(results) + 1}/{len(seeds)})")
        report = run_compare(replace(base, seed=seed))
        if report is None:  # an MPI rank other than 0: rank 0 keeps the results
            continue
        results.append(seed_result(report))
        document = {
            "format": FORMAT, "version": VERSION, "target": name,
            "description": target.description,
            "command": command_for(name, seeds, out, overrides, data_dir, threads),
            "recipe": {k: v for k, v in report["config"].items() if k not in ("seed",)},
            "dataset": {k: report["dataset"][k] for k in ("name", "train_size", "test_size")},
            "modified": overrides, "seeds": results,
            "summary": summarize(target, results, modified=bool(overrides)),
            "environment": report["environment"], "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if out is not None:
            write_json(document, out)
        log(describe_seed(results[-1]))
    return document


def describe_seed(result: Mapping[str, Any]) -> str:
    parts = [f"seed {result['seed']}:"]
    for framework in ("numpy", "torch"):
        if framework in result:
            side = result[framework]
            parts.append(f"{framework} {100 * side['test_accuracy']:.2f}% "
                         f"({side['train_seconds']:.0f} s)")
    if "gap_pp" in result:
        parts.append(f"gap {result['gap_pp']:+.2f} pp")
    return " ".join(parts)


def write_json(document: Mapping[str, Any], path: str | Path) -> Path:
    """Write atomically: a crash never leaves a half-written results file."""
    from scratchcnn.atomic import atomic_write_text

    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read accuracy results ({error})") from None
    except UnicodeDecodeError:  # a binary file, e.g. a checkpoint given by mistake
        raise ValueError(f"{path}: not a JSON accuracy results file (it holds binary data); "
                         "make one with 'scratchcnn accuracy TARGET --out FILE'") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path}: not a scratchcnn accuracy results file; "
                         "make one with 'scratchcnn accuracy TARGET --out FILE'")
    try:
        _check_table_fields(document)
    except _Incomplete as problem:
        raise ValueError(f"{path}: not a complete accuracy results file ({problem}); "
                         "make it again with 'scratchcnn accuracy TARGET --out FILE'") from None
    return document


class _Incomplete(Exception):
    """A field that ``markdown_table`` reads is missing or of the wrong type."""


def _is_number(value: Any) -> bool:
    # bool is an int to Python but never a figure; NaN and infinity are not figures either
    # (json.loads accepts them although write_json never writes them).
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _field(parent: Mapping[str, Any], key: str, where: str, accepts: Callable[[Any], bool],
           expected: str, optional: bool = False) -> Any:
    name = f"{where}.{key}" if where else key
    if key not in parent:
        if optional:
            return None
        raise _Incomplete(f"{name} is missing")
    value = parent[key]
    if not accepts(value):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise _Incomplete(f"{name} is {shown}, not {expected}")
    return value


def _check_table_fields(document: Mapping[str, Any]) -> None:
    """Every field ``markdown_table`` reads, with its type: a file cut short or edited by hand
    is refused here, by field name, rather than failing halfway through the table."""
    def mapping(value: Any) -> bool:
        return isinstance(value, dict)

    def text(value: Any) -> bool:
        return isinstance(value, str)

    def number_or_null(value: Any) -> bool:
        return value is None or _is_number(value)

    _field(document, "target", "", text, "a target name")
    dataset = _field(document, "dataset", "", mapping, "an object")
    _field(dataset, "name", "dataset", text, "a dataset name")
    seeds = _field(document, "seeds", "", lambda v: isinstance(v, list) and v != [],
                   "a non-empty list")
    for index, result in enumerate(seeds):
        where = f"seeds[{index}]"
        if not isinstance(result, dict):
            raise _Incomplete(f"{where} is not an object")
        _field(result, "seed", where,
               lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
               "a non-negative integer")
    summary = _field(document, "summary", "", mapping, "an object")
    _field(summary, "target_met", "summary", lambda v: v is True or v is False or v is None,
           "true, false or null")
    # NumPy is always trained; PyTorch (and so the gap) may be absent, shown as "n/a".
    for framework in ("numpy", "torch"):
        side = _field(summary, framework, "summary", mapping, "an object",
                      optional=framework == "torch")
        if side is None:
            continue
        for figure in ("test_accuracy", "train_seconds"):
            where = f"summary.{framework}.{figure}"
            stats = _field(side, figure, f"summary.{framework}", mapping, "an object")
            _field(stats, "mean", where, _is_number, "a number")
            _field(stats, "std", where, number_or_null, "a number or null")
    gap = _field(summary, "gap_pp", "summary", mapping, "an object", optional=True)
    if gap is not None:
        _field(gap, "mean", "summary.gap_pp", _is_number, "a number")
        _field(gap, "std", "summary.gap_pp", number_or_null, "a number or null")


def _pct(stats: Mapping[str, Any]) -> str:
    if stats.get("mean") is None:
        return "n/a"
    spread = f" ± {100 * stats['std']:.2f}" if stats.get("std") is not None else ""
    return f"{100 * stats['mean']:.2f}{spread}%"


def markdown_table(documents: Iterable[Mapping[str, Any]]) -> str:
    """The README table: one row per results file, mean ± sample std over the seeds."""
    rows = [
        "| Target | Dataset | Seeds | NumPy accuracy | PyTorch accuracy | Gap (pp) | "
        "NumPy train time | Target met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for document in documents:
        summary = document["summary"]
        gap = summary.get("gap_pp", {})
        gap_text = (f"{gap['mean']:+.2f} ± {gap['std']:.2f}" if gap.get("std") is not None
                    else f"{gap['mean']:+.2f}" if gap.get("mean") is not None else "n/a")
        seconds = summary.get("numpy", {}).get("train_seconds", {}).get("mean")
        met = {True: "yes", False: "**no**", None: "not checked"}[summary.get("target_met")]
        seeds = ",".join(str(s["seed"]) for s in document["seeds"])
        rows.append(
            f"| {document['target']} | {document['dataset']['name']} | {seeds} | "
            f"{_pct(summary.get('numpy', {}).get('test_accuracy', {}))} | "
            f"{_pct(summary.get('torch', {}).get('test_accuracy', {}))} | {gap_text} | "
            f"{'n/a' if seconds is None else f'{seconds / 60:.1f} min'} | {met} |"
        )
    return "\n".join(rows) + "\n"
