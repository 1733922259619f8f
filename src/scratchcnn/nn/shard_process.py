"""Worker processes for DataParallel: each runs replicas of a module on the batch shards it is sent.

Why processes: two Python threads share the GIL, and every NumPy call hands it over. Two shards
of simple-cnn (32 images each) took 6.9 ms per forward + backward in two threads against 5.8 ms
in two processes, and one shard alone takes 5.5 ms: the threads lose ~20% to GIL hand-overs.

How: a worker is forked (``scratchcnn.forked``), so it starts with a copy of the module, with no
pickling. Every call then brings it up to date:
- parameters already in shared memory (the harness's flat vector) are the worker's own arrays
  too; other parameter and buffer values are copied into memory it shares (``SharedArrays``);
- the modules' ``training`` / ``needs_input_grad`` flags and the grad mode travel with each
  request;
- shards arrive in the worker's shared inbox, a backward's gradients through the pipe, as raw
  bytes behind a small JSON header (``scratchcnn.forked``); results, and everything else said
  within a request, come back through a shared-memory mailbox when they fit; a "train" request
  (``DataParallel.forward_backward``) runs forward, loss and backward at once;
- a worker sums its shards' parameter gradients, in shard order, into shared memory of its own
  (its first shard's backward writes them there directly, see ``Parameter.grad_buffer``);
- with ``DataParallel.train_step``, a worker forked after the optimizer's flat state was made
  then also adds up and updates its share of the parameters (``optim.optimizer.SplitStep``);
- a coupled model's shard (BatchNorm2d, Dropout: see ``_couples_samples`` in nn/parallel.py)
  meets the caller's in collectives, as questions and answers (``nn.process_collective``); the
  request says which shard of the batch it is, and the caller updates the running statistics.

A worker is replaced by a new fork when the module changes shape (``signature`` differs) or a
parameter it shared directly is rebound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from scratchcnn.forked import (
    ForkedWorker,
    Handler,
    Message,
    SharedArrays,
    ask_parent,
    is_shared,
    layout_of,
    shared_empty,
)
from scratchcnn.nn.module import Module, set_grad_enabled, vector_views
from scratchcnn.nn.process_collective import WorkerShard
from scratchcnn.nn.replica import (
    backward_into_first,
    cross_entropy_step,
    give_batch_shard,
    replicate,
    set_module_flags,
    sum_gradients,
)

if TYPE_CHECKING:  # scratchcnn.optim imports scratchcnn.nn
    from scratchcnn.optim.optimizer import Optimizer, SplitStep

# Room for the shards a request brings through shared memory rather than the pipe (see
# DataParallel._run_in_processes): a few hundred MNIST images; larger requests use the pipe.
INBOX_BYTES = 8 * 2**20


def _states(module: Module) -> list[np.ndarray]:
    """The module's parameter values then its buffers: what a worker's copy must mirror."""
    return ([param.data for param in module.parameters()]
            + [buffer for _, buffer in module.named_buffers()])


class SharedGradients:
    """Shared memory for a worker's parameter gradients (``arrays``, one per parameter), laid end
    to end in one ``vector`` like ``flatten_parameters``' gradient vector when the parameters
    share a dtype (else ``vector`` is None), so that a ``SplitStep`` can add it up block by
    block."""

    def __init__(self, params: list[np.ndarray]) -> None:
        dtypes = {param.dtype for param in params}
        if len(dtypes) != 1:
            self.vector, self.arrays = None, SharedArrays(layout_of(params)).arrays
            return
        self.vector = shared_empty((sum(param.size for param in params),), dtypes.pop())
        self.arrays = vector_views(self.vector, [param.shape for param in params])


class ShardProcess(ForkedWorker):
    """Worker ``rank`` (1, 2, ...), a forked process holding a copy of ``module``. ``direct[i]``
    says whether the module's i-th state (``_states``) is in shared memory already, so that the
    worker's inherited copy of it sees every later in-place write (the harness's flat parameter
    vector); ``staged`` is the shared memory the caller copies the other states' values into
    before each forward. ``gradients[rank - 1]`` receives its gradient sums; with ``optimizer``
    (whose flat group exists) it can take part in a ``SplitStep``, adding up every worker's."""

    def __init__(self, module: Module, staged: SharedArrays, direct: list[bool], rank: int,
                 gradients: list[SharedGradients], optimizer: Optimizer | None) -> None:
        self.gradients = gradients[rank - 1]
        super().__init__(lambda: _shard_handler(module, staged, direct, rank, gradients,
                                                optimizer),
                         "scratchcnn-shard", inbox_bytes=INBOX_BYTES)


@contextlib.contextmanager
def _batch_shard(replicas: list[Module], place: list[int] | None) -> Iterator[None]:
    """With ``place``, ``[rank, start, stop, batch_size, num_shards]`` of a coupled request's
    one shard: the replica's BatchNorm2d and Dropout layers meet the caller's shards for the
    call."""
    if place is None:
        yield
        return
    rank, start, stop, batch_size, num_shards = place
    (replica,) = replicas  # coupled shards are one per process
    give_batch_shard(replica, WorkerShard(rank, slice(start, stop), batch_size, num_shards))
    try:
        yield
    finally:
        give_batch_shard(replica, None)


def _shard_handler(module: Module, staged: SharedArrays, direct: list[bool], rank: int,
                   all_gradients: list[SharedGradients],
                   optimizer: Optimizer | None) -> Handler:
    """In the worker: bind the module's copy to the staged values (``direct`` ones are already
    shared); answer forward requests (``flags``, ``grad_enabled``, one array per shard) with the
    outputs, backward requests with the input gradients, and train requests (each shard's input
    and target, the ``loss`` options: see ``replica.cross_entropy_step``) with the per-sample
    losses; after either of the last two, the parameter gradients' sum is left in
    ``gradients``. A request's ``shard`` (coupled models) places its one shard in the batch, see
    ``_batch_shard``. A train request's ``split`` is this worker's part of a ``SplitStep``: the
    worker then sends its answer as a question (``ask_parent``) and, if the caller says so,
    adds up and updates its blocks of the parameters before it replies."""
    from scratchcnn.optim.optimizer import Workspace, run_split_part  # see TYPE_CHECKING above

    gradients = all_gradients[rank - 1]
    addends = [shared.vector for shared in all_gradients]  # what a split part adds up
    work = Workspace()
    params = list(module.parameters())
    owners = [(owner, name) for owner in module.modules()
              for name, buffer in owner._buffers.items() if buffer is not None]
    staged_arrays = iter(staged.arrays)
    for param, is_direct in zip(params, direct[:len(params)], strict=True):
        if not is_direct:
            param.data = next(staged_arrays)
    for (owner, name), is_direct in zip(owners, direct[len(params):], strict=True):
        if not is_direct:
            owner.register_buffer(name, next(staged_arrays))
    replicas: list[Module] = []

    def handle(message: Message, arrays: list[np.ndarray]) -> tuple[Message, list[np.ndarray]]:
        op = message["op"]
        if op == "backward":
            shard_replicas = replicas[:len(arrays)]
            with _batch_shard(shard_replicas, message.get("shard")):
                input_grads = backward_into_first(
                    shard_replicas, lambda replica, i: replica.backward(arrays[i]))
            return ({"has_grad": _gradient_sums(shard_replicas),
                     "input_grad": [grad is not None for grad in input_grads]},
                    [grad for grad in input_grads if grad is not None])
        # "forward", or "train": the shards' inputs, then (train) their targets.
        parts, targets = (arrays, []) if op == "forward" else (arrays[::2], arrays[1::2])
        while len(replicas) < len(parts):
            replicas.append(replicate(module))
            if len(replicas) == 1:  # the first shard's gradients land where the caller reads
                for shell, shared in zip(replicas[0].parameters(), gradients.arrays, strict=True):
                    shell.grad_buffer = shared
        shard_replicas = replicas[:len(parts)]
        for replica in shard_replicas:
            set_module_flags(list(replica.modules()), message["flags"])
        # Explicitly: the fork may have happened inside the caller's no_grad().
        with (set_grad_enabled(message["grad_enabled"]),
              _batch_shard(shard_replicas, message.get("shard"))):
            if op == "forward":
                return {}, [replica(part) for replica, part in zip(shard_replicas, parts,
                                                                   strict=True)]
            losses = backward_into_first(shard_replicas, lambda replica, i: cross_entropy_step(
                replica, parts[i], targets[i], message["loss"]))
        answer = {"has_grad": _gradient_sums(shard_replicas)}
        if "split" not in message:
            return answer, losses
        go, _ = ask_parent(answer, losses)  # the caller reads it as our answer
        if go["split"]:
            assert optimizer is not None
            run_split_part(optimizer, message["split"], work, addends)
        return {}, []

    def _gradient_sums(shard_replicas: list[Module]) -> list[bool]:
        """Sum the replicas' parameter gradients into ``gradients``: which ones exist."""
        return [grad is not None for grad in sum_gradients(shard_replicas, gradients.arrays)]

    return handle


class ShardProcessPool:
    """``count`` workers for ``module``, restarted whenever the module's ``signature`` changes, a
    state that was shared with them directly is no longer the module's array, or a
    ``SplitStep`` needs an optimizer's flat group they were forked without."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._signature: str | None = None
        self._direct: list[np.ndarray | None] = []  # per state: the array shared at the fork
        self._staged: SharedArrays | None = None
        self._split_for: tuple[Any, ...] = ()  # the SplitStep.made_for the workers can take
        self.workers: list[ShardProcess] = []

    def sync(self, module: Module, current: str,
             split: SplitStep | None = None) -> list[ShardProcess]:
        """Workers mirroring ``module`` as it is now: the values not already in shared memory
        copied into it (for the harness's simple-cnn, only BatchNorm's buffers, if any: the
        parameters live in the optimizer's shared flat vector), forked anew if the module's
        ``signature``, ``current``, changed since they were, or if they could not take their
        part of ``split``."""
        values = _states(module)
        rebound = any(shared is not None and shared is not value
                      for shared, value in zip(self._direct, values, strict=False))
        stale = split is not None and not split.made_for_same(self._split_for)
        if current != self._signature or len(self.workers) != self.count or rebound or stale:
            self.close()
            self._direct = [value if is_shared(value) else None for value in values]
            self._staged = SharedArrays(layout_of(
                [value for value, shared in zip(values, self._direct, strict=True)
                 if shared is None]))
            direct = [shared is not None for shared in self._direct]
            params = [param.data for param in module.parameters()]
            # Every worker's gradients before the first fork: a split step adds them all up.
            gradients = [SharedGradients(params) for _ in range(self.count)]
            optimizer = split.optimizer if split is not None else None
            self.workers = [ShardProcess(module, self._staged, direct, rank, gradients, optimizer)
                            for rank in range(1, self.count + 1)]
            self._signature = current
            self._split_for = split.made_for() if split is not None else ()
        assert self._staged is not None
        staged = iter(self._staged.arrays)
        for value, shared in zip(values, self._direct, strict=True):
            if shared is None:
                np.copyto(next(staged), value)
        return self.workers

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []
        self._signature = None
        self._direct = []
        self._split_for = ()
