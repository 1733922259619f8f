"""Batch normalisation over the channels of NCHW activations, as ``torch.nn.BatchNorm2d``."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from scratchcnn.nn import functional as F
from scratchcnn.nn.module import (
    Module,
    Parameter,
    as_float_dtype,
    check_grad_output,
    check_input,
    check_size,
    is_grad_enabled,
)


class BatchNorm2d(Module):
    """Normalise each channel to zero mean and unit variance, then scale and shift.

    Shapes: input (N, C, H, W), output the same; weight (gamma), bias (beta), running_mean and
    running_var are (C,) (weight and bias only when affine; bias=False drops bias);
    num_batches_tracked is a 0-d int64 array. M = N * H * W.

    Forward (training, or when no running statistics are tracked):
        mu = mean(x), var = mean((x - mu)^2)  (biased, over N, H, W)
        x_hat = (x - mu) / sqrt(var + eps),  y = gamma * x_hat + beta
        running_mean <- (1 - m) running_mean + m mu
        running_var  <- (1 - m) running_var + m var * M / (M - 1)   (unbiased)
        with m = momentum, or 1 / num_batches_tracked when momentum is None (cumulative average).
    Forward (eval): the same with mu, var replaced by running_mean, running_var.

    Backward, with dbeta = sum(dy) and dgamma = sum(dy * x_hat) over N, H, W:
        batch statistics: dx = gamma / sqrt(var + eps) * (dy - dbeta / M - x_hat * dgamma / M)
        running statistics (constants): dx = gamma / sqrt(var + eps) * dy

    Reductions are per channel over N, H, W and elementwise operations keep the input's memory
    layout; on channels-last arrays both run over folded rows (``F.channel_sums``,
    ``F.apply_per_channel``), the same operations in the same order as plain broadcasting, hence
    the same bits (tests/test_batchnorm.py checks against a frozen copy).

    Every sum over the batch (the statistics, M, and the backward's two sums) goes through
    ``_sum_over_batch``, which here returns its argument: ``SyncBatchNorm`` adds the other
    ranks' partial sums there, and nothing else differs.
    """

    # As torch's BatchNorm, a state_dict without num_batches_tracked (saved before torch had it,
    # or stripped) loads and leaves the count as it is.
    optional_state: ClassVar[tuple[str, ...]] = ("num_batches_tracked",)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        bias: bool = True,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.num_features = check_size(num_features, "num_features", "BatchNorm2d")
        dtype = as_float_dtype(dtype)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        # Registration order fixes the state_dict order: weight, bias, running_mean,
        # running_var, num_batches_tracked, exactly as PyTorch.
        self.weight = Parameter(np.ones(self.num_features, dtype=dtype)) if affine else None
        # bias=False (keyword-only, new in recent PyTorch) keeps gamma but drops beta.
        self.bias = Parameter(np.zeros(self.num_features, dtype=dtype)) if affine and bias else None
        if self.track_running_stats:
            self.register_buffer("running_mean", np.zeros(self.num_features, dtype=dtype))
            self.register_buffer("running_var", np.ones(self.num_features, dtype=dtype))
            self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._cache: tuple[np.ndarray, np.ndarray, int | None] | None = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked.fill(0)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self, x, 4, f"(N, {self.num_features}, H, W)",
                        dim=1, size=self.num_features)
        if self.running_mean is not None and self.running_mean.dtype != x.dtype:
            raise TypeError(
                f"{self.describe()}: input is {x.dtype} but the running statistics are "
                f"{self.running_mean.dtype}; cast one to match, e.g. model.to(np.{x.dtype})"
            )
        use_batch_stats = self.training or self.running_mean is None
        # Channels-last: a buffer for the output (or, under no_grad, x_hat); None otherwise, so
        # that every result is a fresh array laid out as NumPy picks.
        scratch = F.channels_last_like(x)
        count = None
        if use_batch_stats:
            # M rides along with the sums, so a synchronised subclass needs one meeting for both.
            sums = self._sum_over_batch(np.append(F.channel_sums(x), x.dtype.type(
                len(x) * x.shape[2] * x.shape[3])))
            count = int(sums[-1])
            if count == 0:
                return self._forward_empty(x)
            if count == 1:
                raise ValueError(
                    f"{self.describe()}: expected more than 1 value per channel when training, "
                    f"got input of shape {x.shape}"
                )
            mean = sums[:-1] / sums[-1]
            x_hat = F.apply_per_channel(np.subtract, x, mean)
            var = self._sum_over_batch(F.channel_sums_of_products(x_hat, x_hat)) / count
            inv_std = 1.0 / np.sqrt(var + self.eps)
            F.apply_per_channel(np.multiply, x_hat, inv_std, out=x_hat)
            if self.training and self.running_mean is not None:
                self._update_running_stats(mean, var, count)
        else:
            inv_std = 1.0 / np.sqrt(self.running_var + self.eps)
            # Nothing cached (no_grad): x_hat may be computed in the output's buffer.
            x_hat = F.apply_per_channel(np.subtract, x, self.running_mean,
                                        spare=None if is_grad_enabled() else scratch)
            F.apply_per_channel(np.multiply, x_hat, inv_std, out=x_hat)
        if self.affine:
            out = F.apply_per_channel(np.multiply, x_hat, self.weight.data, spare=scratch)
            if self.bias is not None:
                F.apply_per_channel(np.add, out, self.bias.data, out=out)
        else:
            out = x_hat.copy() if is_grad_enabled() else x_hat
        self._cache = (x_hat, inv_std, count) if is_grad_enabled() else None
        return out

    def _forward_empty(self, x: np.ndarray) -> np.ndarray:
        """An empty batch with batch statistics, as in PyTorch: an empty output, and zero
        parameter gradients from backward; the running statistics keep their values (a mean of
        nothing), but training still counts the batch in ``num_batches_tracked``."""
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked += 1
        unit = np.ones(self.num_features, dtype=x.dtype)
        self._cache = (x.copy(), unit, None) if is_grad_enabled() else None
        return x.copy()

    def _update_running_stats(self, mean: np.ndarray, var: np.ndarray, count: int) -> None:
        self.num_batches_tracked += 1
        # momentum=None: a cumulative (equal-weight) average of every batch seen.
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased_var = var * (count / (count - 1))
        # In place, so arrays obtained from named_buffers() stay live views.
        self.running_mean *= 1.0 - factor
        self.running_mean += factor * mean
        self.running_var *= 1.0 - factor
        self.running_var += factor * unbiased_var

    def _sum_over_batch(self, partial_sums: np.ndarray) -> np.ndarray:
        """The whole batch's sums from this call's ``partial_sums``: the same array here, where
        this call holds the whole batch (``SyncBatchNorm`` adds every rank's)."""
        return partial_sums

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        x_hat, inv_std, count = self._cache or (None, None, None)
        grad = check_grad_output(self, grad_output, None if x_hat is None else x_hat.shape,
                                 None if x_hat is None else x_hat.dtype)
        grad_bias = F.channel_sums(grad)
        # Channels-last: a buffer for grad_input.
        scratch = F.channels_last_like(grad, x_hat)
        grad_weight = F.channel_sums_of_products(grad, x_hat)
        scale = inv_std if not self.affine else inv_std * self.weight.data
        if count is not None:  # batch statistics: x_hat depends on every sample
            # The parameter gradients stay this call's own sums (data parallel adds them up).
            sum_dy, sum_dy_x_hat = self._sum_over_batch(np.stack([grad_bias, grad_weight]))
            grad_input = F.apply_per_channel(np.multiply, x_hat, sum_dy_x_hat / count,
                                             spare=scratch)
            np.subtract(grad, grad_input, out=grad_input)
            F.apply_per_channel(np.subtract, grad_input, sum_dy / count, out=grad_input)
            F.apply_per_channel(np.multiply, grad_input, scale, out=grad_input)
        else:
            grad_input = F.apply_per_channel(np.multiply, grad, scale, spare=scratch)
        if self.affine:
            self.weight.accumulate_grad(grad_weight)
        if self.bias is not None:
            self.bias.accumulate_grad(grad_bias)
        return grad_input
