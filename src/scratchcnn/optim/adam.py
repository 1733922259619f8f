"""Adam (L2 weight decay folded into the gradient) and AdamW (decoupled weight decay)."""

from __future__ import annotations

from typing import Any

import numpy as np

from scratchcnn.nn.module import Parameter
from scratchcnn.optim.flat import Workspace
from scratchcnn.optim.optimizer import Optimizer, ParamsT


class Adam(Optimizer):
    r"""``torch.optim.Adam``, step for step. Per parameter θ with gradient g and its own step
    counter t:

    .. code-block:: text

        t ← t + 1
        g ← -g                                    if maximize
        θ ← θ · (1 - lr · weight_decay)           if decoupled (AdamW)
        g ← g + weight_decay · θ                  otherwise, if weight_decay ≠ 0
        m ← m + (1 - β1) · (g - m)                (torch's lerp)
        v ← β2 · v + (1 - β2) · g · g
        v̂ ← max(v̂, v)                             if amsgrad, and v̂ replaces v below
        denom ← sqrt(v) / sqrt(1 - β2^t) + eps
        θ ← θ + (-lr / (1 - β1^t)) · m / denom

    State: ``step`` (a whole number), ``exp_avg`` (m), ``exp_avg_sq`` (v) and, with amsgrad,
    ``max_exp_avg_sq`` (v̂).
    """

    _array_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _scalar_state = ("step",)
    _required_state = ("step", "exp_avg", "exp_avg_sq")
    _decoupled_weight_decay = False
    _supports_flat = True  # elementwise: a whole group updates as one vector (optimizer.py)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        if not group["lr"] >= 0.0:
            raise ValueError(f"{name}: invalid learning rate {group['lr']}; it must be >= 0")
        if not group["eps"] >= 0.0:
            raise ValueError(f"{name}: invalid epsilon value {group['eps']}; it must be >= 0")
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(
                    f"{name}: invalid beta parameter at index {index}: {beta}; "
                    "it must be in [0, 1)"
                )
        if not group["weight_decay"] >= 0.0:
            raise ValueError(
                f"{name}: invalid weight_decay value {group['weight_decay']}; it must be >= 0"
            )

    def _flat_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._array_state if group["amsgrad"] else self._required_state[1:]

    def _update(
        self,
        param: Parameter,
        grad: np.ndarray,
        group: dict[str, Any],
        state: dict[str, Any],
        work: Workspace,
    ) -> None:
        # Python floats are "weak" scalars in NumPy: float32 arrays stay float32.
        lr = float(group["lr"])
        beta1, beta2 = (float(beta) for beta in group["betas"])
        eps = float(group["eps"])
        weight_decay = float(group["weight_decay"])
        theta = param.data
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(theta, order="C")
            state["exp_avg_sq"] = np.zeros_like(theta, order="C")
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = np.zeros_like(theta, order="C")
        exp_avg = state["exp_avg"]
        if exp_avg.dtype != theta.dtype:  # one comparison: all state arrays are made together
            self._check_state_dtype(state, theta.dtype)
        exp_avg_sq = state["exp_avg_sq"]
        g_work = work.get(0, theta)  # the (modified) gradient, later the update
        scratch = work.get(1, theta)

        state["step"] += 1
        step = state["step"]

        g = np.negative(grad, out=g_work) if group["maximize"] else grad
        if weight_decay != 0:
            if self._decoupled_weight_decay:
                theta *= 1 - lr * weight_decay
            else:
                np.multiply(theta, weight_decay, out=scratch)
                g = np.add(g, scratch, out=g_work)

        weight = 1 - beta1
        np.subtract(g, exp_avg, out=scratch)
        if abs(weight) < 0.5:  # torch's lerp picks the better-conditioned form by weight
            exp_avg += np.multiply(scratch, weight, out=scratch)
        else:
            scratch *= 1 - weight
            np.subtract(g, scratch, out=exp_avg)

        exp_avg_sq *= beta2
        np.multiply(g, 1 - beta2, out=scratch)
        exp_avg_sq += np.multiply(scratch, g, out=scratch)

        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1

        second_moment = exp_avg_sq
        if group["amsgrad"]:
            second_moment = np.maximum(state["max_exp_avg_sq"], exp_avg_sq,
                                       out=state["max_exp_avg_sq"])
        denom = np.sqrt(second_moment, out=scratch)
        denom /= bias_correction2_sqrt
        denom += eps

        update = np.multiply(exp_avg, -step_size, out=g_work)
        update /= denom
        theta += update


class AdamW(Adam):
    r"""``torch.optim.AdamW``: Adam whose weight decay shrinks the parameter directly,
    θ ← θ · (1 - lr · weight_decay), instead of entering the moments through the gradient.
    The update is otherwise Adam's (see :class:`Adam`)."""

    _decoupled_weight_decay = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)
