"""Batch normalisation over the channels of NCHW activations, as ``torch.nn.BatchNorm2d``."""

from __future__ import annotations

from typing import Any

import numpy as np

from scratchcnn.nn import functional as F
from scratchcnn.nn.collective import BatchShard
from scratchcnn.nn.module import (
    Module,
    Parameter,
    as_float_dtype,
    check_grad_output,
    check_input,
    check_size,
    is_grad_enabled,
)

_AXES = (0, 2, 3)  # every axis but the channel axis: statistics are per channel


def _per_channel(v: np.ndarray) -> np.ndarray:
    """A (C,) vector as (C, 1, 1), to broadcast against (N, C, H, W)."""
    return v.reshape(-1, 1, 1)


def _rows(a: np.ndarray) -> np.ndarray | None:
    """The (N*H*W, C) matrix of a channels-last (N, C, H, W) array (a view), else None."""
    a_nhwc = F.to_nhwc(a)
    return a_nhwc.reshape(-1, a_nhwc.shape[3]) if a_nhwc.flags.c_contiguous else None


def _scratch(*arrays: np.ndarray) -> np.ndarray | None:
    """A new channels-last array shaped like ``arrays[0]`` when all of them are channels-last:
    writing results into it (``out=``) avoids one fresh array per operation. None otherwise,
    so that every operation allocates its result in the layout NumPy picks, as before."""
    if any(_rows(a) is None for a in arrays):
        return None
    return F.to_nchw(np.empty(F.to_nhwc(arrays[0]).shape, arrays[0].dtype))


def _apply(ufunc: np.ufunc, a: np.ndarray, vector: np.ndarray, out: np.ndarray | None = None,
           *, spare: np.ndarray | None = None) -> np.ndarray:
    """``ufunc(a, vector[c])`` on every channel c of (N, C, H, W) ``a``, into ``out`` (e.g. ``a``:
    in place), else into a new array, which may be ``spare`` (a channels-last buffer free for
    reuse). Channels-last arrays of one dtype go through ``F.apply_to_rows``: the same
    operations, but NumPy's inner loop then runs over ~8192 values, not C (up to 2x faster)."""
    rows = _rows(a)
    if rows is not None and a.dtype == vector.dtype:
        target = out if out is not None else spare if spare is not None else _scratch(a)
        target_rows = _rows(target)
        if target_rows is not None and target.dtype == a.dtype:
            F.apply_to_rows(ufunc, rows, vector, target_rows)
            return target
    # Anything else exactly as NumPy broadcasts it (the same result dtype and layout as before).
    return ufunc(a, _per_channel(vector), out=out)


def _sum_over_batch(v: np.ndarray) -> np.ndarray:
    """Per-channel sums (C,) of (N, C, H, W) ``v`` over N, H, W. A channels-last array is an
    (N*H*W, C) matrix, whose rows NumPy would add one C-wide row at a time; ``F.sum_rows``
    folds them into ~1024-wide rows first: ~4x faster, and a two-level sum, more accurate."""
    rows = _rows(v)
    return v.sum(axis=_AXES) if rows is None else F.sum_rows(rows)


def _sum_of_products_over_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel sums (C,) of ``a * b`` over N, H, W; without the product array when both are
    channels-last (``F.sum_rows_of_products``)."""
    rows_a, rows_b = _rows(a), _rows(b)
    if rows_a is None or rows_b is None:
        return np.multiply(a, b).sum(axis=_AXES)
    return F.sum_rows_of_products(rows_a, rows_b)


def _merge_moments(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole batch's per-channel (mean, biased variance) from every shard's
    ``moments[k] = (count_k, mean_k, var_k)``, each (C,), by Chan et al.'s parallel formula:
        mean = sum_k count_k mean_k / count
        var  = sum_k count_k (var_k + (mean_k - mean)^2) / count
    Both statistics in one meeting of the shards, with each shard's squares taken about its own
    mean, as numerically safe as the two-pass variance of the unsharded call."""
    counts, means, variances = moments[:, 0], moments[:, 1], moments[:, 2]
    count = counts.sum(axis=0)
    mean = (counts * means).sum(axis=0) / count
    var = (counts * (variances + np.square(means - mean))).sum(axis=0) / count
    return mean, var


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

    Reductions are over axes (0, 2, 3) (folded rows for channels-last arrays, ``_sum_over_batch``)
    and elementwise operations keep the input's memory layout, so channels-last inputs are handled
    without copies or loops. On channels-last arrays the per-channel operations run over folded
    rows into reused buffers (``_apply``, ``_scratch``): the same operations in the same order on
    arrays of the same layout as plain broadcasting, hence the same bits (tests/test_batchnorm.py
    checks against a frozen copy).

    Sharded (``DataParallel`` sets ``batch_shard`` while it runs this layer on a part of a batch,
    see ``nn.collective``): mu and var are the whole batch's, merged from every shard's own
    (count, mean, variance) in one meeting (``_merge_moments``), the backward's sums are added up
    across the shards, M counts the whole batch, and one shard updates the running statistics, so
    the results are those of the unsharded call (up to rounding), as with
    ``torch.nn.SyncBatchNorm``.
    """

    batch_shard: BatchShard | None = None

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
        self._cache: tuple[np.ndarray, np.ndarray, bool] | None = None

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
        shard = self.batch_shard
        # Channels-last: a buffer for the output (or, under no_grad, x_hat); None otherwise, so
        # that every result is a fresh array laid out as NumPy picks.
        scratch = _scratch(x)
        if use_batch_stats:
            count = (len(x) if shard is None else shard.batch_size) * x.shape[2] * x.shape[3]
            if count == 0:
                return self._forward_empty(x)
            if count == 1:
                raise ValueError(
                    f"{self.describe()}: expected more than 1 value per channel when training, "
                    f"got input of shape {x.shape}"
                )
            shard_count = len(x) * x.shape[2] * x.shape[3]
            mean = _sum_over_batch(x) / shard_count
            x_hat = _apply(np.subtract, x, mean)
            var = _sum_of_products_over_batch(x_hat, x_hat) / shard_count
            if shard is not None:
                shard_mean = mean
                mean, var = _merge_moments(shard.all_gather(
                    np.stack([np.full_like(mean, shard_count), shard_mean, var])))
                _apply(np.subtract, x_hat, mean - shard_mean, out=x_hat)
            inv_std = 1.0 / np.sqrt(var + self.eps)
            _apply(np.multiply, x_hat, inv_std, out=x_hat)
            # Once per batch: every shard's buffers are the wrapped module's, so one updates them.
            tracking = self.training and self.running_mean is not None
            if tracking and (shard is None or shard.rank == 0):
                self._update_running_stats(mean, var, count)
        else:
            inv_std = 1.0 / np.sqrt(self.running_var + self.eps)
            # Nothing cached (no_grad): x_hat may be computed in the output's buffer.
            x_hat = _apply(np.subtract, x, self.running_mean,
                           spare=None if is_grad_enabled() else scratch)
            _apply(np.multiply, x_hat, inv_std, out=x_hat)
        if self.affine:
            out = _apply(np.multiply, x_hat, self.weight.data, spare=scratch)
            if self.bias is not None:
                _apply(np.add, out, self.bias.data, out=out)
        else:
            out = x_hat.copy() if is_grad_enabled() else x_hat
        self._cache = (x_hat, inv_std, use_batch_stats) if is_grad_enabled() else None
        return out

    def _forward_empty(self, x: np.ndarray) -> np.ndarray:
        """An empty batch with batch statistics, as in PyTorch: an empty output, and zero
        parameter gradients from backward; the running statistics keep their values (a mean of
        nothing), but training still counts the batch in ``num_batches_tracked``."""
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked += 1
        unit = np.ones(self.num_features, dtype=x.dtype)
        self._cache = (x.copy(), unit, False) if is_grad_enabled() else None
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

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        x_hat, inv_std, used_batch_stats = self._cache or (None, None, None)
        grad = check_grad_output(self, grad_output, None if x_hat is None else x_hat.shape,
                                 None if x_hat is None else x_hat.dtype)
        grad_bias = _sum_over_batch(grad)
        # Channels-last: a buffer for grad_input.
        scratch = _scratch(grad, x_hat)
        grad_weight = _sum_of_products_over_batch(grad, x_hat)
        scale = inv_std if not self.affine else inv_std * self.weight.data
        if used_batch_stats:
            shard = self.batch_shard
            sum_dy, sum_dy_x_hat = grad_bias, grad_weight
            if shard is not None:
                # dx needs the whole batch's sums. The parameter gradients below stay this
                # shard's partial sums: DataParallel adds up the replicas' parameter gradients.
                sum_dy, sum_dy_x_hat = shard.combine_sum(np.stack([grad_bias, grad_weight]))
            n = len(x_hat) if shard is None else shard.batch_size
            count = n * x_hat.shape[2] * x_hat.shape[3]
            grad_input = _apply(np.multiply, x_hat, sum_dy_x_hat / count, spare=scratch)
            np.subtract(grad, grad_input, out=grad_input)
            _apply(np.subtract, grad_input, sum_dy / count, out=grad_input)
            _apply(np.multiply, grad_input, scale, out=grad_input)
        else:
            grad_input = _apply(np.multiply, grad, scale, spare=scratch)
        if self.affine:
            self.weight.accumulate_grad(grad_weight)
        if self.bias is not None:
            self.bias.accumulate_grad(grad_bias)
        return grad_input
