"""Replicas of a module for DataParallel: copies that share its parameter arrays but keep their
own gradients and forward caches, how the replicas' gradients add up, and one shard's training
step on them (``cross_entropy_step``)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from scratchcnn.nn.batchnorm import BatchNorm2d
from scratchcnn.nn.collective import BatchShard
from scratchcnn.nn.dropout import Dropout
from scratchcnn.nn.loss import CrossEntropyLoss
from scratchcnn.nn.module import Module, Parameter

T = TypeVar("T")

# Layers that take a BatchShard (nn.collective) while they run on a shard of a batch.
BATCH_AWARE = (BatchNorm2d, Dropout)


def replicate(module: Module) -> Module:
    """A copy of ``module``'s tree whose Parameters share ``.data`` with the original's but have
    their own ``.grad``, and whose layers have their own forward caches. Buffers are shared."""
    clone = copy.copy(module)  # shallow: plain attributes (hyper-parameters) are shared
    parameters: OrderedDict[str, Parameter | None] = OrderedDict()
    for name, param in module._parameters.items():
        shell = Parameter(param.data) if param is not None else None
        parameters[name] = shell
        object.__setattr__(clone, name, shell)
    children = OrderedDict()
    for name, child in module._modules.items():
        children[name] = replicate(child)
        object.__setattr__(clone, name, children[name])
    object.__setattr__(clone, "_parameters", parameters)
    object.__setattr__(clone, "_modules", children)
    return clone


def signature(module: Module) -> str:
    """What a forked copy of ``module`` must still match: the layer tree with its
    hyper-parameters (``repr``), and the name, shape and dtype of every parameter and buffer."""
    arrays = [(name, param.data.shape, param.data.dtype.str)
              for name, param in module.named_parameters()]
    arrays += [(name, buffer.shape, buffer.dtype.str) for name, buffer in module.named_buffers()]
    return repr(module) + repr(arrays)


def module_flags(module: Module) -> list[list[bool]]:
    """Each submodule's (training, needs_input_grad), in ``modules()`` order."""
    return [[m.training, m.needs_input_grad] for m in module.modules()]


def set_module_flags(modules: Sequence[Module], flags: Sequence[Sequence[bool]]) -> None:
    """Give ``modules`` the flags ``module_flags`` read off another tree of the same shape."""
    for replica_module, (training, needs_input_grad) in zip(modules, flags, strict=True):
        object.__setattr__(replica_module, "training", training)
        object.__setattr__(replica_module, "needs_input_grad", needs_input_grad)


def give_batch_shard(replica: Module, shard: BatchShard | None) -> None:
    """``replica``'s BatchNorm2d and Dropout layers see ``shard`` (None: their own input)."""
    for layer in replica.modules():
        if isinstance(layer, BATCH_AWARE):
            object.__setattr__(layer, "batch_shard", shard)


def backward_into_first(replicas: Sequence[Module], run: Callable[[Module, int], T]) -> list[T]:
    """``run(replica, index)`` (a backward, or a step ending in one) for each replica in turn;
    every replica after the first adds its parameter gradients straight into the first's (its
    ``.grad`` starts as the first's array), so the group's sum builds up in the first replica in
    replica order, with no gradient array per replica to copy and add up afterwards (two
    64-image shards of the notebook model in one process: ~0.2 ms less per step)."""
    results = [run(replicas[0], 0)] if replicas else []
    lead = list(replicas[0].parameters()) if replicas else []
    for index, replica in enumerate(replicas[1:], 1):
        shells = list(replica.parameters())
        for shell, first in zip(shells, lead, strict=True):
            shell.grad = first.grad
        results.append(run(replica, index))
        for shell, first in zip(shells, lead, strict=True):
            if first.grad is None:
                first.grad = shell.grad  # the first replica had none for it: this one's is the sum
            shell.grad = None
    return results


def sum_gradients(replicas: Sequence[Module],
                  out: Sequence[np.ndarray] | None = None) -> list[np.ndarray | None]:
    """Per parameter, the replicas' gradients added up in replica order (None where none has
    one), into ``out`` when given, else into the first replica's array; the replicas' ``.grad``
    are released either way. A fixed order makes the sum the same whichever thread or process
    computes it."""
    sums: list[np.ndarray | None] = []
    for index, shells in enumerate(zip(*(replica.parameters() for replica in replicas),
                                       strict=True)):
        grads = [shell.grad for shell in shells if shell.grad is not None]
        for shell in shells:
            shell.grad = None
        if not grads:
            sums.append(None)
            continue
        total = grads[0]
        if out is not None and total is not out[index]:  # it may be its grad_buffer already
            total = out[index]
            np.copyto(total, grads[0])
        for grad in grads[1:]:
            total += grad
        sums.append(total)
    return sums


def cross_entropy_step(replica: Module, x: np.ndarray, target: np.ndarray,
                       options: dict[str, Any]) -> np.ndarray:
    """One shard's part of a mean (or summed) cross-entropy over a whole batch: ``replica``'s
    forward on ``x``, the per-sample losses (returned), and the backward of their sum scaled by
    1 / ``options["divisor"]``, the whole batch's divisor. Each sample's gradient is computed
    exactly as the unsharded loss computes it (the same 1 / divisor factor, row by row), so the
    shards' parameter gradients are the ones a forward, loss and backward of the batch would
    give; ``options`` also holds the loss's ``ignore_index`` and ``label_smoothing``. The logits'
    class count is written into ``options["classes"]``, so that the caller can explain a bad
    target by its place in the whole batch."""
    logits = replica(x)
    options.setdefault("classes", logits.shape[1] if logits.ndim == 2 else None)
    criterion = CrossEntropyLoss(ignore_index=options["ignore_index"], reduction="none",
                                 label_smoothing=options["label_smoothing"])
    per_sample = criterion(logits, target)
    dtype = logits.dtype.type
    # A divisor of 0 (no weights here, so every target of the batch ignored): every row's
    # gradient is zero, as torch gives, where 1 / 0 would make them 0 * inf = NaN.
    scale = dtype(1) / dtype(options["divisor"]) if options["divisor"] else dtype(0)
    replica.backward(criterion.backward(np.full(len(per_sample), scale, dtype=logits.dtype)))
    return per_sample
