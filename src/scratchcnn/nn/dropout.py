"""Dropout, as ``torch.nn.Dropout`` (inverted dropout: rescaled at training time)."""

from __future__ import annotations

import numpy as np

from scratchcnn.nn.module import Module, check_grad_output, check_input, is_grad_enabled
from scratchcnn.random import as_generator, resolve_rng


class Dropout(Module):
    """Zero each element with probability ``p`` in training and scale the survivors by 1/(1-p),
    so that the expected output equals the input; the identity in eval mode.

    Shapes: any; output has the input's shape.
    Forward:  y = x * m,  m = keep / (1 - p),  keep ~ Bernoulli(1 - p) (m = 0 when p = 1)
    Backward: dx = dy * m  (the same mask)

    The mask comes from ``rng`` (a numpy Generator, or an int seed for a new one) or, when None,
    the package's default generator at the time of the call, so ``scratchcnn.manual_seed`` makes
    runs repeatable. It is drawn in logical (row-major) order, so the same seed gives the same
    mask whatever the memory layout.
    PyTorch draws from its own generator: masks never coincide across frameworks.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *,
                 rng: np.random.Generator | int | None = None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: probability p has to be between 0 and 1, but got {p}")
        self.p = float(p)
        self.inplace = bool(inplace)
        # Checked here, not at the first training forward; None stays None so that each draw
        # looks the default generator up (scratchcnn.manual_seed then applies).
        self.rng = as_generator(rng, "Dropout")
        self._mask: np.ndarray | None = None
        self._cache: tuple[tuple[int, ...], np.dtype] | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        ndim = x.ndim if isinstance(x, np.ndarray) else 0
        x = check_input(self, x, ndim, "(*)")
        if not self.training or self.p == 0.0:
            mask = None
            out = x
        else:
            keep = resolve_rng(self.rng).random(x.shape, dtype=x.dtype) >= self.p
            scale = x.dtype.type(0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p))
            mask = keep * scale
            out = np.multiply(x, mask, out=x if self.inplace else None)
        grad_enabled = is_grad_enabled()
        self._mask = mask if grad_enabled else None
        self._cache = (x.shape, x.dtype) if grad_enabled else None
        return out

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        shape, dtype = self._cache or (None, None)
        grad = check_grad_output(self, grad_output, shape, dtype)
        return grad if self._mask is None else grad * self._mask
