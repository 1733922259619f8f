"""Comparing results whose matrix products may be rounded differently once their rows move.

A fused step computes the same dot products as the layers one by one, but with the rows of its
products in another order (pool-phase order) or in other groupings (cache-sized pieces). Whether
that keeps the bits depends on the BLAS, not on scratchcnn: OpenBLAS's AVX-512 kernels (SkylakeX)
compute an output row the same wherever it sits; its AVX2 kernels (Haswell, used on AMD Zen)
compute a row at the edge of a tile in another summation order, so a row's bits depend on its
position and on how many rows share the call. Tests state the strongest claim that holds on the
machine they run on: the same bits where the BLAS allows it, equal to rounding everywhere.
"""

from __future__ import annotations

import functools

import numpy as np

from gradcheck import assert_close

# How far rows summed in another order may drift, in units of the largest value's last place
# (a few are seen with OpenBLAS's Haswell kernels on the models here, float32 and float64).
ULPS = 16


@functools.cache
def blas_rows_are_position_independent() -> bool:
    """Whether this BLAS gives a product's leading rows the same bits when they are multiplied
    on their own, in both precisions, for the narrow shapes the convolutions use."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for m, k, n in ((500, 9, 16), (64, 288, 32), (130, 800, 10)):
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            whole = a @ b
            for rows in (1, 3, 5, 13):
                if whole[:rows].tobytes() != (a[:rows] @ b).tobytes():
                    return False
    return True


def assert_same_products(got: np.ndarray, expected: np.ndarray, err_msg: str = "",
                         computed_in: np.dtype | None = None) -> None:
    """``got`` equals ``expected`` bit for bit where this BLAS keeps a row's bits wherever the
    row sits, and elsewhere to ``ULPS`` units in the last place of the largest value (relative
    error, see gradcheck.rel_error) in the precision ``computed_in`` (default: their own
    dtype)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape and got.dtype == expected.dtype, err_msg
    if blas_rows_are_position_independent():
        np.testing.assert_array_equal(got, expected, err_msg=err_msg)
    else:
        assert_close(got, expected, tol=ULPS * np.finfo(computed_in or got.dtype).eps,
                     what=err_msg)
