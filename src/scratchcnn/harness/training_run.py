"""A resumable single-framework training run with checkpoints (what ``scratchcnn train`` runs).

``TrainingRun`` trains one framework's model epoch by epoch, rewriting ``OUT/last.npz``
(atomically) after each epoch and ``OUT/best.npz`` whenever the test accuracy improves. A
checkpoint holds the model, optimizer, lr scheduler and random state, and the batch order and
augmentation of an epoch are pure functions of (seed, epoch), so a run continued from a checkpoint
(``load_resumable``) ends with the same weights as one uninterrupted run.

``config`` holds the run's settings and is recorded in every checkpoint: model, dataset,
batch_size, optimizer, lr, momentum, weight_decay, seed, limit_train, limit_test, dtype,
framework, augment, lr_schedule, warmup_epochs, lr_step_size, and schedule_epochs (the epochs the
lr schedule is laid out over).

The NumPy side may run as MPI ranks (``ranks.py``): every rank trains its part of each batch and
holds the same weights; rank 0 writes the checkpoints, which record the rank count. Resumed with
the same count, a run is bit-identical to an uninterrupted one; with another count it continues
(rounding then differs: the gradients are summed in another order).

torch is imported inside the functions that need it, never at module level.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scratchcnn.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scratchcnn.harness import ranks, training
from scratchcnn.harness.compare import augmented_training_images, make_lr_schedulers
from scratchcnn.harness.report import finite_or_none

if TYPE_CHECKING:
    from scratchcnn.data import Dataset
    from scratchcnn.formats.checkpoint import Checkpoint

# Called with (epoch, number of steps) just before an epoch's training; the context it returns
# wraps the training and yields the per-step callback (or None), e.g. a progress bar.
ProgressFactory = Callable[[int, int], AbstractContextManager[training.ProgressCallback | None]]


def optimizer_options(config: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's keyword options for the run settings ``config`` (momentum for SGD only),
    as passed to the optimizer and recorded with its hyper-parameters in the checkpoint."""
    options: dict[str, Any] = {"weight_decay": config["weight_decay"]}
    if config["optimizer"] == "sgd":
        options["momentum"] = config["momentum"]
    elif config["momentum"]:
        raise ValueError("--momentum applies to --optimizer sgd only")
    return options


def load_data(
    dataset: str, data_dir: str | None, limit_train: int | None, limit_test: int | None
) -> Dataset:
    """Dataset ``dataset`` cut to its first ``limit_train`` / ``limit_test`` images (None: all)."""
    from scratchcnn.data import load_dataset

    return load_dataset(dataset, data_dir).limit(train=limit_train, test=limit_test)


def tensor_hook_for(framework: str) -> Callable[[np.ndarray], Any] | None:
    """How ``load_checkpoint`` should turn saved tensors back into ``framework``'s own: torch
    tensors (copies, so they own their memory) for "torch", plain arrays otherwise."""
    if framework != "torch":
        return None
    import torch

    return lambda array: torch.from_numpy(np.array(array, copy=True))


def peek_framework(path: str | Path) -> str:
    """The framework a checkpoint was trained with, read without converting its arrays."""
    return load_checkpoint(path, check_model=False).metadata.get("framework", "numpy")


def load_resumable(path: str | Path, framework: str | None = None) -> Checkpoint:
    """The checkpoint at ``path`` with its tensors in ``framework``'s form (default: the
    framework it was trained with); CheckpointError if it holds no training state to resume."""
    framework = framework or peek_framework(path)
    checkpoint = load_checkpoint(path, tensor_hook=tensor_hook_for(framework))
    if "config" not in checkpoint.metadata or "optimizer" not in checkpoint.metadata:
        raise CheckpointError(f"{path}: has no training state to resume from")
    return checkpoint


class TrainingState:
    """The model, optimizer, lr schedulers and random state of one framework, with save/restore
    of all of them."""

    def __init__(self, config: dict[str, Any]) -> None:
        from scratchcnn.models import build_model

        self.config = config
        self.framework = config["framework"]
        self.rng = np.random.default_rng(config["seed"])
        # Both frameworks start from the same NumPy initialisation.
        numpy_model = build_model(config["model"], dtype=config["dtype"], rng=self.rng)
        if self.framework == "torch":
            import torch

            from scratchcnn.reference.torch_models import torch_twin

            torch.manual_seed(config["seed"])
            self.model = torch_twin(numpy_model, config["model"])
        else:
            # With MPI ranks: SyncBatchNorm, DistributedDataParallel (one process: as built).
            self.model = ranks.distribute(numpy_model, config["seed"])
        self.optimizer = training.make_optimizer(
            self.framework,
            self.model.parameters(),
            config["optimizer"],
            config["lr"],
            **optimizer_options(config),
        )
        self.schedulers = make_lr_schedulers(
            self.framework, self.optimizer, config["lr_schedule"], config["schedule_epochs"],
            config["warmup_epochs"], config["lr_step_size"],
        )

    def model_state(self) -> dict[str, np.ndarray]:
        """The model's state_dict with NumPy keys and arrays, whichever the framework."""
        if self.framework == "torch":
            from scratchcnn.reference.torch_models import from_torch_state_dict

            # All of it, BatchNorm's int64 step counter included: the checkpoint must match
            # the NumPy model's state_dict key for key to load.
            return from_torch_state_dict(self.model.state_dict())
        return dict(ranks.unwrapped(self.model).state_dict())

    def random_state(self) -> dict[str, Any]:
        """The NumPy generator's state, and torch's global RNG state for the torch side."""
        state: dict[str, Any] = {"numpy": self.rng.bit_generator.state}
        if self.framework == "torch":
            import torch

            state["torch"] = torch.get_rng_state().numpy().copy()
        return state

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load the model, optimizer, lr scheduler and random state saved in ``checkpoint``."""
        if self.framework == "torch":
            import torch

            from scratchcnn.reference.torch_models import to_torch_state_dict

            self.model.load_state_dict(to_torch_state_dict(checkpoint.model_state))
            torch.set_rng_state(torch.from_numpy(np.asarray(checkpoint.metadata["rng"]["torch"])))
        else:
            ranks.unwrapped(self.model).load_state_dict(checkpoint.model_state)
        # After the schedulers' construction (which writes the lr), as torch recommends.
        self.optimizer.load_state_dict(checkpoint.metadata["optimizer"]["state"])
        saved = checkpoint.metadata.get("lr_schedulers", [])
        if len(saved) != len(self.schedulers):
            raise ValueError(
                f"checkpoint has {len(saved)} lr scheduler state(s) but its settings need "
                f"{len(self.schedulers)}; it was not written by this version of scratchcnn train"
            )
        for scheduler, state in zip(self.schedulers, saved, strict=True):
            scheduler.load_state_dict(state)
        self.rng.bit_generator.state = checkpoint.metadata["rng"]["numpy"]


@dataclass(frozen=True)
class EpochResult:
    """What one epoch of a ``TrainingRun`` measured (losses as computed, possibly infinite)."""

    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    train_seconds: float
    lr: float           # the learning rate the epoch trained with
    improved: bool      # best test accuracy so far: best.npz was rewritten


def recorded_data_dir(metadata: dict[str, Any], dataset: str, test_only: bool = False
                      ) -> str | None:
    """The data directory recorded in a checkpoint's ``metadata``, if it is for ``dataset`` and
    still holds its files (``test_only``: the test files); None otherwise, so that the usual
    search applies (the directory may be gone, or the checkpoint made on another machine)."""
    from scratchcnn.data import locate_dataset

    recorded = metadata.get("data_dir")
    if not recorded or dataset != metadata.get("dataset") or dataset == "mnist-sample":
        return None
    try:
        found = locate_dataset(dataset, recorded, test_only=test_only)
    except (OSError, ValueError):
        return None
    return recorded if found is not None else None


class TrainingRun:
    """One framework trained from ``config``, checkpointing into the directory ``out``.

    With ``checkpoint`` (from ``load_resumable``) the run continues from it: its normalisation,
    training state, history and best accuracy are taken over, and ``data_dir`` defaults to the
    directory it recorded. ``threads`` limits BLAS (and torch) threads before the model is built.
    """

    def __init__(
        self,
        config: dict[str, Any],
        out: str | Path,
        *,
        data_dir: str | None = None,
        checkpoint: Checkpoint | None = None,
        threads: int | None = None,
    ) -> None:
        from scratchcnn.data import BatchSampler, compute_mean_std, normalize

        self.config = config
        self.out = Path(out)
        # The data directory is where this machine keeps the files, not a setting of the run,
        # but resuming without repeating it is friendlier.
        self.data_dir = data_dir or (
            recorded_data_dir(checkpoint.metadata, config["dataset"])
            if checkpoint is not None else None
        )
        # Rank 0 first: a download it makes is then found on disk by the other ranks.
        self.data = ranks.main_first(lambda: load_data(
            config["dataset"], self.data_dir, config["limit_train"], config["limit_test"]
        ))
        if checkpoint is not None:
            self.mean, self.std = checkpoint.mean, checkpoint.std
        else:
            self.mean, self.std = compute_mean_std(self.data.train_images)
        self.dtype = np.dtype(config["dtype"])
        self.train_x = normalize(self.data.train_images, self.mean, self.std, dtype=self.dtype)
        self.test_x = normalize(self.data.test_images, self.mean, self.std, dtype=self.dtype)
        self.sampler = BatchSampler(
            len(self.train_x), config["batch_size"], shuffle=True, seed=config["seed"]
        )
        self.ranks = ranks.world_size()
        if self.ranks > 1:
            from scratchcnn.harness.threads import apply_threads

            apply_threads(self.ranks, torch=False, blas=1)  # each rank: one BLAS thread
        elif threads is not None:
            from scratchcnn.harness.threads import apply_threads

            apply_threads(threads, torch=config["framework"] == "torch")
        self.state = TrainingState(config)
        if checkpoint is not None:
            self.state.restore(checkpoint)
        self.completed_epochs: int = checkpoint.epoch if checkpoint is not None else 0
        self.history: list[dict[str, Any]] = (
            list(checkpoint.metadata.get("history", [])) if checkpoint is not None else []
        )
        self.best_accuracy: float = (
            checkpoint.metadata.get("best_accuracy", -1.0) if checkpoint is not None else -1.0
        )
        # The newest checkpoint of this run (None before the first): the last good one to fall
        # back on when an epoch fails.
        self.last_saved: Path | None = checkpoint.path if checkpoint is not None else None
        # The rank count the resumed run trained with (None: not resumed, or not recorded).
        self.resumed_ranks: int | None = (
            checkpoint.metadata.get("ranks", 1) if checkpoint is not None else None
        )

    @property
    def last_path(self) -> Path:
        return self.out / "last.npz"

    @property
    def best_path(self) -> Path:
        return self.out / "best.npz"

    def train(self, epochs: int, progress: ProgressFactory | None = None) -> Iterator[EpochResult]:
        """Train up to ``epochs`` epochs in total, yielding each epoch's result once its
        checkpoints are written (see ``run_epoch``)."""
        while self.completed_epochs < epochs:
            yield self.run_epoch(progress)

    def run_epoch(self, progress: ProgressFactory | None = None) -> EpochResult:
        """Train the next epoch, step the lr schedulers, evaluate on the test set and write
        ``last.npz`` (and ``best.npz`` if the accuracy improved).

        A NaN or infinite loss raises ``training.NonFiniteLossError`` before anything is
        written, so ``last_saved`` is still the last good checkpoint.
        """
        config, state = self.config, self.state
        epoch = self.completed_epochs + 1
        batches = self.sampler.epoch(epoch)
        if self.ranks > 1 and config["framework"] == "numpy":
            # Each rank's Dropout masks, a pure function of (seed, epoch, rank) as the batch
            # order is: a resumed run draws what the uninterrupted one did.
            ranks.seed_dropout(state.model, [config["seed"], epoch])
        epoch_x = self.train_x
        if config["augment"] != "none":
            epoch_x = augmented_training_images(self.data.train_images, config["augment"],
                                                config["seed"], epoch, self.mean, self.std,
                                                self.dtype)
        started = time.perf_counter()
        bar = progress(epoch, len(batches)) if progress is not None else contextlib.nullcontext()
        # A diverging run overflows on its way to NaN; the loop reports that clearly.
        with bar as advance, np.errstate(over="ignore", invalid="ignore"):
            train_loss = training.train_epoch(
                config["framework"], state.model, state.optimizer,
                epoch_x, self.data.train_labels, batches, epoch=epoch, progress=advance,
            )
        train_seconds = time.perf_counter() - started
        lr = state.optimizer.param_groups[0]["lr"]
        for scheduler in state.schedulers:
            scheduler.step()
        result = training.evaluate(config["framework"], state.model, self.test_x,
                                   self.data.test_labels)
        self.history.append({
            "epoch": epoch,
            # JSON has no NaN: an infinite test loss of a still-finite run is recorded as null.
            "train_loss": finite_or_none(train_loss),
            "test_loss": finite_or_none(result.loss),
            "test_accuracy": result.accuracy,
            "train_seconds": train_seconds,
            "lr": lr,
        })
        improved = result.accuracy > self.best_accuracy
        self.best_accuracy = max(self.best_accuracy, result.accuracy)
        if ranks.is_main():  # every rank holds the same weights; rank 0 writes them
            metadata = self._checkpoint_metadata(epoch)
            model_state = state.model_state()
            save_checkpoint(self.last_path, model_state, metadata)
            if improved:
                save_checkpoint(self.best_path, model_state, metadata)
        ranks.barrier()  # nobody runs ahead of a checkpoint that may yet fail to write
        self.last_saved = self.last_path
        self.completed_epochs = epoch
        return EpochResult(
            epoch=epoch, train_loss=train_loss, test_loss=result.loss,
            test_accuracy=result.accuracy, train_seconds=train_seconds, lr=lr, improved=improved,
        )

    def _checkpoint_metadata(self, epoch: int) -> dict[str, Any]:
        """Everything the checkpoint after ``epoch`` records besides the weights: what
        ``load_checkpoint`` needs to rebuild the model, and the state a resumed run continues
        from."""
        config, state = self.config, self.state
        return {
            "architecture": config["model"],
            "dataset": config["dataset"],
            "classes": list(self.data.classes),
            "normalization": {"mean": float(self.mean), "std": float(self.std)},
            "dtype": config["dtype"],
            "epoch": epoch,
            "framework": config["framework"],
            "optimizer": {
                "name": config["optimizer"],
                "hyperparameters": {"lr": config["lr"], **optimizer_options(config)},
                "state": state.optimizer.state_dict(),
            },
            "lr_schedulers": [scheduler.state_dict() for scheduler in state.schedulers],
            "rng": state.random_state(),
            "config": config,
            "ranks": self.ranks if config["framework"] == "numpy" else 1,
            "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else None,
            "history": self.history,
            "best_accuracy": self.best_accuracy,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
