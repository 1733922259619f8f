"""Paired NumPy - PyTorch accuracy gaps, epoch by epoch, over every seed of some results files:

    python benchmarks/seed_gaps.py benchmarks/results/accuracy/mnist-simple-b10*.json

Each seed trains both frameworks from the same weights on the same batches, so its gap is one
paired observation. A 3-seed mean against a fixed line cannot tell a defect from the spread of
the seeds' trajectories; the gap's mean over many seeds with its standard error, at every epoch,
can: a defect in the engine would show at every epoch, chance would not. Prints a Markdown table
(mean, standard error, sample standard deviation, seeds where NumPy is behind) and the per-seed
gaps. Reads the JSON that `scratchcnn accuracy` writes; needs no data and no PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from scratchcnn.harness.accuracy import load_results


def paired_gaps(documents: Iterable[dict]) -> dict[int, list[float]]:
    """{seed: [NumPy - PyTorch test accuracy after each epoch, in percentage points]}; a seed
    in several files is refused (it would count twice)."""
    gaps: dict[int, list[float]] = {}
    for document in documents:
        for run in document["seeds"]:
            if run["seed"] in gaps:
                raise ValueError(f"seed {run['seed']} appears in more than one file")
            numpy_epochs = run["numpy"].get("accuracy_per_epoch")
            torch_epochs = (run.get("torch") or {}).get("accuracy_per_epoch")
            if not numpy_epochs or not torch_epochs or len(numpy_epochs) != len(torch_epochs):
                raise ValueError(f"seed {run['seed']}: no accuracy after each epoch for both "
                                 "frameworks (a NumPy-only or older results file?)")
            gaps[run["seed"]] = [100 * (n - t) for n, t in zip(numpy_epochs, torch_epochs,
                                                               strict=True)]
    return dict(sorted(gaps.items()))


def gap_table(gaps: dict[int, Sequence[float]]) -> str:
    epochs = min(len(per_epoch) for per_epoch in gaps.values())
    lines = [f"{len(gaps)} seeds ({', '.join(map(str, gaps))}); gap = NumPy - PyTorch, pp",
             "", "| epoch | mean gap | standard error | std | NumPy behind |",
             "|---:|---:|---:|---:|---:|"]
    for epoch in range(epochs):
        values = [per_epoch[epoch] for per_epoch in gaps.values()]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        lines.append(f"| {epoch + 1} | {statistics.mean(values):+.3f} | "
                     f"{spread / len(values) ** 0.5:.3f} | {spread:.3f} | "
                     f"{sum(value < 0 for value in values)} of {len(values)} |")
    lines += ["", "| seed | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
              "|---:|" + "---:|" * epochs]
    for seed, per_epoch in gaps.items():
        lines.append(f"| {seed} | " + " | ".join(f"{gap:+.2f}" for gap in per_epoch[:epochs])
                     + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="scratchcnn accuracy JSON files")
    args = parser.parse_args()
    try:
        print(gap_table(paired_gaps(load_results(path) for path in args.results)), end="")
    except ValueError as error:
        raise SystemExit(f"seed_gaps.py: error: {error}") from None


if __name__ == "__main__":
    main()
