"""The Optimizer base class: parameter groups, per-parameter state, zero_grad, state_dict.

Mirrors ``torch.optim.Optimizer``. A subclass supplies its hyper-parameter defaults, a
``_check_group`` that validates one group, and ``_update(param, grad, group, state, work)`` that
applies one step to one parameter *in place* on ``param.data`` (never rebinding it, so parameters
may be views into one flat vector).

State is keyed by the ``Parameter`` object itself (identity), so two layers whose parameters share
a name never share state.

Flat groups (a subclass opts in with ``_supports_flat`` and ``_flat_state_keys``): when a group's
parameters lie end to end in one array (``scratchcnn.nn.flatten_parameters`` lays them out so;
the optimizer itself never rebinds ``param.data``), a step in which every parameter has a
gradient and the same step count updates the whole group at once, as one contiguous vector cut
into cache-sized blocks (split across ``num_threads`` threads, or with ``workers =
"processes"`` across forked worker processes, see ``scratchcnn.forked``), instead of parameter by
parameter. The arithmetic is elementwise and identical, so results are bit-for-bit those of the
per-parameter path, which runs whenever a step does not qualify (parameters not end to end, some
gradient None, unequal step counts, mixed dtypes). ``DataParallel.train_step`` can instead share
such a step among its worker processes, each adding up its own blocks' gradients first
(``split_step``, ``SplitStep``).

``state_dict()`` holds only NumPy arrays, plain numbers, booleans and
tuples of numbers, so it can be written with ``np.savez`` (arrays) plus JSON (everything else).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.lib.stride_tricks import as_strided

from scratchcnn.nn.module import Parameter, vector_views

ParamsT = Iterable[Parameter] | Iterable[Mapping[str, Any]] | Iterable[tuple[str, Parameter]]


# Group options a PyTorch state_dict carries that only choose PyTorch's kernels.
_TORCH_ONLY_OPTIONS = frozenset(
    {"foreach", "fused", "differentiable", "capturable", "decoupled_weight_decay"}
)


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


# Flat updates run block by block, each block's arrays together small enough for L2.
_BLOCK_BYTES = 256 * 1024


def _root(array: np.ndarray) -> Any:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _end_to_end(arrays: list[np.ndarray]) -> np.ndarray | None:
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
    ``grad`` is the parameters' ``grad_buffer`` vector when those lie end to end too
    (``flatten_parameters``), which backward then writes directly; else gradients are copied in."""

    def __init__(self, params: list[Parameter], flat: np.ndarray) -> None:
        self.param = Parameter(flat)
        self.views = [p.data for p in params]
        buffers = [p.grad_buffer for p in params]
        adopted = None if any(b is None for b in buffers) else _end_to_end(buffers)
        if adopted is not None and adopted.shape == flat.shape and adopted.dtype == flat.dtype:
            self.grad, self.grad_views = adopted, buffers
        else:
            self.grad = np.empty(flat.shape, flat.dtype)
            self.grad_views = self._split(self.grad)
        self.state: dict[str, np.ndarray] = {}
        self.state_views: dict[str, list[np.ndarray]] = {}
        self._chunks: dict[tuple[int, tuple[str, ...]], list[tuple[Any, ...]]] = {}

    def chunks(self, count: int) -> list[tuple[Parameter, np.ndarray, dict[str, np.ndarray],
                                                slice]]:
        """``count`` consecutive pieces (parameter, grad, state arrays, and where they lie in
        the vectors) of the vectors, cut at multiples of 64 elements so every piece starts
        cache-line aligned like the whole."""
        key = (count, tuple(self.state))
        if key not in self._chunks:
            size = self.param.data.size
            bounds = [min(size, -(-size * k // count // 64) * 64) for k in range(count + 1)]
            self._chunks[key] = [
                (Parameter(self.param.data[start:stop]), self.grad[start:stop],
                 {name: array[start:stop] for name, array in self.state.items()},
                 slice(start, stop))
                for start, stop in itertools.pairwise(bounds) if stop > start]
        return self._chunks[key]

    def _split(self, flat: np.ndarray) -> list[np.ndarray]:
        return vector_views(flat, [view.shape for view in self.views])

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
            self.state[key] = np.empty(self.param.data.shape, self.param.data.dtype)
            self.state[key].fill(0)
            views = self.state_views[key] = self._split(self.state[key])
        for state, view in zip(states, views, strict=True):
            current = state.get(key)
            if current is not view:
                if current is None:
                    view.fill(0)
                else:
                    np.copyto(view, current)
                state[key] = view


class Optimizer:
    """Base class of every optimizer; ``params`` is an iterable of Parameters, of
    ``(name, Parameter)`` pairs, or of dicts (parameter groups with per-group options)."""

    # Names of the per-parameter state entries that are arrays shaped like the parameter, and
    # of those that are plain numbers; load_state_dict accepts nothing else.
    _array_state: ClassVar[tuple[str, ...]] = ()
    _scalar_state: ClassVar[tuple[str, ...]] = ()
    _required_state: ClassVar[tuple[str, ...]] = ()  # what a non-empty state must contain
    # Whether the flat-group path applies (see the module docstring): subclasses whose
    # ``_update`` is elementwise and whose state arrays ``_flat_state_keys`` names set it.
    _supports_flat: ClassVar[bool] = False

    def __init__(self, params: ParamsT, defaults: Mapping[str, Any]) -> None:
        if isinstance(params, (Parameter, np.ndarray)):
            raise TypeError(
                f"{type(self).__name__}: params must be an iterable of Parameters or dicts, got "
                f"a single {type(params).__name__}; pass e.g. model.parameters() or [param]"
            )
        self.defaults: dict[str, Any] = dict(defaults)
        self.state: dict[Parameter, dict[str, Any]] = {}
        self.param_groups: list[dict[str, Any]] = []
        self._work = Workspace()
        self._flat_groups: dict[int, FlatGroup] = {}
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # -- groups -------------------------------------------------------------------------------

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group; options it leaves out take the optimizer's defaults."""
        name = type(self).__name__
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError(f"{name}: a parameter group must be a dict with a 'params' entry")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, Parameter):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(f"{name}: parameters must be in an ordered collection, not a set")
        params = list(params)
        if params and all(isinstance(p, tuple) and len(p) == 2 for p in params):
            group["param_names"] = [p[0] for p in params]
            params = [p[1] for p in params]
        for param in params:
            if not isinstance(param, Parameter):
                raise TypeError(
                    f"{name} can only optimize Parameters, but one of the params is "
                    f"{type(param).__name__}"
                )
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{name}: a parameter group contains the same parameter twice")
        group["params"] = params
        for key, default in self.defaults.items():
            group.setdefault(key, default)
        taken = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in taken for p in params):
            raise ValueError(f"{name}: some parameters appear in more than one parameter group")
        self._check_group(group)
        self.param_groups.append(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError for invalid hyper-parameters in ``group``."""

    # -- stepping -----------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every gradient (``set_to_none``) or fill them with zeros in place."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.fill(0)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every parameter that has a gradient (those whose ``.grad`` is None are skipped,
        and their state does not advance). ``closure`` re-evaluates the loss, which is returned."""
        loss = closure() if closure is not None else None
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.shape != param.data.shape or grad.dtype != param.data.dtype:
                    raise ValueError(
                        f"{type(self).__name__}: parameter group {index} has a parameter of shape "
                        f"{param.data.shape} and dtype {param.data.dtype} whose .grad has shape "
                        f"{grad.shape} and dtype {grad.dtype}; they must match"
                    )
            if self._supports_flat and self._flat_step(index, group):
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state.get(param)
                if state is None:
                    state = self.state[param] = {}
                self._update(param, param.grad, group, state, self._work)
        return loss

    def _flat_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The per-parameter state arrays an update of ``group`` uses (flat groups only)."""
        return ()

    def _flat_step(self, index: int, group: dict[str, Any]) -> bool:
        """One update of the whole group as one vector, if the step qualifies; False otherwise
        (the caller then updates parameter by parameter)."""
        params = group["params"]
        if not params or any(p.grad is None for p in params):
            return False
        if len({p.data.dtype for p in params}) != 1:
            return False
        states = [self.state.get(p) or {} for p in params]
        steps = {state.get("step", 0) for state in states}
        if len(steps) != 1:
            return False
        flat = self._flat_groups.get(index)
        if flat is None or not flat.holds(params):
            vector = _end_to_end([p.data for p in params])
            if vector is None:
                return False  # not laid out end to end: update parameter by parameter
            # Only when the layout is made: gather_state would cast old state into it silently.
            for state in states:
                self._check_state_dtype(state, vector.dtype)
            flat = self._flat_groups[index] = FlatGroup(params, vector)
        for key in self._flat_state_keys(group):
            flat.gather_state(states, key)
        for param, state in zip(params, states, strict=True):
            self.state[param] = state
        for view, param in zip(flat.grad_views, params, strict=True):
            if param.grad is not view:  # backward wrote it in place (see FlatGroup)
                np.copyto(view, param.grad)
        step = steps.pop()
        update_blocks(self, flat, _part(group, step, _block_count(flat), 0, 1), self._work)
        for state in states:
            state["step"] = step + 1
        return True

    def _check_state_dtype(self, state: Mapping[str, Any], dtype: np.dtype) -> None:
        """Raise if ``state``'s arrays are not of ``dtype``, the parameter's: after
        ``model.double()`` (or ``.float()``) the update would silently compute in the old dtype
        and round (torch's Adam raises there; its SGD rounds silently)."""
        for key in self._array_state:
            array = state.get(key)
            if array is not None and array.dtype != dtype:
                raise RuntimeError(
                    f"{type(self).__name__}: a parameter is {np.dtype(dtype)} but its optimizer "
                    f"state {key!r} is {array.dtype}: the parameters changed dtype (model.double() "
                    "or .float()) since this optimizer's state was made. Create a new optimizer "
                    "after changing the model's dtype, or cast the state with "
                    "optimizer.load_state_dict(optimizer.state_dict())"
                )

    def _update(
        self,
        param: Parameter,
        grad: np.ndarray,
        group: dict[str, Any],
        state: dict[str, Any],
        work: Workspace,
    ) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement _update")

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {name: array or number}}, "param_groups": [{..., "params":
        [indices]}]}`` as in PyTorch; parameters are numbered in group order from 0. Arrays are
        copies, so later steps do not change a saved state_dict."""
        index_of: dict[int, int] = {}
        packed_groups = []
        for group in self.param_groups:
            packed = {key: value for key, value in group.items() if key != "params"}
            for param in group["params"]:
                index_of.setdefault(id(param), len(index_of))
            packed["params"] = [index_of[id(param)] for param in group["params"]]
            packed_groups.append(packed)
        packed_state = {}
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if state:
                    packed_state[index_of[id(param)]] = {
                        key: value.copy() if isinstance(value, np.ndarray) else value
                        for key, value in state.items()
                    }
        return {"state": packed_state, "param_groups": packed_groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by ``state_dict()`` (ours, or PyTorch's with tensors converted by
        ``np.asarray``). Everything is validated before anything changes: the number of groups,
        of parameters per group, the state names and the array shapes must match. Arrays are
        cast to each parameter's dtype; group options (lr, betas, and what schedulers added,
        such as initial_lr) are restored, but PyTorch's implementation switches (``foreach``,
        ``fused``, ...) are ignored."""
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(
            state_dict
        ):
            raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups' entries")
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{where}: the state_dict has {len(saved_groups)} parameter groups but this "
                f"optimizer has {len(self.param_groups)}; it must come from the same setup"
            )
        param_of: dict[int, Parameter] = {}
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            saved_ids = list(saved.get("params", ()))
            if len(saved_ids) != len(group["params"]):
                raise ValueError(
                    f"{where}: parameter group {index} has {len(saved_ids)} parameters in the "
                    f"state_dict but {len(group['params'])} in this optimizer"
                )
            for saved_id, param in zip(saved_ids, group["params"], strict=True):
                param_of[int(saved_id)] = param

        new_state: dict[Parameter, dict[str, Any]] = {}
        for raw_id, entries in dict(state_dict["state"]).items():
            try:
                param = param_of[int(raw_id)]
            except (KeyError, ValueError):
                raise ValueError(
                    f"{where}: state for parameter {raw_id!r}, which no parameter group lists"
                ) from None
            new_state[param] = self._load_param_state(where, raw_id, param, entries)

        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            for key, value in saved.items():
                if key == "params" or key in _TORCH_ONLY_OPTIONS:
                    continue
                if isinstance(group.get(key), tuple) and isinstance(value, list):
                    value = tuple(value)  # JSON turns tuples (betas) into lists
                group[key] = value
        self.state = new_state

    def _load_param_state(
        self, where: str, raw_id: Any, param: Parameter, entries: Mapping[str, Any]
    ) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for key, value in entries.items():
            if key in self._array_state:
                array = np.asarray(value)
                if array.shape != param.data.shape:
                    raise ValueError(
                        f"{where}: state {key!r} of parameter {raw_id} has shape {array.shape} "
                        f"but the parameter has shape {param.data.shape}"
                    )
                if not np.issubdtype(array.dtype, np.number):
                    raise ValueError(
                        f"{where}: state {key!r} of parameter {raw_id} has dtype {array.dtype}"
                    )
                state[key] = np.array(array, dtype=param.data.dtype, order="C", copy=True)
            elif key in self._scalar_state:
                number = float(np.asarray(value))
                if not (math.isfinite(number) and number >= 0 and number == int(number)):
                    raise ValueError(
                        f"{where}: state {key!r} of parameter {raw_id} must be a non-negative "
                        f"whole number, got {value!r}"
                    )
                state[key] = int(number)
            else:
                raise ValueError(
                    f"{where}: unknown state {key!r} for parameter {raw_id}; "
                    f"{type(self).__name__} keeps {self._array_state + self._scalar_state}"
                )
        missing = [key for key in self._required_state if key not in state]
        if state and missing:
            raise ValueError(f"{where}: state of parameter {raw_id} lacks {missing}")
        return state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            lines.extend(
                f"    {key}: {group[key]}" for key in sorted(group) if key != "params"
            )
        lines.append(")")
        return "\n".join(lines)


def _plain(value: Any) -> Any:
    """A group option as JSON can carry it (tuples as lists, NumPy scalars as Python ones)."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def _block_count(flat: FlatGroup, threads: int = 1) -> int:
    """How many blocks a flat update split across ``threads`` cuts the vectors into:
    cache-sized, so that the update's dozen passes re-read a block from L2 instead of streaming
    whole vectors from memory each time (~30% faster for 400k floats), and as many for each
    thread (scratch-notebook-cnn's 7 blocks, 4 for one thread and 3 for the other, became 8)."""
    blocks = -(-flat.param.data.nbytes // _BLOCK_BYTES)
    return max(1, -(-blocks // threads) * threads)


def _part(group: dict[str, Any], step: int, pieces: int, thread: int,
          threads: int) -> dict[str, Any]:
    """Thread ``thread`` of ``threads``'s share of a flat update, as JSON can carry it to a
    worker process: the group's options, the step count, and the blocks (``update_blocks``)."""
    options = {key: _plain(value) for key, value in group.items() if key != "params"}
    return {"group": options, "step": step, "pieces": pieces, "thread": thread,
            "threads": threads}


def update_blocks(optimizer: Optimizer, flat: FlatGroup, part: dict[str, Any], work: Workspace,
                  addends: Sequence[np.ndarray] = ()) -> None:
    """Update ``part``'s blocks of ``flat`` (see ``_part``): every ``threads``-th block from
    ``thread`` on. ``addends`` (vectors laid out like the gradient vector) are first added, in
    order, into each block's gradient."""
    group, step = part["group"], part["step"]
    for param, grad, arrays, span in flat.chunks(part["pieces"])[part["thread"]::part["threads"]]:
        for addend in addends:
            grad += addend[span]
        optimizer._update(param, grad, group, {"step": step, **arrays}, work)
