"""Linear (fully connected) layer: ``y = x W^T + b``, as ``torch.nn.Linear``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from scratchcnn.nn import init
from scratchcnn.nn.module import (
    Module,
    Parameter,
    as_float_dtype,
    check_grad_output,
    check_input,
    check_size,
    is_grad_enabled,
)
from scratchcnn.random import as_generator


class Linear(Module):
    """Fully connected layer.

    Shapes: input (N, in_features) (or (*, in_features)), output (N, out_features);
    weight (out_features, in_features), bias (out_features,).

    Forward:  Y = X W^T + b
    Backward: dW = dY^T X,  db = sum over rows of dY,  dX = dY W  (dX skipped when
    ``input_grad`` is False: a model's first layer, see module.py)
    """

    # BLAS picks its product kernel, and so the order of each row's sum, by the batch size: a
    # batch split into pieces gives other bits in the last place.
    splits_exactly = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: Any = None,
        rng: np.random.Generator | int | None = None,
    ) -> None:
        super().__init__()
        # 0 is allowed, as in torch: a zero-element weight, the output is the bias.
        self.in_features = check_size(in_features, "in_features", "Linear", minimum=0)
        self.out_features = check_size(out_features, "out_features", "Linear", minimum=0)
        dtype = as_float_dtype(dtype)
        self.weight = Parameter(np.empty((self.out_features, self.in_features), dtype=dtype))
        self.bias = Parameter(np.zeros(self.out_features, dtype=dtype)) if bias else None
        init.default_layer_init_(self.weight, self.bias, as_generator(rng, "Linear"))
        self._input: np.ndarray | None = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        ndim = x.ndim if isinstance(x, np.ndarray) and x.ndim >= 2 else 2
        expected = "(N, {})" if ndim == 2 else "(*, {})"
        x = check_input(self, x, ndim, expected.format(self.in_features),
                        dim=-1, size=self.in_features)
        out = x @ self.weight.data.T
        if self.bias is not None:
            out += self.bias.data
        self._input = x if is_grad_enabled() else None
        return out

    def backward(self, grad_output: np.ndarray, *, input_grad: bool = True) -> np.ndarray | None:
        """(N, out_features) -> (N, in_features), or None when ``input_grad`` (or the layer's
        ``needs_input_grad``) is False."""
        x = self._input
        expected = None if x is None else (*x.shape[:-1], self.out_features)
        grad = check_grad_output(self, grad_output, expected, self.weight.dtype)
        # Collapse any leading dimensions into one batch axis: (M, out) and (M, in). M given, not
        # -1, which NumPy cannot infer when in_features or out_features is 0.
        rows = math.prod(x.shape[:-1])
        grad_2d = grad.reshape(rows, self.out_features)
        x_2d = x.reshape(rows, self.in_features)
        self.weight.accumulate_grad_product(grad_2d.T, x_2d)  # dL/dW = gradᵀ · x
        if self.bias is not None:
            self.bias.accumulate_grad(grad_2d.sum(axis=0))
        if not (input_grad and self.needs_input_grad):
            return None
        return grad @ self.weight.data

