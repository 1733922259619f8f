"""Test helpers shared by the engine tests: relative error and centred finite differences."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from scratchcnn.nn import Sequential


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max(max |actual|, max |expected|): 0 for equal arrays."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shapes differ: {actual.shape} vs {expected.shape}"
    scale = max(np.max(np.abs(actual), initial=0.0), np.max(np.abs(expected), initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(actual - expected)) / scale)


def assert_close(
    actual: np.ndarray, expected: np.ndarray, tol: float = 1e-8, what: str = ""
) -> None:
    error = rel_error(actual, expected)
    assert error <= tol, f"{what}: relative error {error:.3e} > {tol:.0e}"


def numerical_gradient(
    f: Callable[[], float], array: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """Centred finite differences of the scalar ``f()`` with respect to ``array``, perturbed in
    place (every element in turn, so keep arrays small)."""
    grad = np.zeros_like(array, dtype=np.float64)
    flat = array.reshape(-1)  # a view: writes reach ``array``
    assert np.shares_memory(flat, array), "array must be contiguous to be perturbed in place"
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        plus = f()
        flat[i] = saved - eps
        minus = f()
        flat[i] = saved
        grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
    return grad


def check_module_gradients(module, x: np.ndarray, rng: np.random.Generator, tol: float = 1e-7):
    """Compare ``module.backward`` with finite differences of ``sum(forward(x) * g)`` for a random
    upstream gradient ``g``: the input gradient and every parameter gradient. float64 only."""
    assert x.dtype == np.float64
    out = module.forward(x)
    upstream = rng.standard_normal(out.shape)

    def loss() -> float:
        return float(np.sum(module.forward(x) * upstream))

    module.zero_grad()
    module.forward(x)
    # A Sequential computes its input gradient only when asked (a model's input is data).
    asked = {"input_grad": True} if isinstance(module, Sequential) else {}
    grad_input = module.backward(upstream, **asked)
    assert_close(grad_input, numerical_gradient(loss, x), tol, f"{module.describe()} input grad")
    for name, param in module.named_parameters():
        analytic = param.grad.copy()
        assert_close(analytic, numerical_gradient(loss, param.data), tol,
                     f"{module.describe()} grad of {name}")
