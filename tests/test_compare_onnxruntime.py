"""compare's optional ONNX Runtime line: the trained NumPy model evaluated in ONNX Runtime beside
NumPy's evaluation, only when onnxruntime is installed and the run is float32."""

from __future__ import annotations

import pytest

from scratchcnn.harness import bench, compare
from scratchcnn.harness.report import render_markdown


def _run(dtype: str) -> dict:
    config = compare.CompareConfig(dataset="mnist-sample", model="tiny-cnn", epochs=1,
                                   batch_size=32, limit_train=64, limit_test=50,
                                   measure_memory=False, quiet=True, dtype=dtype,
                                   frameworks=("numpy",))
    return compare.run_compare(config)


def test_compare_evaluates_the_trained_model_in_onnxruntime_too():
    pytest.importorskip("onnxruntime")
    report = _run("float32")
    ort = report["onnxruntime"]
    assert ort["eval_seconds"] > 0 and ort["threads"] >= 1
    # The same weights: the same predictions, up to a float32 near-tie in 50 images.
    assert abs(ort["test_accuracy"] - report["frameworks"]["numpy"]["test_accuracy"]) <= 0.02
    markdown = render_markdown(report)
    line = next(line for line in markdown.splitlines() if line.startswith("ONNX Runtime"))
    assert f"{ort['version']} ({ort['threads']} thread(s)" in line
    assert "NumPy's evaluation took" in line


def test_no_onnxruntime_line_for_float64_or_without_the_package(monkeypatch):
    report = _run("float64")
    assert "onnxruntime" not in report
    assert "ONNX Runtime" not in render_markdown(report)
    monkeypatch.setattr(bench, "onnxruntime_problem", lambda dtype: "not installed")
    assert "onnxruntime" not in _run("float32")


def test_a_failed_export_is_one_line_not_a_lost_run(monkeypatch):
    pytest.importorskip("onnxruntime")

    def refuse(model, threads):
        raise ValueError("to_onnx: a layer it cannot export\nand more detail")

    monkeypatch.setattr(bench, "onnxruntime_model", refuse)
    report = _run("float32")
    assert report["onnxruntime"] == {
        "problem": "not measured: to_onnx: a layer it cannot export"}
    assert "ONNX Runtime: not measured: to_onnx: a layer it cannot export" in render_markdown(
        report)
