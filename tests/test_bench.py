"""Tests for ``scratchcnn bench``: FLOP counts, alternation, statistics, targets, the loop
baseline and the CLI end to end. Nothing here asserts on speed."""

from __future__ import annotations

import json
from types import MappingProxyType

import numpy as np
import pytest

from scratchcnn.harness import bench, bench_report
from scratchcnn.harness.bench_report import busy_warning, check_targets, render_markdown
from scratchcnn.harness.flops import TRAINING_FACTOR, forward_flops, layer_flops, module_flops
from scratchcnn.models import MODEL_NAMES, build_model

# -- FLOP counts -------------------------------------------------------------------------------


def test_simple_cnn_flops_by_hand() -> None:
    conv1 = 2 * 1 * 3 * 3 * 16 * 28 * 28
    conv2 = 2 * 16 * 3 * 3 * 32 * 14 * 14
    fc1, fc2 = 2 * 32 * 7 * 7 * 128, 2 * 128 * 10
    rows = layer_flops("simple-cnn")
    assert [row["flops"] for row in rows if row["flops"]] == [conv1, conv2, fc1, fc2]
    assert forward_flops("simple-cnn") == conv1 + conv2 + fc1 + fc2 == 2_436_096


def test_lenet5_flops_by_hand() -> None:
    expected = (2 * 1 * 25 * 6 * 28 * 28 + 2 * 6 * 25 * 16 * 10 * 10
                + 2 * 400 * 120 + 2 * 120 * 84 + 2 * 84 * 10)
    assert forward_flops("lenet5") == expected


def test_strided_padded_conv_flops() -> None:
    # 11x11 input, kernel 3, stride 2, padding 1: (11 + 2 - 3) // 2 + 1 = 6 per side.
    spec = (("Conv2d", MappingProxyType({"in_channels": 3, "out_channels": 4, "kernel_size": 3,
                                          "stride": 2, "padding": 1})),
            ("MaxPool2d", MappingProxyType({"kernel_size": 2})),
            ("Flatten", MappingProxyType({})),
            ("Linear", MappingProxyType({"in_features": 36, "out_features": 5})))
    rows = layer_flops(spec, (3, 11, 11))
    assert rows[0]["output_shape"] == [4, 6, 6]
    assert rows[0]["flops"] == 2 * 3 * 3 * 3 * 4 * 6 * 6
    assert rows[1]["output_shape"] == [4, 3, 3]
    assert rows[2]["output_shape"] == [36]
    assert forward_flops(spec, (3, 11, 11)) == 2 * 3 * 9 * 4 * 36 + 2 * 36 * 5


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_flop_shapes_follow_the_real_model(name: str) -> None:
    model = build_model(name, rng=np.random.default_rng(0)).eval()
    x = np.zeros((1, 1, 28, 28), np.float32)
    for row, layer in zip(layer_flops(name), model._modules.values(), strict=True):
        x = layer(x)
        assert list(x.shape[1:]) == row["output_shape"], (name, row)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_built_model_flops_match_the_architecture_count(name: str) -> None:
    """Counted from a built model's layers (one sample through it), as from its layer list;
    the modules' modes and dropout generator are left as they were."""
    rng = np.random.default_rng(0)
    model = build_model(name, rng=rng)
    model[1].eval()  # a mixed state, which module_flops must restore as it was
    flags = [m.training for m in model.modules()]
    draws_before = rng.bit_generator.state
    assert module_flops(model) == forward_flops(name)
    assert [m.training for m in model.modules()] == flags
    assert rng.bit_generator.state == draws_before


def test_module_flops_of_a_strided_conv_and_a_batchnorm_after_global_pooling() -> None:
    from scratchcnn import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding="valid"), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 5))
    assert module_flops(model, (3, 11, 11)) == 2 * 3 * 9 * 4 * 25 + 2 * 100 * 5
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(6),
                           nn.BatchNorm2d(4, track_running_stats=False))
    assert module_flops(pooled, (1, 8, 8)) == 2 * 9 * 4 * 36


# -- alternation and statistics ------------------------------------------------------------------


def test_alternation_order_alternates() -> None:
    assert bench.alternation(3) == [(0, "numpy"), (0, "torch"), (1, "numpy"), (1, "torch"),
                                    (2, "numpy"), (2, "torch")]


def test_run_alternating_calls_sides_in_turn() -> None:
    calls: list[str] = []

    def run_side(side: str) -> float:
        calls.append(side)
        return float(len(calls))

    times = bench.run_alternating(3, run_side)
    assert calls == ["numpy", "torch"] * 3
    assert times == {"numpy": [1.0, 3.0, 5.0], "torch": [2.0, 4.0, 6.0]}


def test_summarize_injected_timings() -> None:
    summary = bench.summarize([1.0, 3.0, 2.0, 10.0], [2.0, 2.0, 4.0, 4.0])
    assert summary["numpy"]["median"] == 2.5 and summary["torch"]["median"] == 3.0
    assert (summary["numpy"]["min"], summary["numpy"]["max"]) == (1.0, 10.0)
    assert summary["ratio"] == pytest.approx(2.5 / 3.0)
    assert summary["round_ratios"] == pytest.approx([0.5, 1.5, 0.5, 2.5])
    assert summary["median_round_ratio"] == pytest.approx(1.0)
    assert summary["numpy"]["rounds"] == [1.0, 3.0, 2.0, 10.0]
    with pytest.raises(ValueError, match="same"):
        bench.summarize([1.0], [1.0, 2.0])


def test_summarize_with_onnxruntime_adds_its_side_and_both_ratios_to_it() -> None:
    summary = bench.summarize([2.0, 4.0, 3.0], [8.0, 8.0, 6.0], [1.0, 2.0, 2.0])
    assert summary["ratio"] == pytest.approx(3.0 / 8.0)  # NumPy/PyTorch unchanged
    assert summary["onnxruntime"]["median"] == 2.0
    assert summary["onnxruntime"]["rounds"] == [1.0, 2.0, 2.0]
    versus = summary["numpy_vs_onnxruntime"]
    assert versus["ratio"] == pytest.approx(1.5)
    assert versus["round_ratios"] == pytest.approx([2.0, 2.0, 1.5])
    assert versus["median_round_ratio"] == pytest.approx(2.0)
    assert summary["torch_vs_onnxruntime"]["ratio"] == pytest.approx(4.0)
    assert "onnxruntime" not in bench.summarize([1.0], [2.0])
    with pytest.raises(ValueError, match="same"):
        bench.summarize([1.0], [1.0], [1.0, 2.0])


def test_run_alternating_with_three_sides() -> None:
    calls: list[str] = []
    bench.run_alternating(2, lambda side: calls.append(side) or 1.0,
                          (*bench.SIDES, bench.ONNX_RUNTIME))
    assert calls == ["numpy", "torch", "onnxruntime"] * 2


def test_onnxruntime_problem_names_the_install_and_float64(monkeypatch) -> None:
    import importlib.util

    assert bench.onnxruntime_problem(np.dtype(np.float32)) is None  # installed for the tests
    assert "float64" in bench.onnxruntime_problem(np.dtype(np.float64))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    problem = bench.onnxruntime_problem(np.dtype(np.float32))
    assert "not installed" in problem and "pip install 'scratchcnn[onnx]'" in problem


def test_onnxruntime_side_computes_the_numpy_models_logits(rng) -> None:
    pytest.importorskip("onnxruntime")
    from scratchcnn import nn

    model = build_model("simple-cnn", rng=np.random.default_rng(0)).eval()
    side = bench.onnxruntime_model(model, threads=1)
    x = rng.standard_normal((7, 1, 28, 28)).astype(np.float32)
    with nn.no_grad():
        expected = model(x)
    assert side.eval() is side
    np.testing.assert_allclose(side(x), expected, rtol=1e-4, atol=1e-5)


def test_round_batches_are_deterministic_and_cover_distinct_indices() -> None:
    first = bench.round_batches(100, 8, 5, seed=3)
    again = bench.round_batches(100, 8, 5, seed=3)
    other = bench.round_batches(100, 8, 5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    flat = np.concatenate(first)
    assert [len(b) for b in first] == [8] * 5 and len(np.unique(flat)) == 40
    # Smaller pool than needed: indices cycle but stay in range.
    assert np.concatenate(bench.round_batches(10, 8, 3, seed=0)).max() < 10


def _fake_report(ratios: dict[int, float], inference: float, memory_ratio: float | None,
                 model: str = "simple-cnn") -> dict:
    side = {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": [1.0], "epoch_seconds": 10.0,
            "gflops": 1.0}
    return {"models": [{
        "model": model, "forward_flops_per_image": 2_436_096,
        "training": [{"batch_size": b, "ratio": r, "round_ratios": [r], "numpy": side,
                      "torch": side} for b, r in ratios.items()],
        "inference": {"ratio": inference, "round_ratios": [inference],
                      "median_round_ratio": inference, "numpy": side,
                      "torch": side, "images": 100, "eval_batch_size": 1000},
        "memory": {"training": [{"batch_size": 64, "numpy": 5.0, "torch": 6.0,
                                 "ratio": memory_ratio}], "inference": None},
    }]}


def test_targets_met_and_not_met() -> None:
    report = _fake_report({10: 1.0, 64: 0.9, 256: 0.5}, inference=0.4, memory_ratio=1.2)
    status = {t["target"]: t["met"] for t in check_targets(report)}
    assert status == {
        "simple-cnn training batch 10": True, "simple-cnn training batch 64": False,
        "simple-cnn training batch 256": True, "simple-cnn inference": True,
        "simple-cnn training memory batch 64": False,
    }
    other = check_targets(_fake_report({64: 1.2}, inference=1.6, memory_ratio=None,
                                       model="lenet5"))
    assert other == [{"target": "lenet5 worst ratio", "value": 1.6, "limit": 1.5, "met": False}]


def test_onnxruntime_targets_and_markdown() -> None:
    report = _fake_report({64: 0.8}, inference=0.3, memory_ratio=None)
    inference = report["models"][0]["inference"]
    side = {"median": 0.2, "min": 0.2, "max": 0.2, "rounds": [0.2], "gflops": 2.0}
    inference.update(onnxruntime=side,
                     numpy_vs_onnxruntime={"ratio": 1.6, "round_ratios": [1.6],
                                           "median_round_ratio": 1.6},
                     torch_vs_onnxruntime={"ratio": 5.0, "round_ratios": [5.0],
                                           "median_round_ratio": 5.0})
    status = {t["target"]: (t["value"], t["met"]) for t in check_targets(report)}
    assert status["simple-cnn inference vs ONNX Runtime"] == (1.6, False)
    lines = bench_report._inference_lines(inference, lambda value: f"{value:.1f}")
    assert "| ONNX Runtime | 0.200 s (0.200 s-0.200 s) | 2.0 |" in lines
    assert any(line.startswith("| NumPy / ONNX Runtime | **1.60** |") for line in lines)
    assert any(line.startswith("| PyTorch / ONNX Runtime | **5.00** |") for line in lines)
    del inference["onnxruntime"], inference["numpy_vs_onnxruntime"]
    assert "simple-cnn inference vs ONNX Runtime" not in {
        t["target"] for t in check_targets(report)}
    assert not any("ONNX" in line for line in bench_report._inference_lines(inference, str))
    assert bench_report._onnxruntime_line({"version": "1.0", "problem": "not installed (x)"}) \
        == "- ONNX Runtime: not installed (x)"


# -- textbook loop baseline ----------------------------------------------------------------------


def test_loop_baseline_matches_vectorised_model(rng: np.random.Generator) -> None:
    from scratchcnn import nn
    from scratchcnn.harness.loop_baseline import _LoopSequential

    x = rng.standard_normal((2, 1, 28, 28))
    y = np.array([3, 7])
    model = build_model("tiny-cnn", dtype=np.float64, rng=np.random.default_rng(1))
    criterion = nn.CrossEntropyLoss()
    expected_logits = model(x)
    criterion(expected_logits, y)
    model.backward(criterion.backward())
    expected = {name: p.grad.copy() for name, p in model.named_parameters()}
    model.zero_grad()
    loops = _LoopSequential(model)
    logits = loops.forward(x)
    # (Not model(x) here: it would replace the layers' caches the loop backward reads.)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-10, atol=1e-12)
    criterion(logits, y)
    loops.backward(criterion.backward())
    for name, param in model.named_parameters():
        np.testing.assert_allclose(param.grad, expected[name], rtol=1e-9, atol=1e-12,
                                   err_msg=name)


# -- CLI -----------------------------------------------------------------------------------------


def test_threads_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from scratchcnn.cli import CommandError
    from scratchcnn.cli.bench import resolve_threads

    monkeypatch.setenv("SCRATCHCNN_NUM_THREADS", "1")
    assert resolve_threads(None) == 1
    assert resolve_threads(2) == 2
    monkeypatch.setenv("SCRATCHCNN_NUM_THREADS", "two")
    with pytest.raises(CommandError, match="SCRATCHCNN_NUM_THREADS"):
        resolve_threads(None)
    monkeypatch.delenv("SCRATCHCNN_NUM_THREADS")
    assert resolve_threads(None) is None


@pytest.mark.parametrize("arguments", [["--batch-sizes", "0,4"], ["--model", "resnet"],
                                       ["--rounds", "0"]])
def test_cli_rejects_bad_options(arguments: list[str], capsys) -> None:
    from scratchcnn.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["bench", *arguments])
    assert exited.value.code == 2
    assert "bench" in capsys.readouterr().err


def test_cli_end_to_end(tmp_path, capsys, torch) -> None:
    from scratchcnn.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--model", "tiny-cnn", "--rounds", "1", "--steps", "2",
                 "--batch-sizes", "8", "--inference-images", "200", "--dataset", "random",
                 "--threads", "1", "--reference-images", "1", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "bench.json").read_text())
    markdown = (out / "bench.md").read_text()
    assert markdown.strip() in printed
    assert report["environment"]["threads"] == 1
    assert report["dataset"]["synthetic"] is True
    peak = report["matmul_peak"]
    assert len(peak["measurements_gflops"]) == 2
    assert peak["gflops"] == max(peak["measurements_gflops"]) > 0
    (model,) = report["models"]
    assert model["model"] == "tiny-cnn"
    assert model["forward_flops_per_image"] == forward_flops("tiny-cnn")
    (train,) = model["training"]
    assert train["batch_size"] == 8 and train["steps_per_epoch"] == 7500
    for side in ("numpy", "torch"):
        assert len(train[side]["rounds"]) == 1
        assert train[side]["epoch_seconds"] == pytest.approx(train[side]["median"] * 7500)
        flops = TRAINING_FACTOR * forward_flops("tiny-cnn") * 8
        assert train[side]["gflops"] == pytest.approx(flops / train[side]["median"] / 1e9)
    assert train["ratio"] == pytest.approx(train["numpy"]["median"] / train["torch"]["median"])
    inference = model["inference"]
    assert inference["images"] == 200 and len(inference["round_ratios"]) == 1
    if report["onnxruntime"]["problem"] is None:  # installed: the third side, its two ratios
        assert len(inference["onnxruntime"]["rounds"]) == 1
        for versus in ("numpy_vs_onnxruntime", "torch_vs_onnxruntime"):
            assert inference[versus]["ratio"] > 0
        assert "| NumPy / ONNX Runtime |" in markdown
        assert "tiny-cnn" in report["one_process"]["model"]
        assert "numpy_vs_onnxruntime" in report["one_process"]["inference"]
    memory = model["memory"]
    assert [e["batch_size"] for e in memory["training"]] == [8]
    for entry in [*memory["training"], memory["inference"]]:
        assert entry["numpy"] is not None and entry["torch"] is not None
    loops = model["reference_loops"]
    assert loops["images"] == 1
    assert loops["inference_seconds"] == pytest.approx(loops["forward_seconds_per_image"] * 200)
    assert loops["epoch_seconds"] == pytest.approx(loops["train_seconds_per_image"] * 60_000)
    assert [t["target"] for t in report["targets"]] == ["tiny-cnn worst ratio"]
    for heading in ("## tiny-cnn", "### Training", "### Inference of 200 images",
                    "### Peak memory", "### Textbook loops", "## Targets"):
        assert heading in markdown
    assert render_markdown(report) == markdown
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries


def test_load_images_random_and_sample() -> None:
    config = bench.BenchConfig(dataset="random", inference_images=30, seed=5)
    train_x, train_y, test_x, test_y, info = bench.load_images(config, np.dtype(np.float64), 20)
    assert train_x.shape == (20, 1, 28, 28) and test_x.shape == (30, 1, 28, 28)
    assert train_x.dtype == test_x.dtype == np.float64 and train_y.dtype == np.int64
    assert info["synthetic"] is True and set(np.unique(test_y)) <= set(range(10))
    # MNIST's normalisation maps pixel 0 to -mean/std and 255 to (1 - mean)/std.
    assert train_x.min() >= -0.1307 / 0.3081 - 1e-9 and train_x.max() <= 0.8693 / 0.3081 + 1e-9
    again = bench.load_images(config, np.dtype(np.float64), 20)
    assert np.array_equal(again[0], train_x)

    sample = bench.BenchConfig(dataset="mnist-sample", inference_images=7000)
    train_x, train_y, test_x, test_y, info = bench.load_images(sample, np.dtype(np.float32), 50)
    assert info["synthetic"] is False and info["name"] == "mnist-sample"
    assert len(train_y) == 50 and len(test_y) == 7000 and test_x.dtype == np.float32


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="rounds"):
        bench.BenchConfig(rounds=0).validate()
    with pytest.raises(ValueError, match="batch sizes"):
        bench.BenchConfig(batch_sizes=()).validate()
    with pytest.raises(ValueError, match="dataset"):
        bench.BenchConfig(dataset="cifar").validate()


def test_busy_machine_warning() -> None:
    assert busy_warning({"start": [0.3, 0.2, 0.1], "end": [2.4, 1.0, 0.5]}, cores=2) is None
    assert "busy" in busy_warning({"start": [1.8, 1.0, 0.5], "end": [2.4, 1.0, 0.5]}, cores=2)
    assert "6.41 at end" in busy_warning({"start": [0.5, 0, 0], "end": [6.41, 5, 3]}, cores=2)


def test_load_lines_without_a_load_average() -> None:
    # A system without os.getloadavg: the report says so instead of failing to render.
    from scratchcnn.harness.bench_report import _load_lines

    assert _load_lines({"start": None, "end": None}, cores=2) == [
        "- load average: not available on this system"]
    busy = _load_lines({"start": [1.8, 1.0, 0.5], "end": [2.4, 1.0, 0.5]}, cores=2)
    assert busy[0] == ("- load average (1/5/15 min) at start 1.80, 1.00, 0.50, "
                       "at end 2.40, 1.00, 0.50")
    assert "busy" in busy[1]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matmul_peak_is_measured_in_the_runs_dtype(monkeypatch, dtype) -> None:
    """"% of peak" compares a run's GFLOP/s with products of its own dtype (float64 ones run at
    about half float32's rate)."""
    from scratchcnn.harness import flops

    measured = []

    def peak(*, dtype):
        measured.append(np.dtype(dtype))
        return {"gflops": 100.0 + len(measured), "size": 8, "dtype": str(np.dtype(dtype))}

    monkeypatch.setattr(flops, "matmul_peak_gflops", peak)
    monkeypatch.setattr(bench, "bench_model", lambda *args: {})
    config = bench.BenchConfig(models=("tiny-cnn",), dtype=dtype, dataset="random", threads=1,
                               batch_sizes=(8,), steps=1, quiet=True)
    report = bench.run_bench(config)
    assert measured == [np.dtype(dtype)] * 2
    assert report["matmul_peak"]["dtype"] == dtype and report["matmul_peak"]["gflops"] == 102.0


def test_scaling_compares_one_process_with_the_ranks_at_the_same_batch() -> None:
    from scratchcnn.harness.bench import scaling

    one = {"training": [{"batch_size": 64, "numpy": {"median": 0.012}}]}
    ranked = {"model": "simple-cnn", "ranks": 2, "training": [
        {"batch_size": 10, "numpy": {"median": 0.002}},
        {"batch_size": 64, "numpy": {"median": 0.008}}]}
    result = scaling(one, ranked)
    assert result["speedup"] == pytest.approx(1.5)
    assert result["efficiency"] == pytest.approx(0.75)
    assert scaling(one, {**ranked, "training": ranked["training"][:1]}) is None
