"""One training loop and one evaluation loop, written twice with the same structure: once for
``scratchcnn`` (NumPy) and once for PyTorch, so a comparison differs only in the framework.

Both sides get the same already-normalised float arrays ``images`` (N, 1, 28, 28), int64
``labels`` (N,), and the same list of index arrays ``batches`` (from ``BatchSampler.epoch``); each
step is forward, cross-entropy loss (mean over the batch), backward, optimizer step.

With MPI ranks (``ranks.py``) the NumPy model is a ``DistributedDataParallel``: each rank runs the
same loop on its part of every global batch (``split_batch``), the wrapper averages the gradients
in backward, and the reported loss is the global batch's mean (one all-reduce of a number).
Evaluation splits the test set across the ranks and adds up their counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scratchcnn.harness import ranks

FRAMEWORKS = ("numpy", "torch")
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")

# Called after every step with the step's loss (e.g. to move a progress bar and show live loss).
ProgressCallback = Callable[[float], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the optimizer step, so the model still
    holds the weights it had after the last good step."""

    def __init__(self, framework: str, epoch: int, step: int, loss: float) -> None:
        self.framework, self.epoch, self.step, self.loss = framework, epoch, step, loss
        super().__init__(
            f"{framework}: loss became {loss} at epoch {epoch}, step {step}; training stopped. "
            "Lower the learning rate (--lr) or check the input data."
        )


@dataclass(frozen=True)
class EvalResult:
    accuracy: float          # fraction correct, in [0, 1]
    loss: float              # mean cross-entropy over all samples
    predictions: np.ndarray  # int64 (N,), argmax of the logits
    seconds: float           # wall time of the whole evaluation


def check_framework(framework: str) -> str:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")
    return framework


def hyperparameter_problem(name: str, value: float) -> str | None:
    """What is wrong with ``value`` as the optimizer setting ``name`` (None: nothing, or a
    setting without a rule): the learning rate must be finite and positive, momentum and weight
    decay finite and >= 0. Callers name the setting their way (``lr`` or ``--lr``)."""
    if name == "lr" and not (math.isfinite(value) and value > 0):
        return f"must be a positive number, got {value}"
    if name in ("momentum", "weight_decay") and not (math.isfinite(value) and value >= 0):
        return f"must be a number >= 0, got {value}"
    return None


def make_optimizer(framework: str, params: Iterable[Any], name: str, lr: float, **options: Any):
    """``scratchcnn.optim.<Name>`` or ``torch.optim.<Name>`` with identical hyper-parameters.

    ``name`` is "sgd", "adam" or "adamw"; ``options`` are passed through unchanged (e.g.
    ``momentum=0.9``, ``weight_decay=1e-4``), so both sides read the same torch.optim defaults.
    """
    check_framework(framework)
    class_names = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
    if name not in class_names:
        raise ValueError(
            f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}"
        )
    if not isinstance(lr, int | float) or hyperparameter_problem("lr", lr):
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    if framework == "numpy":
        from scratchcnn import optim
    else:
        import torch.optim as optim
    return getattr(optim, class_names[name])(params, lr=lr, **options)


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 4 or images.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"images must be a normalised float32/float64 array (N, C, H, W), got "
            f"{images.dtype} {images.shape}; use scratchcnn.data.normalize first"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")


def train_epoch(
    framework: str,
    model: Any,
    optimizer: Any,
    images: np.ndarray,
    labels: np.ndarray,
    batches: Sequence[np.ndarray],
    *,
    epoch: int,
    progress: ProgressCallback | None = None,
) -> float:
    """Train ``model`` for one pass over ``batches``; returns the mean training loss per sample.

    Steps are numbered from 1 within the epoch in ``NonFiniteLossError``.
    """
    _check_arrays(images, labels)
    if check_framework(framework) == "numpy":
        step_fn = _numpy_steps(model, optimizer, images, labels)
    else:
        step_fn = _torch_steps(model, optimizer, images, labels)
    model.train()
    total, count = 0.0, 0
    for step, batch in enumerate(batches, start=1):
        loss = step_fn(batch)
        if not math.isfinite(loss):
            raise NonFiniteLossError(framework, epoch, step, loss)
        total += loss * len(batch)
        count += len(batch)
        if progress is not None:
            progress(loss)
    return total / max(count, 1)


def _numpy_steps(model, optimizer, images, labels) -> Callable[[np.ndarray], float]:
    from scratchcnn import nn

    criterion = nn.CrossEntropyLoss()
    several = ranks.is_distributed(model)

    def step(batch: np.ndarray) -> float:
        # The loop the README shows, on this rank's part of the batch; a non-finite loss skips
        # the update (on every rank alike), so the caller raises with the weights still good.
        local = ranks.local_part(batch) if several else batch
        optimizer.zero_grad()
        loss = criterion(model(images[local]), labels[local])
        value = float(loss)
        if several:
            value = _global_mean(value, len(local), len(batch))
        if not math.isfinite(value):
            return value
        model.backward(criterion.backward())
        optimizer.step()
        return value

    return step


def _global_mean(local_mean: float, local_count: int, count: int) -> float:
    """The mean loss over the whole batch from each rank's mean over its part."""
    local_sum = local_mean * local_count if local_count else 0.0
    return float(ranks.sum_over_ranks(local_sum)[0]) / count


def _torch_steps(model, optimizer, images, labels) -> Callable[[np.ndarray], float]:
    import torch

    criterion = torch.nn.CrossEntropyLoss()
    # Zero-copy views of the same arrays the NumPy side reads.
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    labels_t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))

    def step(batch: np.ndarray) -> float:
        index = torch.from_numpy(batch)
        optimizer.zero_grad()
        loss = criterion(model(images_t[index]), labels_t[index])
        value = loss.item()
        if not math.isfinite(value):
            return value
        loss.backward()
        optimizer.step()
        return value

    return step


def evaluate(
    framework: str,
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 1000,
) -> EvalResult:
    """Accuracy, mean loss and predictions in eval mode without gradient bookkeeping. With MPI
    ranks (the NumPy side) each rank evaluates its share of the images and the sums are added
    up; every rank gets the whole result."""
    _check_arrays(images, labels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    check_framework(framework)
    model.eval()
    logits_of = _numpy_logits if framework == "numpy" else _torch_logits
    split = framework == "numpy" and ranks.is_distributed(model)
    start = time.perf_counter()
    # This rank's share: a contiguous run of the images (all of them in one process).
    first, last = ranks.contiguous_share(len(labels)) if split else (0, len(labels))
    loss_sum = 0.0
    predictions = np.zeros(len(labels), dtype=np.int64)
    for begin in range(first, last, batch_size):
        end = min(begin + batch_size, last)
        logits = logits_of(model, images[begin:end])
        loss_sum += _summed_cross_entropy(logits, labels[begin:end])
        predictions[begin:end] = np.argmax(logits, axis=1)
    if split:
        # Every other rank's predictions are 0 here, so the sum assembles them (exactly: small
        # integers in float64).
        totals = ranks.sum_over_ranks(np.concatenate([[loss_sum], predictions]))
        loss_sum, predictions = float(totals[0]), totals[1:].astype(np.int64)
    seconds = time.perf_counter() - start
    n = max(len(labels), 1)
    return EvalResult(
        accuracy=float(np.mean(predictions == labels)) if len(labels) else 0.0,
        loss=loss_sum / n,
        predictions=predictions,
        seconds=seconds,
    )


def _numpy_logits(model, batch: np.ndarray) -> np.ndarray:
    from scratchcnn.nn import no_grad

    with no_grad():
        return np.asarray(model(batch))


def _torch_logits(model, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()


def _summed_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Sum over the batch of -log softmax(logits)[label], computed the same way (float64) for
    both frameworks so evaluation losses are comparable to the last digit."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.sum(log_norm - shifted[np.arange(len(labels)), labels]))
