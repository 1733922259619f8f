"""Learning-rate schedulers, as ``torch.optim.lr_scheduler``: each ``step()`` (call it after
``optimizer.step()``, once per epoch) writes the next learning rate into every parameter group's
``"lr"``. The recursive ("chainable") formulas are PyTorch's, so the values agree with PyTorch's
step for step, to the last bit, including past the end of a schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from scratchcnn.optim.optimizer import Optimizer


class LRScheduler:
    """Base class: sets ``group["initial_lr"]`` (kept in ``base_lrs``) and takes the initial
    step, so that right after construction ``get_last_lr()`` is the epoch-0 learning rate."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{type(self).__name__}: {type(optimizer).__name__} is not an Optimizer"
            )
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
        self.last_epoch += 1
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

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
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(state_dict).__name__}")
        known = set(self.state_dict())
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
