"""The optimizers' whole-vector path: a parameter group laid end to end, updated in blocks.

An optimizer with an elementwise update (Adam, AdamW) lays each group's parameters end to end in
one vector when it is created (``lay_out_end_to_end``, like torch's fused and foreach kernels,
which also update a whole group at once), and their gradients in a second one that backward
writes into directly (``Parameter.grad_buffer``). A step in which every parameter of the group
has a gradient and the same step count then updates the whole group as one vector, cut into
cache-sized blocks (``step_as_vector``), instead of parameter by parameter: the same elementwise
arithmetic, so the same bits, in a few calls instead of a dozen per parameter.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from scratchcnn.nn.module import Parameter, flatten_parameters, vector_views

if TYPE_CHECKING:
    from scratchcnn.optim.optimizer import Optimizer

# Each block's arrays together small enough for L2: the update's dozen passes then re-read a
# block from cache instead of streaming whole vectors from memory each time (~30% faster for
# 400k floats).
BLOCK_BYTES = 256 * 1024


class Workspace:
    """Scratch arrays reused across steps, so an update allocates no temporaries.

    ``get(slot, like)`` returns an array shaped like ``like`` that is a view into one flat buffer
    per (slot, dtype), grown to the largest parameter seen. Contents are garbage on return.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, np.dtype], np.ndarray] = {}

    def get(self, slot: int, like: np.ndarray) -> np.ndarray:
        key = (slot, like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < like.size:
            buffer = np.empty(like.size, dtype=like.dtype)
            self._buffers[key] = buffer
        return buffer[: like.size].reshape(like.shape)


def lay_out_end_to_end(params: Iterable[Parameter]) -> None:
    """Lay ``params`` end to end (``nn.flatten_parameters``) unless they already are, any of
    them has a gradient vector already (laid out by ``DistributedDataParallel`` or the user:
    that layout is kept), or they do not share one dtype (they are then updated parameter by
    parameter). Values are unchanged; ``.data`` arrays taken before no longer alias them."""
    params = list(params)
    if not params or len({p.dtype for p in params}) != 1:
        return
    if any(p.grad_buffer is not None for p in params):
        return  # laid out by someone else, who may rely on that layout (DDP's gradient vector)
    if end_to_end([p.data for p in params]) is None:
        flatten_parameters(params)


def _root(array: np.ndarray) -> Any:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def end_to_end(arrays: list[np.ndarray]) -> np.ndarray | None:
    """The 1-d vector the C-contiguous ``arrays`` form if they lie end to end, in order, in one
    allocation (same root array and dtype, each starting where the previous one ends), else
    None. The result is a view: writing to it writes to the arrays."""
    first = arrays[0]
    address = first.__array_interface__["data"][0]
    for array in arrays:
        if (array.dtype != first.dtype or not array.flags.c_contiguous
                or not array.flags.writeable or _root(array) is not _root(first)
                or array.__array_interface__["data"][0] != address):
            return None
        address += array.nbytes
    total = sum(array.size for array in arrays)
    return as_strided(first, shape=(total,), strides=(first.itemsize,))


class FlatGroup:
    """One parameter group laid end to end: ``param.data`` is the flat vector ``flat`` whose
    slices ``views[i]`` are the parameters' ``.data``; ``grad`` holds their gradients each step,
    and ``state[key]`` / ``state_views[key]`` hold each per-parameter state array the same way.
    ``grad`` is the parameters' ``grad_buffer`` vector when those lie end to end too, which
    backward then writes directly; else gradients are copied in."""

    def __init__(self, params: list[Parameter], flat: np.ndarray) -> None:
        self.param = Parameter(flat)
        self.views = [p.data for p in params]
        buffers = [p.grad_buffer for p in params]
        adopted = None if any(b is None for b in buffers) else end_to_end(buffers)
        if adopted is not None and adopted.shape == flat.shape and adopted.dtype == flat.dtype:
            self.grad, self.grad_views = adopted, buffers
        else:
            self.grad = np.empty(flat.shape, flat.dtype)
            self.grad_views = vector_views(self.grad, [view.shape for view in self.views])
        self.state: dict[str, np.ndarray] = {}
        self.state_views: dict[str, list[np.ndarray]] = {}
        self._blocks: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}

    def holds(self, params: list[Parameter]) -> bool:
        """Whether every parameter's ``.data`` is still this group's view (nothing rebound it),
        and its ``grad_buffer`` still this group's gradient view if it has one."""
        return len(params) == len(self.views) and all(
            p.data is view and (p.grad_buffer is None or p.grad_buffer is grad_view)
            for p, view, grad_view in zip(params, self.views, self.grad_views, strict=True))

    def gather_state(self, states: list[dict[str, Any]], key: str) -> None:
        """Make ``states[i][key]`` the i-th view of one flat vector (copying in any array that
        is not yet; a missing one starts at zero, as each optimizer initialises it)."""
        views = self.state_views.get(key)
        if views is None:
            self.state[key] = np.zeros(self.param.data.shape, self.param.data.dtype)
            views = self.state_views[key] = vector_views(self.state[key],
                                                         [view.shape for view in self.views])
        for state, view in zip(states, views, strict=True):
            current = state.get(key)
            if current is not view:
                if current is None:
                    view.fill(0)
                else:
                    np.copyto(view, current)
                state[key] = view

    def blocks(self) -> list[tuple[Parameter, np.ndarray, dict[str, np.ndarray]]]:
        """Consecutive cache-sized pieces (parameter, gradient, state arrays) of the vectors, cut
        at multiples of 64 elements so every piece starts cache-line aligned like the whole."""
        key = tuple(self.state)
        if key not in self._blocks:
            size = self.param.data.size
            count = max(1, -(-self.param.data.nbytes // BLOCK_BYTES))
            bounds = [min(size, -(-size * k // count // 64) * 64) for k in range(count + 1)]
            self._blocks[key] = [
                (Parameter(self.param.data[start:stop]), self.grad[start:stop],
                 {name: array[start:stop] for name, array in self.state.items()})
                for start, stop in itertools.pairwise(bounds) if stop > start]
        return self._blocks[key]


def step_as_vector(optimizer: Optimizer, flat_groups: dict[int, FlatGroup], index: int,
                   group: dict[str, Any]) -> bool:
    """One update of ``group`` (number ``index``) as one vector, if the step qualifies: every
    parameter has a gradient and the same step count, and the parameters lie end to end. False
    otherwise, and the caller updates parameter by parameter. ``flat_groups`` keeps each group's
    layout from step to step."""
    params = group["params"]
    if not params or any(p.grad is None for p in params):
        return False
    states = [optimizer.state.get(p) or {} for p in params]
    steps = {state.get("step", 0) for state in states}
    if len(steps) != 1:
        return False
    flat = flat_groups.get(index)
    if flat is None or not flat.holds(params):
        vector = end_to_end([p.data for p in params])
        if vector is None:
            return False
        # Only when the layout is made: gather_state would cast old state into it silently.
        for state in states:
            optimizer._check_state_dtype(state, vector.dtype)
        flat = flat_groups[index] = FlatGroup(params, vector)
    for key in optimizer._flat_state_keys(group):
        flat.gather_state(states, key)
    for param, state in zip(params, states, strict=True):
        optimizer.state[param] = state
    for view, param in zip(flat.grad_views, params, strict=True):
        if param.grad is not view:  # backward wrote it in place (see FlatGroup)
            np.copyto(view, param.grad)
    step = steps.pop()
    for block, grad, arrays in flat.blocks():
        optimizer._update(block, grad, group, {"step": step, **arrays}, optimizer._work)
    for state in states:
        state["step"] = step + 1
    return True
