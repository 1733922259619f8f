"""Flatten a range of dimensions into one, as ``torch.nn.Flatten``."""

from __future__ import annotations

import math

import numpy as np

from scratchcnn.nn.module import Module, check_grad_output, check_input, is_grad_enabled


class Flatten(Module):
    """Merge dimensions ``start_dim..end_dim`` (inclusive, negative counts from the end).

    Shapes: (N, C, H, W) -> (N, C*H*W) with the defaults.
    Forward flattens in logical (row-major) order, like PyTorch, whatever the memory layout:
    ``np.reshape`` of a channels-last view copies the values in C, H, W order, which is what the
    next Linear layer's weights (trained or copied from PyTorch) expect.
    Backward: dx = dy reshaped to the input's shape.
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = int(start_dim)
        self.end_dim = int(end_dim)
        self._cache: tuple[tuple[int, ...], tuple[int, ...], np.dtype] | None = None

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        ndim = x.ndim if isinstance(x, np.ndarray) else 0
        x = check_input(self, x, ndim, "(*)")
        start = self.start_dim + ndim if self.start_dim < 0 else self.start_dim
        end = self.end_dim + ndim if self.end_dim < 0 else self.end_dim
        if not 0 <= start <= end < ndim:
            raise ValueError(
                f"{self.describe()}: cannot flatten dimensions {self.start_dim}..{self.end_dim} "
                f"of an input of shape {x.shape}; start_dim and end_dim must index its "
                "dimensions with start_dim <= end_dim"
            )
        shape = (*x.shape[:start], math.prod(x.shape[start : end + 1]), *x.shape[end + 1 :])
        out = x.reshape(shape)
        self._cache = (x.shape, out.shape, x.dtype) if is_grad_enabled() else None
        return out

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        input_shape, output_shape, dtype = self._cache or (None, None, None)
        grad = check_grad_output(self, grad_output, output_shape, dtype)
        return grad.reshape(input_shape)
