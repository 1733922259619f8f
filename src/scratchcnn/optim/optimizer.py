"""The Optimizer base class: parameter groups, per-parameter state, zero_grad, state_dict.

Mirrors ``torch.optim.Optimizer``. A subclass supplies its hyper-parameter defaults, a
``_check_group`` that validates one group, and ``_update(param, grad, group, state, work)`` that
applies one step to one parameter *in place* on ``param.data`` (never rebinding it, so parameters
may be views into one flat vector).

State is keyed by the ``Parameter`` object itself (identity), so two layers whose parameters share
a name never share state.

A subclass whose update is elementwise sets ``_supports_flat``: it then lays each group's
parameters end to end when it is created and updates a whole group as one vector (see
``scratchcnn.optim.flat``; the same bits as parameter by parameter). As with torch's fused
kernels, nothing changes for the user but one thing: ``param.data`` arrays taken *before*
creating such an optimizer no longer alias the parameters (the Parameter objects, their values,
``state_dict`` and everything reached through the model are unchanged).

``state_dict()`` holds only NumPy arrays, plain numbers, booleans and
tuples of numbers, so it can be written with ``np.savez`` (arrays) plus JSON (everything else).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from scratchcnn.nn.module import Parameter
from scratchcnn.optim.flat import FlatGroup, Workspace, lay_out_end_to_end, step_as_vector

ParamsT = Iterable[Parameter] | Iterable[Mapping[str, Any]] | Iterable[tuple[str, Parameter]]


# Group options a PyTorch state_dict carries that only choose PyTorch's kernels.
_TORCH_ONLY_OPTIONS = frozenset(
    {"foreach", "fused", "differentiable", "capturable", "decoupled_weight_decay"}
)


class Optimizer:
    """Base class of every optimizer; ``params`` is an iterable of Parameters, of
    ``(name, Parameter)`` pairs, or of dicts (parameter groups with per-group options)."""

    # Names of the per-parameter state entries that are arrays shaped like the parameter, and
    # of those that are plain numbers; load_state_dict accepts nothing else.
    _array_state: ClassVar[tuple[str, ...]] = ()
    _scalar_state: ClassVar[tuple[str, ...]] = ()
    _required_state: ClassVar[tuple[str, ...]] = ()  # what a non-empty state must contain
    # Whether groups are laid end to end and stepped as one vector (see the module docstring):
    # subclasses whose ``_update`` is elementwise and whose state arrays ``_flat_state_keys``
    # names set it.
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
        if self._supports_flat:
            lay_out_end_to_end(params)
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
            if self._supports_flat and step_as_vector(self, self._flat_groups, index, group):
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
        decoupled = getattr(self, "_decoupled_weight_decay", False)
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            # torch's Adam(decoupled_weight_decay=True) is AdamW: a different update rule.
            if bool(saved.get("decoupled_weight_decay", decoupled)) != decoupled:
                wanted = "AdamW" if saved["decoupled_weight_decay"] else "Adam"
                raise ValueError(
                    f"{where}: parameter group {index} has decoupled_weight_decay="
                    f"{bool(saved['decoupled_weight_decay'])}, an update rule this "
                    f"{type(self).__name__} does not follow; load it into {wanted}"
                )
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
