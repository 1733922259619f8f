"""Checks shared by the readers of weight files (torch's .pt, safetensors): each problem a
one-line CheckpointError naming the file."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from scratchcnn.formats.checkpoint import CheckpointError


def os_reason(error: OSError) -> str:
    """The system's reason for ``error``, in lower case, to follow a file name in a message."""
    return (error.strerror or str(error) or type(error).__name__).lower()


def common_float_dtype(path: str | os.PathLike, float_dtypes: Iterable[str]) -> str:
    """float32 or float64: the one floating dtype among ``float_dtypes`` (the weights' dtypes,
    named as torch names them: "bfloat16", "float32"...; float32 if there are none, for the
    architecture check to report)."""
    found = sorted(set(float_dtypes))
    if not found:
        return "float32"
    if len(found) == 1 and found[0] in ("float32", "float64"):
        return found[0]
    kinds = f"are {found[0]}" if len(found) == 1 else f"mix {', '.join(found)}"
    raise CheckpointError(
        f"{path}: the weights {kinds}; pass --dtype float32 or --dtype float64 to convert them"
    )


def finite_as(path: str | os.PathLike, key: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A copy of weight ``key``'s ``array`` in ``dtype``; CheckpointError if it holds NaN or
    infinite values or does not fit ``dtype``."""
    if array.dtype.kind != "f":
        return array.astype(dtype)
    if not np.all(np.isfinite(array)):
        raise CheckpointError(f"{path}: {key!r} contains NaN or infinite values")
    with np.errstate(over="ignore"):  # said below, as the weight's problem
        converted = array.astype(dtype)
    if not np.all(np.isfinite(converted)):
        raise CheckpointError(f"{path}: {key!r} has values too large for {dtype}")
    return converted
