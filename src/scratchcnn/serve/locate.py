"""Where ``scratchcnn serve`` finds its checkpoint and its compare report when not told."""

from __future__ import annotations

from pathlib import Path

# The one command that makes a checkpoint this page can use (about a minute on MNIST), and the
# one that makes a compare report; {runs} is the runs directory.
TRAIN_HINT = "scratchcnn train --epochs 1 --out {runs}/train"
COMPARE_HINT = "scratchcnn compare --out {runs}/compare"


def newest_checkpoint(runs: Path) -> Path | None:
    """The newest ``.npz`` under ``runs`` (by modification time), or None.

    ``train`` rewrites ``last.npz`` after every epoch and ``best.npz`` when the test accuracy
    improves, so the newest file is usually a ``last.npz``: the ``best.npz`` beside it is taken
    instead when there is one (the better model of the same run)."""
    if not runs.is_dir():
        return None
    candidates = [path for path in runs.rglob("*.npz") if path.is_file()]
    if not candidates:
        return None
    newest = max(candidates, key=lambda path: (path.stat().st_mtime, str(path)))
    best = newest.with_name("best.npz")
    return best if best.is_file() else newest


def newest_compare_report(runs: Path) -> Path | None:
    """The directory of the newest ``runs/compare*/report.json``, or None."""
    if not runs.is_dir():
        return None
    reports = [path for path in runs.glob("compare*/report.json") if path.is_file()]
    if not reports:
        return None
    return max(reports, key=lambda path: (path.stat().st_mtime, str(path))).parent
