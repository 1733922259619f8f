"""ReLU activation, as ``torch.nn.ReLU``."""

from __future__ import annotations

import numpy as np

from scratchcnn.nn.module import Module, check_grad_output, check_input, is_grad_enabled


class ReLU(Module):
    """Rectified linear unit, elementwise: any input shape, output of the same shape.

    Forward:  y = max(x, 0)
    Backward: dx = dy * (y > 0)   (PyTorch's rule: the gradient at x == 0 is 0)

    Works on any memory layout: ufuncs allocate outputs in the input's layout (order "K"), so a
    channels-last view stays channels-last and nothing is copied to contiguous.
    """

    splits_exactly = True  # elementwise

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = bool(inplace)
        self._output: np.ndarray | None = None

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""

    def forward(self, x: np.ndarray) -> np.ndarray:
        ndim = x.ndim if isinstance(x, np.ndarray) else 0
        x = check_input(self, x, ndim, "(*)")
        out = np.maximum(x, 0, out=x if self.inplace else None)
        # The output is all backward needs (as in PyTorch); caching it costs no extra memory.
        self._output = out if is_grad_enabled() else None
        return out

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        out = self._output
        grad = check_grad_output(self, grad_output, None if out is None else out.shape,
                                 None if out is None else out.dtype)
        assert out is not None
        if _axis_order(grad) == _axis_order(out):
            return np.multiply(grad, out > 0, out=np.empty_like(out))
        # Layouts differ (e.g. an NCHW gradient from Flatten, a channels-last output): one
        # transposing copy into the output's layout, then contiguous passes, is ~5x faster than
        # a ufunc reading both layouts at once, and hands the next layer channels-last memory.
        grad_input = np.empty_like(out)
        np.copyto(grad_input, grad)
        grad_input *= out > 0
        return grad_input


def _axis_order(array: np.ndarray) -> tuple[int, ...]:
    """Axes from the largest stride to the smallest: the memory layout, whatever the padding."""
    return tuple(sorted(range(array.ndim), key=lambda axis: -abs(array.strides[axis])))
