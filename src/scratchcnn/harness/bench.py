"""``scratchcnn bench``: NumPy vs PyTorch speed on the same model, weights, batches and threads.

Fairness rules: both sides start from identical weights (``torch_twin``), train with Adam
(lr 1e-3) on the same index batches through ``harness.training.train_epoch`` / ``evaluate`` (the
plain loop a user writes, so every engine speed-up shows here), use the same cores, warm up
before timing, and alternate rounds NumPy, PyTorch, NumPy, PyTorch... so slow drifts of machine
load hit both sides. Each round gives one time per side; we report median and min-max per side,
the ratio of the medians NumPy/PyTorch (< 1: NumPy faster) and the per-round ratios.

Three parts, measured in one run: one process with one thread each (the plain loop against
PyTorch on one thread: training at batch 64 and inference); N ranks against N threads (the NumPy
side as N MPI ranks with DistributedDataParallel, PyTorch on rank 0 with N threads while the
other ranks wait, asleep), every model and batch size; and the scaling of NumPy's step from one
process to N ranks. Rank 0 times and reports.

Inference has a third side when ONNX Runtime is installed: the practitioner's CPU inference
engine, on the same weights (exported by ``formats.onnx.to_onnx``), images, batches and thread
count (its ``intra_op_num_threads``; on rank 0 while the other ranks wait, like PyTorch), run
through the same ``evaluate`` loop, alternating NumPy, PyTorch, ONNX Runtime. Its ratios
NumPy/ONNX Runtime and PyTorch/ONNX Runtime are reported beside NumPy/PyTorch. Without it (or
for a float64 run: ONNX Runtime has no float64 convolution) the side is left out and the report
says why in one line.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from scratchcnn.data.preprocessing import MNIST_MEAN, MNIST_STD
from scratchcnn.harness import ranks, training
from scratchcnn.harness.flops import TRAINING_FACTOR, forward_flops, gflops_per_second
from scratchcnn.harness.measure import Stopwatch, measure_in_subprocess
from scratchcnn.harness.threads import apply_threads
from scratchcnn.models import build_model

SIDES = ("numpy", "torch")
ONNX_RUNTIME = "onnxruntime"  # the third side of inference, when installed
EPOCH_IMAGES = 60_000  # MNIST's training set: one epoch-equivalent
DATASET_CHOICES = ("mnist", "fashion-mnist", "mnist-sample", "random")


@dataclass
class BenchConfig:
    models: tuple[str, ...] = ("simple-cnn", "bn-cnn")
    batch_sizes: tuple[int, ...] = (10, 64, 256)   # the first model's; the others: 64
    other_batch_sizes: tuple[int, ...] = (64,)
    single_batch_size: int = 64                    # the one-process, one-thread part
    rounds: int = 5
    steps: int = 30
    warmup_steps: int = 3
    inference_images: int = 10_000
    eval_batch_size: int = 1000
    dtype: str = "float32"
    threads: int | None = None
    dataset: str | None = None  # None: local MNIST if present, else random
    data_dir: str | None = None
    seed: int = 0
    lr: float = 1e-3
    memory: bool = True
    memory_steps: int = 3
    reference: bool = True
    reference_images: int = 2
    quiet: bool = False

    def validate(self) -> None:
        for name in ("rounds", "steps", "inference_images", "eval_batch_size", "memory_steps",
                     "reference_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench: {name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"bench: warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"bench: batch sizes must be positive, got {self.batch_sizes}")
        if self.dataset is not None and self.dataset not in DATASET_CHOICES:
            raise ValueError(f"bench: unknown dataset {self.dataset!r}; choose one of "
                             f"{', '.join(DATASET_CHOICES)}")


# -- statistics --------------------------------------------------------------------------------

def alternation(rounds: int, sides: Sequence[str] = SIDES) -> list[tuple[int, str]]:
    """The order of timed runs: (round, side) for round 0..rounds-1, sides in turn each round."""
    return [(round_index, side) for round_index in range(rounds) for side in sides]


def run_alternating(rounds: int, run_side: Callable[[str], float],
                    sides: Sequence[str] = SIDES) -> dict[str, list[float]]:
    """Call ``run_side(side)`` in ``alternation`` order; returns each side's times in order."""
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _, side in alternation(rounds, sides):
        times[side].append(run_side(side))
    return times


def _side(times: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "rounds": list(times)}


def compare_times(times: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """The ratio of medians ``times`` / ``baseline``, the per-round ratios (each round's time
    over the baseline's in the same round) and their median."""
    if len(times) != len(baseline) or not times:
        raise ValueError("summarize: both sides need the same, non-zero number of rounds")
    per_round = [a / b for a, b in zip(times, baseline, strict=True)]
    return {"ratio": statistics.median(times) / statistics.median(baseline),
            "round_ratios": per_round, "median_round_ratio": statistics.median(per_round)}


def summarize(numpy_times: Sequence[float], torch_times: Sequence[float],
              onnxruntime_times: Sequence[float] | None = None) -> dict[str, Any]:
    """Medians, min-max per side, the ratio of medians NumPy/PyTorch and per-round ratios; with
    ONNX Runtime's times, its side and the ratios NumPy/ONNX Runtime and PyTorch/ONNX Runtime
    (``numpy_vs_onnxruntime``, ``torch_vs_onnxruntime``)."""
    summary = {"numpy": _side(numpy_times), "torch": _side(torch_times),
               **compare_times(numpy_times, torch_times)}
    if onnxruntime_times is not None:
        summary[ONNX_RUNTIME] = _side(onnxruntime_times)
        summary["numpy_vs_onnxruntime"] = compare_times(numpy_times, onnxruntime_times)
        summary["torch_vs_onnxruntime"] = compare_times(torch_times, onnxruntime_times)
    return summary


# -- data --------------------------------------------------------------------------------------

def load_images(config: BenchConfig, dtype: np.dtype, pool_size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(train_x, train_y, test_x, test_y, description). Real data when asked for or found
    locally (never downloaded unless --dataset names it); else seeded uniform random uint8
    images, normalised like MNIST, with random labels."""
    from scratchcnn.data import DatasetError, load_dataset, locate_dataset, normalize

    name = config.dataset
    if name is None and locate_dataset("mnist", config.data_dir) is not None:
        name = "mnist"
    if name is not None and name != "random":
        try:
            data = load_dataset(name, config.data_dir, download=config.dataset is not None)
        except (DatasetError, OSError) as error:
            raise ValueError(f"bench: dataset {name!r} could not be loaded: {error}") from None

        def fit(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            repeats = math.ceil(n / len(labels))  # the small sample is tiled to the size asked
            return (np.tile(images, (repeats, 1, 1, 1))[:n], np.tile(labels, repeats)[:n])

        train_u8, train_y = fit(data.train_images, data.train_labels, pool_size)
        test_u8, test_y = fit(data.test_images, data.test_labels, config.inference_images)
        info = {"name": name, "source": str(data.source), "synthetic": False}
    else:
        rng = np.random.default_rng(config.seed)
        train_u8 = rng.integers(0, 256, (pool_size, 1, 28, 28), dtype=np.uint8)
        test_u8 = rng.integers(0, 256, (config.inference_images, 1, 28, 28), dtype=np.uint8)
        train_y = rng.integers(0, 10, pool_size).astype(np.int64)
        test_y = rng.integers(0, 10, config.inference_images).astype(np.int64)
        info = {"name": "random", "source": "uniform random uint8 pixels (seeded), "
                "normalised with MNIST's mean/std; timings barely depend on pixel values",
                "synthetic": True}
    train_x = normalize(train_u8, MNIST_MEAN, MNIST_STD, dtype=dtype)
    test_x = normalize(test_u8, MNIST_MEAN, MNIST_STD, dtype=dtype)
    return train_x, np.asarray(train_y, np.int64), test_x, np.asarray(test_y, np.int64), info


def round_batches(pool_size: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` index batches drawn without replacement (cycling) from a seeded permutation."""
    order = np.random.default_rng(seed).permutation(pool_size)
    needed = np.resize(order, steps * batch_size)
    return [needed[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


# -- one model ---------------------------------------------------------------------------------

def _log(config: BenchConfig, message: str) -> None:
    if not config.quiet:
        print(message, file=sys.stderr, flush=True)


def _build_sides(model_name: str, config: BenchConfig, dtype: np.dtype, ranked: bool
                 ) -> dict[str, Any]:
    """Both models (PyTorch's on rank 0 only); NumPy's prepared for the ranks when ``ranked``."""
    numpy_model = build_model(model_name, dtype=dtype, rng=np.random.default_rng(config.seed))
    models: dict[str, Any] = {"numpy": numpy_model, "torch": None}
    if ranks.is_main():
        from scratchcnn.reference.torch_models import torch_twin

        models["torch"] = torch_twin(numpy_model, model_name)
    if ranked:
        models["numpy"] = ranks.distribute(numpy_model, config.seed)
    return models


def _on_its_ranks(side: str, ranked: bool, work: Callable[[], Any]) -> float:
    """Seconds ``work()`` took: NumPy's with ``ranked`` on every rank (started together),
    otherwise on rank 0 while the other ranks wait. Rank 0's time counts; the others return
    a placeholder."""
    def timed() -> float:
        with Stopwatch() as watch:
            work()
        return watch.seconds

    if side == "numpy" and ranked:
        ranks.barrier()
        return timed()
    return ranks.only_main(timed) or 1.0


def _torch_threads(count: int) -> None:
    if ranks.is_main():
        import torch

        torch.set_num_threads(count)


def bench_training(model_name: str, config: BenchConfig, dtype: np.dtype, images: np.ndarray,
                   labels: np.ndarray, batch_size: int, ranked: bool = True) -> dict[str, Any]:
    """Training steps, NumPy (as the ranks when ``ranked``, else one process on rank 0)
    against PyTorch (rank 0, with the torch threads set by the caller)."""
    models = _build_sides(model_name, config, dtype, ranked)
    optimizers = {side: training.make_optimizer(side, model.parameters(), "adam", config.lr)
                  for side, model in models.items() if model is not None}
    warmup = round_batches(len(labels), batch_size, max(config.warmup_steps, 1), config.seed)
    for side in SIDES:
        _on_its_ranks(side, ranked, lambda side=side: training.train_epoch(
            side, models[side], optimizers[side], images, labels, warmup, epoch=0))
    round_counter = {side: 0 for side in SIDES}

    def run_side(side: str) -> float:
        round_counter[side] += 1
        batches = round_batches(len(labels), batch_size, config.steps,
                                config.seed + round_counter[side])
        seconds = _on_its_ranks(side, ranked, lambda: training.train_epoch(
            side, models[side], optimizers[side], images, labels, batches,
            epoch=round_counter[side]))
        return seconds / config.steps

    times = run_alternating(config.rounds, run_side)
    summary = summarize(times["numpy"], times["torch"])
    steps_per_epoch = math.ceil(EPOCH_IMAGES / batch_size)
    flops = TRAINING_FACTOR * forward_flops(model_name) * batch_size
    for side in SIDES:
        median = summary[side]["median"]
        summary[side]["epoch_seconds"] = median * steps_per_epoch
        summary[side]["gflops"] = gflops_per_second(flops, median)
    summary.update(batch_size=batch_size, steps=config.steps, steps_per_epoch=steps_per_epoch,
                   unit="seconds per step")
    return summary


# -- ONNX Runtime ------------------------------------------------------------------------------

class OnnxRuntimeModel:
    """An ONNX Runtime session behind the calls ``training.evaluate`` makes on a NumPy model
    (``eval()``, then ``model(batch)`` for logits), so that its side runs the very same loop."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def eval(self) -> OnnxRuntimeModel:
        return self

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]


def onnxruntime_problem(dtype: np.dtype) -> str | None:
    """Why ONNX Runtime cannot be a side of this run (one line), or None when it can."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"not installed ({' and '.join(missing)} missing; pip install "
                "'scratchcnn[onnx]'): its side is left out")
    if np.dtype(dtype) != np.float32:
        return f"left out: it has no {np.dtype(dtype)} convolution"
    return None


def onnxruntime_model(model: Any, threads: int) -> OnnxRuntimeModel:
    """``model`` (a NumPy model, possibly inside DistributedDataParallel) exported with
    ``to_onnx`` and loaded in ONNX Runtime's CPU provider with ``threads`` intra-op threads and
    one inter-op thread (a chain of layers has no parallel branches); otherwise its defaults."""
    import onnxruntime

    from scratchcnn.formats.onnx import to_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    graph = to_onnx(ranks.unwrapped(model)).SerializeToString()
    return OnnxRuntimeModel(onnxruntime.InferenceSession(
        graph, options, providers=["CPUExecutionProvider"]))


def bench_inference(model_name: str, config: BenchConfig, dtype: np.dtype, images: np.ndarray,
                    labels: np.ndarray, ranked: bool = True, threads: int = 1) -> dict[str, Any]:
    """Inference of every image in batches of ``config.eval_batch_size`` through
    ``training.evaluate``: NumPy (as the ranks when ``ranked``) against PyTorch and, when
    available, ONNX Runtime with ``threads`` threads (both on rank 0)."""
    models = _build_sides(model_name, config, dtype, ranked)
    sides: tuple[str, ...] = SIDES
    if onnxruntime_problem(dtype) is None:
        sides = (*SIDES, ONNX_RUNTIME)
        models[ONNX_RUNTIME] = (onnxruntime_model(models["numpy"], threads) if ranks.is_main()
                                else None)
    # ONNX Runtime's model takes evaluate's NumPy path: eval(), then a call per batch.
    framework = {"numpy": "numpy", "torch": "torch", ONNX_RUNTIME: "numpy"}
    warm = slice(0, min(len(labels), config.eval_batch_size))
    for side in sides:
        _on_its_ranks(side, ranked, lambda side=side: training.evaluate(
            framework[side], models[side], images[warm], labels[warm],
            batch_size=config.eval_batch_size))

    def run_side(side: str) -> float:
        return _on_its_ranks(side, ranked, lambda: training.evaluate(
            framework[side], models[side], images, labels, batch_size=config.eval_batch_size))

    times = run_alternating(config.rounds, run_side, sides)
    summary = summarize(times["numpy"], times["torch"], times.get(ONNX_RUNTIME))
    flops = forward_flops(model_name) * len(labels)
    for side in sides:
        summary[side]["gflops"] = gflops_per_second(flops, summary[side]["median"])
    summary.update(images=len(labels), eval_batch_size=config.eval_batch_size,
                   unit="seconds for all images")
    return summary


def bench_reference(model_name: str, config: BenchConfig, dtype: np.dtype, images: np.ndarray,
                    labels: np.ndarray) -> dict[str, Any]:
    from scratchcnn.harness.loop_baseline import time_loop_baseline

    model = build_model(model_name, dtype=dtype, rng=np.random.default_rng(config.seed))
    optimizer = training.make_optimizer("numpy", model.parameters(), "adam", config.lr)
    n = config.reference_images
    result = time_loop_baseline(model, optimizer, images[:n], labels[:n])
    result["inference_seconds"] = result["forward_seconds_per_image"] * config.inference_images
    result["epoch_seconds"] = result["train_seconds_per_image"] * EPOCH_IMAGES
    result["inference_images"] = config.inference_images
    return result


# -- memory (subprocesses) -------------------------------------------------------------------

def memory_probe(payload: dict[str, Any], window) -> dict[str, Any]:
    """Runs in a fresh process (``measure.measure_in_subprocess``): build one side's model, then
    inside the window either train for a few steps or run inference on the saved images."""
    side = payload["side"]
    # The C library's default allocator, always: keeping freed memory (allocator.py) raises
    # the peak of whichever side fragments more (PyTorch's inference by ~60%).
    world = ranks.world_size()
    apply_threads(payload["threads"], torch=side == "torch", keep_memory=False,
                  blas=1 if world > 1 else None)
    with np.load(payload["data"], allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    model = build_model(payload["model"], dtype=np.dtype(payload["dtype"]),
                        rng=np.random.default_rng(payload["seed"]))
    if side == "torch":
        from scratchcnn.reference.torch_models import torch_twin

        model = torch_twin(model, payload["model"])
    else:
        model = ranks.distribute(model, payload["seed"])
    with window():
        if payload["task"] == "train":
            batch = payload["batch_size"]
            batches = [np.arange(i * batch, (i + 1) * batch) for i in range(payload["steps"])]
            optimizer = training.make_optimizer(side, model.parameters(), "adam", payload["lr"])
            training.train_epoch(side, model, optimizer, images, labels, batches, epoch=1)
        else:
            training.evaluate(side, model, images, labels,
                              batch_size=payload["eval_batch_size"])
    return {"task": payload["task"], "images": len(labels)}


def bench_memory(model_name: str, config: BenchConfig, threads: int, world: int,
                 train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray) -> dict[str, Any]:
    """Peak RSS above the post-setup baseline, per side, for training at each batch size and for
    inference, each in its own subprocess (NumPy's as ``world`` ranks: the sum of their
    peaks)."""
    results: dict[str, Any] = {"training": [], "inference": None}
    base = {"model": model_name, "dtype": config.dtype, "seed": config.seed, "lr": config.lr,
            "threads": threads, "eval_batch_size": config.eval_batch_size,
            "steps": config.memory_steps}
    with tempfile.TemporaryDirectory(prefix="scratchcnn-bench-") as tmp:
        tasks = []
        for batch_size in config.batch_sizes:
            n = batch_size * config.memory_steps
            path = Path(tmp) / f"train{batch_size}.npz"
            np.savez(path, images=np.resize(train_x, (n, *train_x.shape[1:])),
                     labels=np.resize(train_y, n))
            tasks.append(("train", batch_size, path))
        path = Path(tmp) / "inference.npz"
        np.savez(path, images=test_x, labels=test_y)
        tasks.append(("inference", None, path))
        for task, batch_size, path in tasks:
            entry: dict[str, Any] = {"batch_size": batch_size}
            for side in SIDES:
                payload = {**base, "side": side, "task": task, "batch_size": batch_size,
                           "data": str(path)}
                try:
                    probe = measure_in_subprocess("scratchcnn.harness.bench:memory_probe",
                                                  payload, ranks=world if side == "numpy" else 1)
                    entry[side] = probe["peak_mb"]
                    entry["method"] = probe["method"]
                except (RuntimeError, OSError) as error:
                    _log(config, f"warning: peak memory of {side} ({task}) not measured: {error}")
                    entry[side] = None
            if entry["numpy"] is not None and entry["torch"]:
                entry["ratio"] = entry["numpy"] / entry["torch"]
            if task == "train":
                results["training"].append(entry)
            else:
                entry["images"] = len(test_y)
                results["inference"] = entry
    return results


# -- the whole run -----------------------------------------------------------------------------

def bench_model(model_name: str, config: BenchConfig, threads: int, dtype: np.dtype,
                data: tuple[np.ndarray, ...], batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """N ranks against N threads (one process each when N = 1): training at ``batch_sizes``,
    inference, peak memory and the textbook loops (those two started by rank 0)."""
    train_x, train_y, test_x, test_y = data
    world = ranks.world_size()
    result: dict[str, Any] = {"model": model_name, "forward_flops_per_image":
                              forward_flops(model_name), "training": [], "ranks": world}
    for batch_size in batch_sizes:
        _log(config, f"[{model_name}] training, batch {batch_size}: {config.rounds} rounds x "
                     f"{config.steps} steps per side")
        result["training"].append(
            bench_training(model_name, config, dtype, train_x, train_y, batch_size))
    _log(config, f"[{model_name}] inference of {len(test_y)} images: {config.rounds} rounds")
    result["inference"] = bench_inference(model_name, config, dtype, test_x, test_y,
                                          threads=threads)
    if config.memory:
        _log(config, f"[{model_name}] peak memory (one subprocess per side and task)")
        result["memory"] = ranks.only_main(
            lambda: bench_memory(model_name, config, threads, world, *data))
    if config.reference:
        _log(config, f"[{model_name}] textbook loops on {config.reference_images} images")
        result["reference_loops"] = ranks.only_main(
            lambda: bench_reference(model_name, config, dtype, test_x, test_y))
    return result


def bench_one_process(model_name: str, config: BenchConfig, dtype: np.dtype,
                      data: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """One process with one thread each, on rank 0: the plain loop against PyTorch on one
    thread, training at ``config.single_batch_size`` and inference."""
    train_x, train_y, test_x, test_y = data
    _torch_threads(1)
    limiter = None
    if ranks.world_size() == 1:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=1, user_api="blas")
    try:
        _log(config, f"[{model_name}] one process, one thread each: training at batch "
                     f"{config.single_batch_size}, inference")
        training_result = bench_training(model_name, config, dtype, train_x, train_y,
                                         config.single_batch_size, ranked=False)
        inference = bench_inference(model_name, config, dtype, test_x, test_y, ranked=False,
                                    threads=1)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    return {"model": model_name, "threads": 1, "training": [training_result],
            "forward_flops_per_image": forward_flops(model_name),
            "inference": inference}


def scaling(one_process: dict[str, Any], model: dict[str, Any]) -> dict[str, Any] | None:
    """NumPy's training step in one process against N ranks at the same batch size: speed-up
    and efficiency (speed-up / N)."""
    single = one_process["training"][0]
    ranked = next((t for t in model.get("training", [])
                   if t["batch_size"] == single["batch_size"]), None)
    if ranked is None:
        return None
    one, many = single["numpy"]["median"], ranked["numpy"]["median"]
    count = model.get("ranks", 1)
    return {"model": model["model"], "batch_size": single["batch_size"], "ranks": count,
            "one_process_seconds": one, "ranks_seconds": many, "speedup": one / many,
            "efficiency": one / many / count}


def run_bench(config: BenchConfig) -> dict[str, Any] | None:
    """Benchmark every model of ``config``; returns the report (see ``bench_report``) on rank 0,
    None on the other ranks."""
    from scratchcnn.harness.environment import describe_environment, load_average
    from scratchcnn.harness.flops import best_peak, matmul_peak_gflops
    from scratchcnn.nn.module import as_float_dtype

    config.validate()
    dtype = as_float_dtype(config.dtype)
    world = ranks.world_size()
    if world > 1:
        threads = apply_threads(world, torch=ranks.is_main(), blas=1)
    else:
        threads = apply_threads(config.threads)
    if not ranks.is_main():
        config = replace(config, quiet=True)
    load_before = load_average()
    pool = max(max(config.batch_sizes), max(config.other_batch_sizes),
               config.single_batch_size) * config.steps
    *data, dataset = ranks.main_first(lambda: load_images(config, dtype, pool))
    data = tuple(data)
    _log(config, f"matmul peak ({threads} threads)")
    # Measured before and after the models, keeping the better: a busy machine at one moment
    # would otherwise understate the peak (and overstate every "% of peak"). In the run's
    # dtype: float64 products run at about half float32's rate.
    peaks = [ranks.on_main_with_threads(lambda: matmul_peak_gflops(dtype=dtype), threads)]
    one_process = bench_one_process(config.models[0], config, dtype, data)
    _torch_threads(threads)
    models = [bench_model(name, config, threads, dtype, data,
                          config.batch_sizes if index == 0 else config.other_batch_sizes)
              for index, name in enumerate(config.models)]
    peaks.append(ranks.on_main_with_threads(lambda: matmul_peak_gflops(dtype=dtype), threads))
    if not ranks.is_main():
        return None
    peak = best_peak(peaks)
    return {
        "kind": "scratchcnn-bench",
        "config": asdict(config),
        "ranks": world,
        "dataset": dataset,
        "environment": describe_environment(threads),
        "load_average": {"start": load_before, "end": load_average()},
        "matmul_peak": peak,
        "onnxruntime": {"version": _onnxruntime_version(), "problem": onnxruntime_problem(dtype)},
        "one_process": one_process,
        "scaling": scaling(one_process, models[0]),
        "models": models,
    }


def _onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)
