"""Learning-rate schedulers, as ``torch.optim.lr_scheduler``: each ``step()`` (call it after
``optimizer.step()``, once per epoch) writes the next learning rate into every parameter group's
``"lr"`` (``ReduceLROnPlateau.step(metrics)`` takes the epoch's validation metric). The recursive
("chainable") formulas are PyTorch's, so the values agree with PyTorch's step for step, to the
last bit, including past the end of a schedule."""

from __future__ import annotations

import itertools
import math
import numbers
import types
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from scratchcnn.optim.optimizer import Optimizer

# Keys of torch.optim.lr_scheduler state_dicts with no counterpart here (see load_state_dict).
_TORCH_ONLY_KEYS = frozenset({"_get_lr_called_within_step"})


class LRScheduler:
    """Base class: sets ``group["initial_lr"]`` (kept in ``base_lrs``) and takes the initial
    step, so that right after construction ``get_last_lr()`` is the epoch-0 learning rate."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        _check_optimizer(self, optimizer)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for index, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise ValueError(
                        f"{type(self).__name__}: param_groups[{index}] has no 'initial_lr', "
                        f"needed to resume at last_epoch={last_epoch}; load the optimizer's "
                        "state_dict first, or use last_epoch=-1 for a fresh run"
                    )
        self.base_lrs: list[float] = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self) -> None:
        self._step_count = 0  # step() calls, kept (as in PyTorch's state_dict) for inspection
        self._is_initial = True
        self.step()
        self._is_initial = False

    def get_lr(self) -> list[float]:
        """The learning rates for epoch ``self.last_epoch``, one per parameter group."""
        raise NotImplementedError(f"{type(self).__name__} does not implement get_lr")

    def step(self) -> None:
        """Advance one epoch and write the new learning rates into the optimizer."""
        self._step_count += 1
        self._update_lr()

    def _update_lr(self, epoch: int | None = None) -> None:
        """Advance one epoch (``epoch=None``), or jump to ``epoch`` using the closed form where
        there is one (as PyTorch does; SequentialLR restarts a scheduler at 0 this way)."""
        if epoch is None:
            self.last_epoch += 1
            values = self.get_lr()
        else:
            self.last_epoch = epoch
            closed_form = getattr(self, "_get_closed_form_lr", None)
            values = closed_form() if closed_form is not None else self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = lr
        self._last_lr = self._current_lrs()

    def _state_mapping(self, state_dict: Any) -> dict[str, Any]:
        """``state_dict`` as a dict of its own, or a ValueError if it is not a mapping."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict, got "
                             f"{type(state_dict).__name__}")
        return dict(state_dict)

    def get_last_lr(self) -> list[float]:
        """The learning rates the last ``step()`` set, one per parameter group."""
        return list(self._last_lr)

    def _current_lrs(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Every attribute except the optimizer: plain numbers and lists (JSON-friendly)."""
        return {
            key: list(value) if isinstance(value, list) else value
            for key, value in self.__dict__.items()
            if key != "optimizer"
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by ``state_dict()`` of the same scheduler class."""
        where = f"{type(self).__name__}.load_state_dict"
        state_dict = self._state_mapping(state_dict)
        known = set(self.state_dict())
        # torch's schedulers also save a flag of their own call stack, False between steps.
        state_dict = {k: v for k, v in state_dict.items() if k not in _TORCH_ONLY_KEYS}
        unknown = sorted(set(state_dict) - known)
        if unknown:
            raise ValueError(
                f"{where}: unexpected keys {unknown}; the state_dict must come from a "
                f"{type(self).__name__}"
            )
        for key in ("base_lrs", "_last_lr"):
            if key in state_dict and len(state_dict[key]) != len(self.optimizer.param_groups):
                raise ValueError(
                    f"{where}: {key} has {len(state_dict[key])} entries but the optimizer has "
                    f"{len(self.optimizer.param_groups)} parameter groups"
                )
        self.__dict__.update(
            {key: list(v) if isinstance(v, (list, tuple)) else v for key, v in state_dict.items()}
        )


class StepLR(LRScheduler):
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs:
    lr_epoch = initial_lr · gamma ** (epoch // step_size)."""

    def __init__(
        self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1
    ) -> None:
        if int(step_size) != step_size or step_size < 1:
            raise ValueError(f"StepLR: step_size must be a positive integer, got {step_size!r}")
        self.step_size = int(step_size)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_lrs()
        return [lr * self.gamma for lr in self._current_lrs()]

    def _get_closed_form_lr(self) -> list[float]:
        return [
            base_lr * self.gamma ** (self.last_epoch // self.step_size) for base_lr in self.base_lrs
        ]


class CosineAnnealingLR(LRScheduler):
    r"""Cosine annealing from the initial lr down to ``eta_min`` over ``T_max`` epochs, then back
    up (the schedule is periodic with period 2·T_max), in PyTorch's recursive form:

    .. code-block:: text

        lr_t = eta_min + (lr_{t-1} - eta_min) · (1 + cos(π t / T_max)) / (1 + cos(π (t-1) / T_max))

    which equals eta_min + (initial_lr - eta_min) · (1 + cos(π t / T_max)) / 2 while no one else
    changes the lr. At t - 1 - T_max ≡ 0 (mod 2·T_max), where the denominator would vanish, the
    step adds (initial_lr - eta_min) · (1 - cos(π / T_max)) / 2 instead.
    """

    def __init__(
        self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        if not T_max > 0:
            raise ValueError(f"CosineAnnealingLR: T_max must be positive, got {T_max!r}")
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        t, T, eta_min = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._current_lrs()
        if (t - 1 - T) % (2 * T) == 0:
            return [
                lr + (base_lr - eta_min) * (1 - math.cos(math.pi / T)) / 2
                for base_lr, lr in zip(self.base_lrs, self._current_lrs(), strict=True)
            ]
        return [
            (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T))
            * (lr - eta_min)
            + eta_min
            for lr in self._current_lrs()
        ]

    def _get_closed_form_lr(self) -> list[float]:
        return [
            self.eta_min
            + (base_lr - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
            for base_lr in self.base_lrs
        ]


class LinearLR(LRScheduler):
    """Scale the initial lr by a factor going linearly from ``start_factor`` (epoch 0) to
    ``end_factor`` (epoch ``total_iters`` and after): a warm-up when start_factor < 1."""

    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError(f"LinearLR: start_factor must be in (0, 1], got {start_factor}")
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError(f"LinearLR: end_factor must be in [0, 1], got {end_factor}")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        if t == 0:
            return [lr * self.start_factor for lr in self._current_lrs()]
        if self._is_initial or t > self.total_iters:
            return self._current_lrs()
        span = self.end_factor - self.start_factor
        factor = 1.0 + span / (self.total_iters * self.start_factor + (t - 1) * span)
        return [lr * factor for lr in self._current_lrs()]

    def _get_closed_form_lr(self) -> list[float]:
        return [
            base_lr
            * (
                self.start_factor
                + (self.end_factor - self.start_factor)
                * min(self.total_iters, self.last_epoch)
                / self.total_iters
            )
            for base_lr in self.base_lrs
        ]


class OneCycleLR(LRScheduler):
    """The 1cycle policy, stepped once per *batch*: the lr rises from max_lr / div_factor to
    ``max_lr`` over the first ``pct_start`` of ``total_steps``, then anneals to
    initial_lr / final_div_factor (``three_phase`` inserts a symmetric descent back to the
    initial lr first). With ``cycle_momentum`` the momentum (SGD) or beta1 (Adam) moves the
    opposite way between ``max_momentum`` and ``base_momentum``. Closed form per step:
    within a phase at fraction p, value = anneal(start, end, p) with
    cos: end + (start - end)/2 · (1 + cos(π p)),  linear: start + (end - start) · p.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float | list[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: float | list[float] = 0.85,
        max_momentum: float | list[float] = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"OneCycleLR: {type(optimizer).__name__} is not an Optimizer")
        if total_steps is not None:
            if not isinstance(total_steps, int) or total_steps <= 0:
                raise ValueError(
                    f"OneCycleLR: total_steps must be a positive int, got {total_steps}"
                )
            self.total_steps = total_steps
        elif epochs is not None and steps_per_epoch is not None:
            for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(f"OneCycleLR: {name} must be a positive int, got {value}")
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("OneCycleLR: give either total_steps or epochs and steps_per_epoch")
        if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
            raise ValueError(f"OneCycleLR: pct_start must be a float in [0, 1], got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"OneCycleLR: anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}"
            )
        self.anneal_strategy = anneal_strategy
        rise_end = float(pct_start * self.total_steps) - 1
        # Each phase: (last step of the phase, start lr key, end lr key, momentum keys).
        if three_phase:
            self._phases = [
                (rise_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                (float(2 * pct_start * self.total_steps) - 2, "max_lr", "initial_lr",
                 "base_momentum", "max_momentum"),
                (self.total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
            ]
        else:
            self._phases = [
                (rise_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                (self.total_steps - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"),
            ]

        groups = optimizer.param_groups
        max_lrs = _per_group("OneCycleLR", "max_lr", groups, max_lr)
        if last_epoch == -1:
            for group, group_max_lr in zip(groups, max_lrs, strict=True):
                group["initial_lr"] = group_max_lr / div_factor
                group["max_lr"] = group_max_lr
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError(
                    f"OneCycleLR: {type(optimizer).__name__} has neither momentum nor betas; "
                    "pass cycle_momentum=False"
                )
            self.use_beta1 = "betas" in optimizer.defaults
            max_momenta = _per_group("OneCycleLR", "max_momentum", groups, max_momentum)
            base_momenta = _per_group("OneCycleLR", "base_momentum", groups, base_momentum)
            if last_epoch == -1:
                for group, top, bottom in zip(groups, max_momenta, base_momenta, strict=True):
                    self._set_momentum(group, top)
                    group["max_momentum"] = top
                    group["base_momentum"] = bottom
        super().__init__(optimizer, last_epoch)

    def _set_momentum(self, group: dict[str, Any], value: float) -> None:
        if self.use_beta1:
            group["betas"] = (value, *group["betas"][1:])
        else:
            group["momentum"] = value

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(
                f"OneCycleLR: tried to step {step} times but total_steps is {self.total_steps}"
            )
        lrs = []
        for group in self.optimizer.param_groups:
            phase_start = 0.0
            for index, (phase_end, lr_from, lr_to, m_from, m_to) in enumerate(self._phases):
                if step <= phase_end or index == len(self._phases) - 1:
                    pct = (step - phase_start) / (phase_end - phase_start)
                    lrs.append(self._anneal(group[lr_from], group[lr_to], pct))
                    if self.cycle_momentum:
                        self._set_momentum(group, self._anneal(group[m_from], group[m_to], pct))
                    break
                phase_start = phase_end
        return lrs


class MultiStepLR(LRScheduler):
    """Multiply the learning rate by ``gamma`` at each milestone epoch:
    lr_epoch = initial_lr · gamma ** (number of milestones ≤ epoch). A milestone listed n times
    multiplies by gamma ** n (``milestones`` is kept as a ``collections.Counter``, as in PyTorch).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Iterable[int],
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.milestones = _milestone_counter(milestones)
        self.gamma = _check_gamma(self, gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch not in self.milestones:
            return self._current_lrs()
        return [lr * self.gamma ** self.milestones[self.last_epoch] for lr in self._current_lrs()]

    def _get_closed_form_lr(self) -> list[float]:
        milestones = sorted(self.milestones.elements())
        return [
            base_lr * self.gamma ** bisect_right(milestones, self.last_epoch)
            for base_lr in self.base_lrs
        ]

    def state_dict(self) -> dict[str, Any]:
        """As the base class; ``milestones`` is a ``Counter`` {epoch: count}, as in PyTorch
        (after a JSON round trip its keys are strings, which load_state_dict accepts)."""
        state = super().state_dict()
        state["milestones"] = Counter(self.milestones)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = self.milestones
        if isinstance(saved, Mapping):
            self.milestones = Counter({int(epoch): int(n) for epoch, n in saved.items()})
        else:
            self.milestones = _milestone_counter(saved)


class ExponentialLR(LRScheduler):
    """Multiply the learning rate by ``gamma`` every epoch:
    lr_epoch = initial_lr · gamma ** epoch."""

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = _check_gamma(self, gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self._is_initial:
            return self._current_lrs()
        return [lr * self.gamma for lr in self._current_lrs()]

    def _get_closed_form_lr(self) -> list[float]:
        return [base_lr * self.gamma**self.last_epoch for base_lr in self.base_lrs]


class LambdaLR(LRScheduler):
    """lr_epoch = initial_lr · lr_lambda(epoch), with one function for every parameter group or
    a list of one per group. ``state_dict()`` holds ``lr_lambdas``: None for a plain function or
    lambda (not saved), a copy of ``__dict__`` for a callable object, as in PyTorch."""

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(self, optimizer)
        self.lr_lambdas = _per_group("LambdaLR", "lr_lambda", optimizer.param_groups, lr_lambda)
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(
                    "LambdaLR: lr_lambda must be a function of the epoch, or a list of them, "
                    f"got {type(fn).__name__}"
                )
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            base_lr * lr_lambda(self.last_epoch)
            for lr_lambda, base_lr in zip(self.lr_lambdas, self.base_lrs, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lr_lambdas"] = [
            None
            if isinstance(fn, types.FunctionType) or not hasattr(fn, "__dict__")
            else dict(fn.__dict__)
            for fn in self.lr_lambdas
        ]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the counters, and each saved callable object's attributes into this
        scheduler's own (the functions themselves are never loaded)."""
        state = self._state_mapping(state_dict)
        saved = state.pop("lr_lambdas", None) or [None] * len(self.lr_lambdas)
        if len(saved) != len(self.lr_lambdas):
            raise ValueError(
                f"LambdaLR.load_state_dict: lr_lambdas has {len(saved)} entries but this "
                f"scheduler has {len(self.lr_lambdas)}"
            )
        super().load_state_dict(state)
        for fn, attributes in zip(self.lr_lambdas, saved, strict=True):
            if attributes is not None:
                fn.__dict__.update(attributes)


class SequentialLR(LRScheduler):
    """Run ``schedulers[0]`` until epoch ``milestones[0]``, then ``schedulers[1]`` until
    ``milestones[1]``, and so on: at milestone i, scheduler i + 1 restarts at its epoch 0 (its
    closed form, e.g. the initial lr for CosineAnnealingLR) and is stepped from there, e.g.
    LinearLR warm-up then CosineAnnealingLR. Construct the schedulers on ``optimizer`` first;
    only ``schedulers[0]``'s initial step counts (the lr restarts from ``initial_lr``)."""

    def __init__(
        self,
        optimizer: Optimizer,
        schedulers: Sequence[LRScheduler],
        milestones: Sequence[int],
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(self, optimizer)
        if not isinstance(schedulers, (list, tuple)) or not schedulers:
            raise ValueError("SequentialLR: schedulers must be a non-empty list of schedulers")
        for index, scheduler in enumerate(schedulers):
            if not isinstance(scheduler, LRScheduler):
                raise TypeError(
                    f"SequentialLR: schedulers[{index}] is a {type(scheduler).__name__}, "
                    "not a learning-rate scheduler"
                )
            if isinstance(scheduler, ReduceLROnPlateau):
                raise ValueError(
                    f"SequentialLR: schedulers[{index}] is a ReduceLROnPlateau, whose step() "
                    "needs a metric; it cannot be sequenced"
                )
            if scheduler.optimizer is not optimizer:
                raise ValueError(
                    f"SequentialLR: schedulers[{index}] ({type(scheduler).__name__}) drives "
                    "another optimizer; all schedulers must belong to this one"
                )
        if not isinstance(milestones, (list, tuple)) or len(milestones) != len(schedulers) - 1:
            raise ValueError(
                f"SequentialLR: expected {len(schedulers) - 1} milestones (one fewer than the "
                f"schedulers), got {milestones!r}"
            )
        if any(not _is_int(m) or m < 1 for m in milestones) or any(
            a >= b for a, b in itertools.pairwise(milestones)
        ):
            raise ValueError(
                f"SequentialLR: milestones must be increasing positive epochs, got {milestones!r}"
            )
        self._schedulers = list(schedulers)
        self._milestones = [int(m) for m in milestones]
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self.recursive_undo()  # the schedulers' own initial steps do not count
        index = bisect_right(self._milestones, 0)
        self._schedulers[index]._initial_step()
        self._last_lr = self._schedulers[index].get_last_lr()

    def recursive_undo(self, sched: LRScheduler | None = None) -> None:
        """Take back the initial step of every (nested) scheduler."""
        scheduler = self if sched is None else sched
        if hasattr(scheduler, "_schedulers"):
            for inner in scheduler._schedulers:
                self.recursive_undo(inner)
        elif hasattr(scheduler, "last_epoch"):
            scheduler.last_epoch -= 1

    def step(self) -> None:
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        """Its own counters plus ``_schedulers``: every scheduler's state_dict, in order."""
        state = {
            key: list(value) if isinstance(value, list) else value
            for key, value in self.__dict__.items()
            if key not in ("optimizer", "_schedulers")
        }
        state["_schedulers"] = [scheduler.state_dict() for scheduler in self._schedulers]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = self._state_mapping(state_dict)
        saved = state.pop("_schedulers", None)
        if saved is None or len(saved) != len(self._schedulers):
            raise ValueError(
                f"SequentialLR.load_state_dict: _schedulers must hold {len(self._schedulers)} "
                f"state_dicts, got {None if saved is None else len(saved)}"
            )
        super().load_state_dict(state)
        for scheduler, scheduler_state in zip(self._schedulers, saved, strict=True):
            scheduler.load_state_dict(scheduler_state)


class ReduceLROnPlateau(LRScheduler):
    """Reduce the learning rate when a metric stops improving; call ``step(metric)`` once per
    epoch. A metric is better than the best so far when (mode, threshold_mode):
    min/rel: m < best · (1 - threshold); min/abs: m < best - threshold;
    max/rel: m > best · (1 + threshold); max/abs: m > best + threshold.
    After more than ``patience`` epochs without one, lr ← max(lr · factor, min_lr) in every group
    (unless that changes it by at most ``eps``), then ``cooldown`` epochs pass with bad epochs
    not counted."""

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0,
        eps: float = 1e-8,
    ) -> None:
        if not _is_real(factor) or not 0 <= factor < 1:
            raise ValueError(f"ReduceLROnPlateau: factor must be in [0, 1), got {factor!r}")
        self.factor = factor
        _check_optimizer(self, optimizer)
        self.optimizer = optimizer
        self.min_lrs = _per_group("ReduceLROnPlateau", "min_lr", optimizer.param_groups, min_lr)
        # torch keeps the single value to give groups added later (add_param_group).
        self.default_min_lr = None if isinstance(min_lr, (list, tuple)) else min_lr
        if any(not _is_real(value) or value < 0 for value in self.min_lrs):
            raise ValueError(f"ReduceLROnPlateau: min_lr must be >= 0, got {min_lr!r}")
        for name, value in (("patience", patience), ("cooldown", cooldown)):
            if not _is_int(value) or value < 0:
                raise ValueError(
                    f"ReduceLROnPlateau: {name} must be a non-negative integer, got {value!r}"
                )
        for name, value in (("threshold", threshold), ("eps", eps)):
            if not _is_real(value) or value < 0:
                raise ValueError(f"ReduceLROnPlateau: {name} must be >= 0, got {value!r}")
        self.patience = patience
        self.cooldown = cooldown
        self.eps = eps
        self.last_epoch = 0
        self._last_lr = self._current_lrs()
        self._init_is_better(mode=mode, threshold=threshold, threshold_mode=threshold_mode)
        self._reset()

    def _reset(self) -> None:
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def step(self, metrics: float) -> None:  # type: ignore[override]
        """Record this epoch's metric (a number, e.g. the validation loss) and reduce the
        learning rates if it has not improved for more than ``patience`` epochs."""
        try:
            current = float(metrics)
        except (TypeError, ValueError):
            raise TypeError(
                f"ReduceLROnPlateau.step: metrics must be a number, got {type(metrics).__name__}"
            ) from None
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in cooldown are not counted
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self._current_lrs()

    def _reduce_lr(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"ReduceLROnPlateau: the optimizer has {len(groups)} parameter groups but "
                    f"min_lrs has {len(self.min_lrs)} (a group was added?); set min_lrs to match"
                )
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs, strict=True):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def _init_is_better(self, mode: str, threshold: float, threshold_mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"ReduceLROnPlateau: mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(
                f"ReduceLROnPlateau: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}"
            )
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._init_is_better(
            mode=self.mode, threshold=self.threshold, threshold_mode=self.threshold_mode
        )


def _check_optimizer(scheduler: LRScheduler, optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{type(scheduler).__name__}: {type(optimizer).__name__} is not an Optimizer"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_gamma(scheduler: LRScheduler, gamma: Any) -> float:
    if not _is_real(gamma) or not gamma > 0:
        raise ValueError(
            f"{type(scheduler).__name__}: gamma must be a positive number, got {gamma!r}"
        )
    return gamma


def _milestone_counter(milestones: Any) -> Counter[int]:
    if isinstance(milestones, (str, bytes, Mapping)) or not isinstance(milestones, Iterable):
        raise TypeError(
            f"MultiStepLR: milestones must be a list of epochs, got {type(milestones).__name__}"
        )
    milestones = list(milestones)
    if any(not _is_int(m) or m < 0 for m in milestones):
        raise ValueError(
            f"MultiStepLR: milestones must be epochs (integers >= 0), got {milestones}"
        )
    return Counter(int(m) for m in milestones)


def _per_group(owner: str, name: str, groups: list[dict[str, Any]], value: Any) -> list[Any]:
    """``value`` repeated for every group, or checked to have one entry per group (a list or
    tuple); ``owner`` and ``name`` (the argument's, e.g. "min_lr") name them in the error."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(f"{owner}: {name} has {len(value)} values, expected "
                             f"{len(groups)} {name}s (one per parameter group)")
        return list(value)
    return [value] * len(groups)
