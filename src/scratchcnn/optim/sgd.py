"""Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay."""

from __future__ import annotations

from typing import Any

import numpy as np

from scratchcnn.nn.module import Parameter
from scratchcnn.optim.flat import Workspace
from scratchcnn.optim.optimizer import Optimizer, ParamsT


class SGD(Optimizer):
    r"""``torch.optim.SGD``, step for step. Per parameter θ with gradient g:

    .. code-block:: text

        g ← -g                          if maximize
        g ← g + weight_decay · θ        if weight_decay ≠ 0
        if momentum ≠ 0:
            b ← g                                          on the first step
            b ← momentum · b + (1 - dampening) · g         afterwards
            g ← g + momentum · b   if nesterov   else   g ← b
        θ ← θ - lr · g

    State: ``momentum_buffer`` (only when momentum ≠ 0).
    """

    _array_state = ("momentum_buffer",)
    _required_state = ("momentum_buffer",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        if group["lr"] < 0.0:
            raise ValueError(f"SGD: invalid learning rate {group['lr']}; it must be >= 0")
        if group["momentum"] < 0.0:
            raise ValueError(f"SGD: invalid momentum value {group['momentum']}; it must be >= 0")
        if group["weight_decay"] < 0.0:
            raise ValueError(
                f"SGD: invalid weight_decay value {group['weight_decay']}; it must be >= 0"
            )
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("SGD: Nesterov momentum requires a momentum and zero dampening")

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
        momentum = float(group["momentum"])
        dampening = float(group["dampening"])
        weight_decay = float(group["weight_decay"])
        theta = param.data
        direction = work.get(0, theta)  # the (modified) gradient; param.grad is never written
        product = work.get(1, theta)

        d_p = grad
        if weight_decay != 0:
            np.multiply(theta, weight_decay, out=direction)
            if group["maximize"]:
                np.subtract(direction, grad, out=direction)
            else:
                np.add(direction, grad, out=direction)
            d_p = direction
        elif group["maximize"]:
            d_p = np.negative(grad, out=direction)

        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(d_p, copy=True, order="C")
            else:
                if buf.dtype != theta.dtype:
                    self._check_state_dtype(state, theta.dtype)
                buf *= momentum
                if dampening != 0:
                    buf += np.multiply(d_p, 1 - dampening, out=product)
                else:
                    buf += d_p
            if group["nesterov"]:
                np.multiply(buf, momentum, out=product)
                d_p = np.add(d_p, product, out=direction)
            else:
                d_p = buf

        theta -= np.multiply(d_p, lr, out=product)
