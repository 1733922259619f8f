"""Cross-entropy loss on logits and class indices, as ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

from typing import Any

import numpy as np

from scratchcnn.nn.module import Module, check_grad_output, check_input, is_grad_enabled

_REDUCTIONS = ("mean", "sum", "none")


def reduce_losses(total: np.generic, divisor: float, reduction: str) -> np.generic:
    """The loss from the per-sample losses' ``total``: itself for "sum", else the mean over
    ``divisor`` (the counted samples' weights), NaN when nothing counted (0 / 0, as in torch)."""
    if reduction == "sum":
        return total
    return total.dtype.type(total / divisor if divisor else np.nan)


class CrossEntropyLoss(Module):
    """Softmax cross-entropy between logits (N, C) and integer targets (N,) in [0, C).

    With log-probabilities ``log p = log_softmax(z)`` (computed stably: the row maximum is
    subtracted before exponentiating), class weights w (ones by default), label smoothing e and
    target distribution ``q_n = (1 - e) w[y_n] onehot(y_n) + (e / C) w``:

        l_n = -sum_c q_n[c] log p[n, c]      (0 for targets equal to ignore_index)
        "mean": sum_n l_n / sum_n w[y_n],  "sum": sum_n l_n,  "none": the vector l (N,)

    Backward: dl_n/dz_n = p_n * sum_c q_n[c] - q_n, divided by sum_n w[y_n] for "mean"; that is
    (softmax - onehot) / N in the default case.

    ``forward`` returns a NumPy scalar of the logits' dtype (use ``.item()`` for a float), and
    ``backward(grad=1.0)`` the gradient with respect to the logits, (N, C), of the same dtype.
    """

    def __init__(
        self,
        weight: Any = None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"CrossEntropyLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
            )
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(
                f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}"
            )
        if weight is not None:
            weight = np.array(weight, dtype=np.result_type(np.asarray(weight), np.float32))
            if weight.ndim != 1:
                raise ValueError(
                    f"CrossEntropyLoss: weight must be a 1-D array of one weight per class, got "
                    f"shape {weight.shape}"
                )
        # A buffer, as in PyTorch: it appears in state_dict() and follows .to(dtype).
        self.register_buffer("weight", weight)
        # int() would quietly turn 1.5 into 1 and ignore class 1; torch takes only an int.
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(
                f"CrossEntropyLoss: ignore_index must be an int (a class index, -100 by default), "
                f"got {ignore_index!r}"
            )
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        # (probabilities, targets with ignored ones set to 0, their class weights, valid mask,
        #  class weights, divisor), kept by forward for backward.
        self._cache: tuple[Any, ...] | None = None

    def _check_target(self, target: Any, n: int, classes: int) -> np.ndarray:
        target = np.asarray(target)
        if target.shape != (n,) or not np.issubdtype(target.dtype, np.integer):
            if target.shape != (n,):
                # A dtype cast cannot fix a shape: (N, 1) labels, say, need flattening.
                fix = f"pass one class index per sample, shape ({n},)"
                if target.size == n:
                    fix += " (e.g. target.ravel())"
            else:
                fix = "convert labels with labels.astype(np.int64)"
            raise ValueError(
                f"{self.describe()}: target must be integer class indices of shape ({n},) for "
                f"logits of shape ({n}, {classes}), got {target.dtype} array of shape "
                f"{target.shape}; {fix}"
            )
        bad = (target < 0) | (target >= classes)
        bad &= target != self.ignore_index
        if bad.any():
            raise ValueError(
                f"{self.describe()}: target values must be in [0, {classes}) for {classes} "
                f"classes, got {target[bad][0]} (at index {int(np.flatnonzero(bad)[0])})"
            )
        return target

    def forward(self, logits: np.ndarray, target: Any) -> np.generic | np.ndarray:
        logits = check_input(self, logits, 2, "(N, C)")
        n, classes = logits.shape
        target = self._check_target(target, n, classes)
        dtype = logits.dtype
        if self.weight is not None and self.weight.shape != (classes,):
            raise ValueError(
                f"{self.describe()}: weight has shape {self.weight.shape} but the logits have "
                f"{classes} classes"
            )
        weight = (np.ones(classes, dtype=dtype) if self.weight is None
                  else self.weight.astype(dtype, copy=False))

        shifted = logits - logits.max(axis=1, keepdims=True)
        log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

        valid = (target != self.ignore_index).astype(dtype)
        safe_target = np.where(valid > 0, target, 0)
        rows = np.arange(n)
        # Weight of each sample's own class, 0 for ignored samples: (N,).
        target_weight = weight[safe_target] * valid
        smoothing = self.label_smoothing
        per_sample = -(1.0 - smoothing) * target_weight * log_prob[rows, safe_target]
        if smoothing:
            smooth = -(log_prob @ weight) * valid
            per_sample += (smoothing / classes) * smooth

        divisor = float(target_weight.sum()) if self.reduction == "mean" else 1.0
        if self.reduction == "none":
            loss = per_sample
        else:
            loss = reduce_losses(per_sample.sum(), divisor, self.reduction)

        if is_grad_enabled():
            self._cache = (np.exp(log_prob), safe_target, target_weight, valid, weight, divisor)
        else:
            self._cache = None
        return loss

    def backward(self, grad: Any = 1.0) -> np.ndarray:
        if self._cache is None:
            check_grad_output(self, grad, None, np.dtype(np.float64))
        prob, safe_target, target_weight, valid, weight, divisor = self._cache
        n, classes = prob.shape
        dtype = prob.dtype
        grad = check_grad_output(self, grad, (n,) if self.reduction == "none" else (), dtype)
        smoothing = self.label_smoothing
        # sum_c q_n[c] for each sample, and q_n itself built up in place: (N,) and (N, C).
        q_sum = (1.0 - smoothing) * target_weight
        if smoothing:
            q_sum += (smoothing / classes) * float(weight.sum()) * valid
        grad_logits = prob * q_sum[:, None]
        if smoothing:
            grad_logits -= (smoothing / classes) * (valid[:, None] * weight)
        grad_logits[np.arange(n), safe_target] -= (1.0 - smoothing) * target_weight
        if self.reduction == "mean" and not divisor:
            # Nothing counted: torch gives ignored samples a zero gradient (not 0 * (1/0) = NaN,
            # which one optimizer step would spread into every weight) and counted ones of
            # weight 0 the NaN of 0 / 0.
            grad_logits[:] = np.where(valid[:, None] > 0, np.nan, 0.0)
            return grad_logits
        scale = grad / dtype.type(divisor)
        grad_logits *= scale[:, None] if self.reduction == "none" else scale
        return grad_logits
