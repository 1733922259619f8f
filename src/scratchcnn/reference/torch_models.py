"""PyTorch twins of ``scratchcnn.models``: the same layer list built with ``torch.nn``, and weight
transfer in both directions (state_dict keys are identical on the two sides)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from scratchcnn.models import architecture
from scratchcnn.nn.module import as_float_dtype

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype for a NumPy float32/float64 dtype (or a torch dtype, returned as is)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return _TORCH_DTYPES[as_float_dtype(dtype)]


def build_torch_model(name: str, *, dtype: Any = None) -> torch.nn.Sequential:
    """The ``torch.nn.Sequential`` for architecture ``name`` (torch's own random init)."""
    layers = [getattr(torch.nn, layer)(**kwargs) for layer, kwargs in architecture(name)]
    return torch.nn.Sequential(*layers).to(torch_dtype(dtype))


def torch_twin(numpy_model: Any, name: str) -> torch.nn.Sequential:
    """A PyTorch model of architecture ``name`` holding exact copies of ``numpy_model``'s
    parameters and buffers, in the same dtype."""
    state = numpy_model.state_dict()
    dtypes = {value.dtype for value in state.values() if value.dtype.kind == "f"}
    if len(dtypes) != 1:
        found = sorted(map(str, dtypes))
        raise ValueError(f"numpy model must have a single float dtype, found {found}")
    twin = build_torch_model(name, dtype=dtypes.pop())
    expected = {key: tuple(value.shape) for key, value in twin.state_dict().items()}
    # BatchNorm's step counter is the only thing the NumPy side may legitimately lack.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [f"{key} {state[key].shape} vs {expected[key]}"
                   for key in state if key in expected and state[key].shape != expected[key]]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"numpy model does not match architecture {name!r}: missing {missing}, "
            f"unexpected {unexpected}, wrong shapes {wrong_shape}"
        )
    twin.load_state_dict(to_torch_state_dict(state), strict=False)
    return twin


def to_torch_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors that own copies of the arrays (so later NumPy updates don't leak across)."""
    return {key: torch.from_numpy(np.array(value, copy=True)) for key, value in state.items()}


def from_torch_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """NumPy copies of a torch state_dict's tensors, keys and dtypes unchanged."""
    return {key: tensor.detach().cpu().numpy().copy() for key, tensor in state_dict.items()}
