"""DataParallel: run one module on shards of a batch in parallel threads.

NumPy releases the GIL inside its kernels and BLAS, so two Python threads each running the whole
model on half the batch keep two cores busy on every layer, including the memory-bound copies and
pooling that a multi-threaded BLAS leaves on one core. This is the engine's only parallelism; the
layers themselves stay single-threaded textbook code. With ``workers="processes"`` the shards
beyond the first run in forked worker processes instead (see nn/shard_process.py), which do not
share a GIL. BatchNorm2d and Dropout, whose results depend on the whole batch, exchange what they
need across shards through ``nn.collective`` (threads) or ``nn.process_collective`` (processes).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import numpy as np

from scratchcnn.forked import processes_available
from scratchcnn.nn.batchnorm import BatchNorm2d
from scratchcnn.nn.collective import BatchGroup, BatchShard, different_collectives
from scratchcnn.nn.dropout import Dropout
from scratchcnn.nn.loss import CrossEntropyLoss, reduce_losses
from scratchcnn.nn.module import Module, is_grad_enabled
from scratchcnn.nn.process_collective import HubShard
from scratchcnn.nn.replica import (
    backward_into_first,
    cross_entropy_step,
    give_batch_shard,
    module_flags,
    replicate,
    set_module_flags,
    signature,
    sum_gradients,
)
from scratchcnn.nn.shard_process import ShardProcessPool

if TYPE_CHECKING:  # scratchcnn.optim imports scratchcnn.nn
    from scratchcnn.optim.optimizer import Optimizer, SplitStep

_executor: ThreadPoolExecutor | None = None
_executor_workers = 0
_blas_controller: Any = None


def _shared_executor(workers: int = 1) -> ThreadPoolExecutor:
    """One process-wide pool of at least ``workers`` threads: starting threads per call would cost
    more than small shards, and shards that meet at barriers need a thread each."""
    global _executor, _executor_workers
    if _executor is None or _executor_workers < workers:
        if _executor is not None:
            _executor.shutdown(wait=False)  # jobs already submitted still run to completion
        # The default size of a ThreadPoolExecutor, or more; its threads start only when needed.
        _executor_workers = max(workers, min(32, (os.cpu_count() or 1) + 4))
        _executor = ThreadPoolExecutor(_executor_workers, thread_name_prefix="scratchcnn-shard")
    return _executor


def threadpoolctl_available() -> bool:
    """Whether BLAS threads can be limited; without that, shards would oversubscribe cores."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas_controller = False
        else:
            _blas_controller = ThreadpoolController()
    return _blas_controller is not False


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """BLAS limited to one thread while shards run, so each shard owns one core."""
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield


def _couples_samples(module: Module) -> bool:
    """Whether ``module``'s forward depends on the whole batch: BatchNorm2d normalising with batch
    statistics (training, or no running statistics kept) and Dropout drawing masks."""
    if isinstance(module, BatchNorm2d):
        return module.training or module.running_mean is None
    return isinstance(module, Dropout) and module.training and module.p > 0


def _give_shards(replicas: Sequence[Module], shards: Sequence[BatchShard | None]) -> None:
    """Replica k's BatchNorm2d and Dropout layers see ``shards[k]`` (None: their own input)."""
    for replica, shard in zip(replicas, shards, strict=True):
        give_batch_shard(replica, shard)


def _root_cause(errors: list[BaseException]) -> BaseException:
    """The error a shard raised itself, rather than the BrokenBarrierError that aborting its
    BatchGroup then raised in the shards waiting for it."""
    return next((error for error in errors
                 if not isinstance(error, threading.BrokenBarrierError)), errors[0])


class DataParallel(Module):
    """Wraps ``module``; forward and backward split the batch (axis 0) into shards run on replicas
    of ``module`` that share its parameter arrays, ``num_shards`` at a time in parallel.

    Forward: ``concatenate([replica_k(x_k)])``, the same values as ``module(x)`` for any module
    that treats samples independently. Backward: ``grad_output`` is split the same way, each
    replica's backward runs where its forward did, and the parameter gradients, sum over k of
    dL/dθ_k, are added into ``module``'s Parameters (the per-shard gradients of a mean loss
    already carry the full batch's 1/N): each thread or process adds up its own shards' in shard
    order, then the groups are added in order, so both kinds of worker give the same bits. Each
    shard's backward adds into its group's first shard's arrays (``backward_into_first``), and
    with ``grad_buffer``s (``flatten_parameters``) the first group's, hence the sum, land in them.

    ``workers``: ``"threads"`` (default) runs the shards in threads of this process, which share
    the GIL; ``"processes"`` runs all but the first group in forked worker processes (Linux; on
    other systems it falls back to threads), ~15% faster for simple-cnn at batch 64 on 2 cores.
    Call ``close()`` to stop them early; they are daemons, so they also end with this process.

    ``max_shard_size`` (optional) splits large batches further, into shards of at most that many
    samples, dealt round-robin to the workers: activations of ~64 MNIST images stay in cache, which
    made a simple-cnn step at batch 256 ~25% faster and inference of 500 images ~45% faster.
    Batches smaller than two ``min_shard_size`` shards run unsharded: for a few samples the
    hand-offs cost more than they save (simple-cnn at batch 10: 4.2 ms sharded, 3.2 ms not).

    BatchNorm2d using batch statistics (training mode, or no running statistics) and Dropout in
    training mode depend on the whole batch; their replicas exchange it through ``nn.collective``,
    as ``torch.nn.SyncBatchNorm`` does: the shards add up their per-channel sums into the batch's
    mean, variance and backward sums, one shard updates the running statistics (the module's own
    arrays, which every replica shares), and one shard draws the batch's dropout masks from the
    generator, which every shard then slices. Each shard's gamma and beta gradients stay its
    partial sums, which the summation above adds up once. The results are the unsharded ones (up
    to summation order), whatever the number of shards. Shards of such a model wait for each
    other, so there are at most ``num_shards``, one per thread or process (``max_shard_size`` is
    ignored); if one raises, the others are released and its error is raised. With
    ``workers="processes"`` they run in the worker processes too, meeting as the workers'
    questions to this process (``nn.process_collective``) with the same bits as threads, which
    would lose 15-20% of a step to GIL hand-overs.

    Falls back to plain ``module`` calls (one shard) when the batch has fewer than two samples
    and when threadpoolctl is missing (BLAS threads could not be limited to one per shard).
    ``state_dict`` keys are the wrapped module's, prefixed with ``module.`` as in PyTorch.
    """

    def __init__(self, module: Module, num_shards: int = 2, *,
                 max_shard_size: int | None = None, min_shard_size: int = 1,
                 workers: str = "threads") -> None:
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DataParallel wraps a Module, got {type(module).__name__}")
        for name, value in (("num_shards", num_shards), ("max_shard_size", max_shard_size),
                            ("min_shard_size", min_shard_size)):
            if value is None and name == "max_shard_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DataParallel: {name} must be a positive int, got {value!r}")
        if workers not in ("threads", "processes"):
            raise ValueError(f"DataParallel: workers must be 'threads' or 'processes', "
                             f"got {workers!r}")
        self.module = module
        self.num_shards = num_shards
        self.max_shard_size = max_shard_size
        self.min_shard_size = min_shard_size
        self.workers = workers if processes_available() else "threads"
        self._replicas: list[Module] = []
        self._signature = ""  # the module's signature when the replicas were made
        self._processes: ShardProcessPool | None = None
        self._sharded_batch: list[int] | None = None  # shard sizes of the last sharded forward
        self._output_shape: tuple[int, ...] = ()  # and the shape of its output
        self._coupled = False  # whether that forward's shards met in a BatchGroup
        self._backward_done = False  # whether forward_backward ran the last batch's backward

    def extra_repr(self) -> str:
        return (f"num_shards={self.num_shards}, max_shard_size={self.max_shard_size}, "
                f"min_shard_size={self.min_shard_size}, workers={self.workers!r}")

    def close(self) -> None:
        """Stop the worker processes, if any (the next sharded call starts new ones)."""
        if self._processes is not None:
            self._processes.close()
            self._processes = None

    def _plan(self, x: Any) -> tuple[int, bool, list[int]]:
        """For a batch ``x``: its size, whether the module couples its samples now (see
        ``_couples_samples``), and the shard sizes it splits into (one entry: unsharded)."""
        n = len(x) if isinstance(x, np.ndarray) and x.ndim else 0
        coupled = any(_couples_samples(module) for module in self.module.modules())
        return n, coupled, self._shard_sizes(n, coupled)

    def _shard_sizes(self, n: int, coupled: bool) -> list[int]:
        """Sizes of the shards a batch of ``n`` splits into: one entry means no sharding.
        ``coupled`` shards wait for each other in collectives, so each needs its own thread or
        process: num_shards at most."""
        shards = self.num_shards
        if self.max_shard_size is not None and not coupled:
            shards = max(shards, -(-n // self.max_shard_size))
        shards = min(shards, n // self.min_shard_size)
        if shards < 2 or not threadpoolctl_available():
            return [n]
        size, larger = divmod(n, shards)  # np.array_split's sizes: the first ones one larger
        return [size + 1] * larger + [size] * (shards - larger)

    def _make_replicas(self, count: int, current: str) -> None:
        """At least ``count`` replicas of the module, made anew if its ``signature``,
        ``current``, changed since they were (a layer added, say)."""
        if current != self._signature:
            self._replicas, self._signature = [], current
        while len(self._replicas) < count:
            self._replicas.append(replicate(self.module))

    def _sync(self, replicas: Sequence[Module]) -> None:
        """Point ``replicas``' parameters and buffers at the module's current arrays and give
        them its ``training`` and ``needs_input_grad`` flags (``to()``, ``train()`` or the caller
        may have changed them since the last call)."""
        params = list(self.module.parameters())
        modules = list(self.module.modules())
        flags = module_flags(self.module)
        for replica in replicas:
            first = replica is self._replicas[0]
            for shell, param in zip(replica.parameters(), params, strict=True):
                shell.data = param.data
                # Replica 0's gradient, the first one summed, lands in the parameter's buffer,
                # unless .grad already holds one to add to (see _add_gradients).
                shell.grad_buffer = param.grad_buffer if first and param.grad is None else None
            clones = list(replica.modules())
            for clone, module in zip(clones, modules, strict=True):
                # The module's own buffer arrays, even if rebound since with an unchanged
                # signature (float() then double()): running statistics are read, and updated
                # in place by one shard, there.
                for name, buffer in module._buffers.items():
                    object.__setattr__(clone, name, buffer)
            set_module_flags(clones, flags)

    def _groups(self, parts: Sequence[np.ndarray]) -> list[list[int]]:
        """Shard indices per worker: round-robin, the first group for this thread."""
        workers = min(self.num_shards, len(parts))
        return [list(range(start, len(parts), workers)) for start in range(workers)]

    def _run(self, op: str, parts: Sequence[np.ndarray], coupled: bool,
             targets: Sequence[np.ndarray] = (), loss: dict[str, Any] | None = None,
             split: SplitStep | None = None) -> tuple[list[Any], list[Any]]:
        """Run ``op`` ("forward", "backward", or "train": ``replica.cross_entropy_step`` with
        ``targets`` and the ``loss`` options) on every shard: shard k on replica k, the first
        group on this thread and the others in the pool or the worker processes. ``coupled``:
        the replicas' BatchNorm2d/Dropout layers meet in collectives for the call, one shard per
        thread or process (see ``_shard_sizes``). Returns the per-shard results and, for
        backward and train, each group's summed parameter gradients. With ``split`` (train, in
        processes), the workers then wait for ``_finish_split``."""
        groups = self._groups(parts)
        if coupled and len(groups) != len(parts):
            # Shards dealt round-robin would wait in a collective for one queued behind them.
            raise RuntimeError(f"{self.describe()}: {len(parts)} coupled shards for "
                               f"{len(groups)} workers")
        in_processes = self.workers == "processes" and len(groups) > 1
        replicas = self._replicas[:len(parts)]
        # The replicas this process runs, brought up to date for a new batch.
        local = [replicas[k] for k in (groups[0] if in_processes else range(len(parts)))]
        sync = (lambda: None) if op == "backward" else (lambda: self._sync(local))
        batch = BatchGroup([len(part) for part in parts]) if coupled and not in_processes else None

        def run_group(group: list[int]) -> tuple[list[Any], list[Any]]:
            try:
                if op == "forward":
                    return [replicas[k](parts[k]) for k in group], []
                def shard_step(replica: Module, i: int) -> Any:
                    k = group[i]
                    if op == "train":
                        return cross_entropy_step(replica, parts[k], targets[k], loss)
                    return replica.backward(parts[k])

                group_replicas = [replicas[k] for k in group]
                results = backward_into_first(group_replicas, shard_step)
                return results, sum_gradients(group_replicas)
            except BaseException:
                if batch is not None:
                    batch.abort()  # the other shards would otherwise wait for this one forever
                raise

        limit = _single_threaded_blas() if len(groups) > 1 else contextlib.nullcontext()
        with limit:
            if in_processes:
                group_results = self._run_in_processes(op, groups, parts, run_group, sync,
                                                       coupled, targets, loss, split)
            else:
                sync()
                group_results = self._run_in_threads(groups, run_group, replicas, batch)
        results: list[Any] = [None] * len(parts)
        for group, (group_result, _) in zip(groups, group_results, strict=True):
            for k, result in zip(group, group_result, strict=True):
                results[k] = result
        return results, [grad_sums for _, grad_sums in group_results]

    @staticmethod
    def _run_in_threads(groups: list[list[int]],
                        run_group: Callable[[list[int]], tuple[list[Any], list[Any]]],
                        replicas: Sequence[Module], batch: BatchGroup | None,
                        ) -> list[tuple[list[Any], list[Any]]]:
        """The first group here, the others in the pool meanwhile; with ``batch``, replica k's
        batch-aware layers hold shard k of it for the call."""
        if batch is not None:
            _give_shards(replicas, batch.shards)
        errors: list[BaseException] = []
        futures = [_shared_executor(len(groups) - 1).submit(run_group, group)
                   for group in groups[1:]]
        try:
            group_results = [run_group(groups[0])]
        except BaseException as error:
            errors.append(error)
        finally:
            wait(futures)  # never leave shards running into the next call
            if batch is not None:
                _give_shards(replicas, [None] * len(replicas))
        errors.extend(error for error in (future.exception() for future in futures)
                      if error is not None)
        if errors:
            raise _root_cause(errors)
        group_results.extend(future.result() for future in futures)
        return group_results

    def _run_in_processes(self, op: str, groups: list[list[int]], parts: Sequence[np.ndarray],
                          run_group: Callable[[list[int]], tuple[list[Any], list[Any]]],
                          sync: Callable[[], None], coupled: bool,
                          targets: Sequence[np.ndarray], loss: dict[str, Any] | None,
                          split: SplitStep | None) -> list[tuple[list[Any], list[Any]]]:
        """The first group here, the others sent to one worker process each meanwhile. Coupled
        (one shard per group): replica 0 is the hub of the workers' collectives, and each
        request says where its shard lies in the batch. ``sync`` readies this process's
        replicas once the requests are out, so that the workers start sooner. With ``split``,
        each worker sends its answer as a question and waits (see ``_finish_split``)."""
        if op != "backward":
            if self._processes is None or self._processes.count != len(groups) - 1:
                self.close()
                self._processes = ShardProcessPool(len(groups) - 1)
            workers = self._processes.sync(self.module, self._signature, split)
            fields = {"flags": module_flags(self.module), "grad_enabled": is_grad_enabled(),
                      **({"loss": loss} if op == "train" else {})}
        else:
            assert self._processes is not None
            workers, fields = self._processes.workers, {}
        starts = np.cumsum([0] + [len(part) for part in parts]).tolist()
        hub = HubShard(workers, slice(0, starts[1]), starts[-1]) if coupled else None
        try:
            for rank, (worker, group) in enumerate(zip(workers, groups[1:], strict=True), 1):
                place = ([rank, starts[rank], starts[rank + 1], starts[-1], len(groups)]
                         if coupled else None)
                # A train request interleaves each shard's input and target.
                arrays = [array for k in group
                          for array in ((parts[k], targets[k]) if op == "train" else (parts[k],))]
                # Shards through shared memory. Not a backward's gradients: they would
                # overwrite the inputs its forward's layers may have kept views of.
                # A split step leaves the caller no optimizer worker to wake, and the next
                # step's request is near: the worker polls for it (~0.05-0.1 ms sooner).
                part = ({"split": split.part(rank), "linger": True} if split is not None
                        else {})
                worker.request({"op": op, **fields, "shard": place, **part}, arrays,
                               through_inbox=op != "backward")
            sync()
            if hub is None:
                group_results = [run_group(groups[0])]
            else:
                _give_shards(self._replicas[:1], [hub])
                try:
                    group_results = [run_group(groups[0])]
                finally:
                    _give_shards(self._replicas[:1], [None])
            for worker in workers:
                message, arrays = worker.reply()
                if "collective" in message:  # a worker asks for more collectives than rank 0
                    raise different_collectives()
                if op == "forward":
                    group_results.append((arrays, []))
                    continue
                if op == "train":
                    results = arrays  # the per-sample losses
                else:
                    present = iter(arrays)
                    results = [next(present) if has else None for has in message["input_grad"]]
                shared = worker.gradients.arrays
                group_results.append((results, [array if has else None for array, has
                                                in zip(shared, message["has_grad"], strict=True)]))
        except BaseException:
            # A worker may be mid-request, or waiting for a collective's answer: close them all
            # (they exit where they wait) and start afresh on the next call.
            self.close()
            raise
        return group_results

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, ...) -> the wrapped module's output for the whole batch."""
        _, coupled, sizes = self._plan(x)
        self._sharded_batch, self._backward_done = None, False
        if len(sizes) == 1:
            return self.module(x)
        self._make_replicas(len(sizes), signature(self.module))
        outputs, _ = self._run("forward", np.split(x, np.cumsum(sizes)[:-1]), coupled)
        self._sharded_batch, self._coupled = sizes, coupled
        output = np.concatenate(outputs)
        self._output_shape = output.shape
        return output

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        """grad of the output -> grad of the input (None if the first layer computes none)."""
        if self._backward_done:
            raise RuntimeError(f"{self.describe()}: forward_backward already ran this batch's "
                               "backward; call forward (or forward_backward) again first")
        sizes = self._sharded_batch
        if sizes is None:
            return self.module.backward(grad_output)
        grad_output = np.asarray(grad_output)
        # The whole shape, here: a shard's layer would report its own slice of a bad gradient.
        if grad_output.shape != self._output_shape:
            raise ValueError(f"{self.describe()}: grad_output has shape {grad_output.shape} but "
                             f"the last forward returned shape {self._output_shape}; they must "
                             "match")
        # The forward's coupling: BatchNorm's backward uses the statistics it cached, and the
        # shards run where their forward did.
        input_grads, group_sums = self._run("backward",
                                            np.split(grad_output, np.cumsum(sizes)[:-1]),
                                            self._coupled)
        self._add_gradients(group_sums)
        if any(grad is None for grad in input_grads):
            return None
        return np.concatenate(input_grads)

    def forward_backward(self, x: np.ndarray, target: np.ndarray,
                         criterion: CrossEntropyLoss) -> np.generic:
        """``loss = criterion(self(x), target)`` and ``self.backward(criterion.backward())`` in
        one pass, returning the loss: the same loss, the same parameter gradients (bit for bit),
        but each shard runs its forward, its part of the loss and its backward in one go
        (``replica.cross_entropy_step``), so a worker process gets one request per step instead
        of two and the logits never travel (simple-cnn at batch 64: 6.94 -> 6.68 ms a step). For a
        CrossEntropyLoss without class weights; any other criterion takes the two calls above
        (reduction "none" is an error: there is no one loss). No input gradient is returned."""
        return self._train(x, target, criterion, None)

    def train_step(self, x: np.ndarray, target: np.ndarray, criterion: CrossEntropyLoss,
                   optimizer: Optimizer) -> np.generic:
        """``forward_backward`` then ``optimizer.step()``, returning the loss; the step is
        skipped if the loss is not finite (the parameters keep their values). The same bits as
        the two calls. With worker processes and an optimizer that can split its step
        (``Optimizer.split_step``: its one group holds this module's parameters laid out by
        ``flatten_parameters``, as the training harness does), each process adds up the batch's
        gradients for its own blocks of the parameter vector and updates those blocks, ZeRO-1
        style: no process adds every gradient while the others wait, and no optimizer worker
        has to wake for its share (scratch-notebook-cnn at batch 64: 3.43 -> 3.27 ms a step in
        an alternating A/B; simple-cnn's step, whose optimizer is a smaller part, within noise)."""
        return self._train(x, target, criterion, optimizer)

    def _train(self, x: np.ndarray, target: np.ndarray, criterion: CrossEntropyLoss,
               optimizer: Optimizer | None) -> np.generic:
        """``forward_backward``, then with ``optimizer`` its step, split if it can be."""
        if getattr(criterion, "reduction", "mean") == "none":
            raise ValueError(f"{self.describe()}: forward_backward needs a criterion that reduces "
                             "the batch to one loss; got reduction='none' (use 'mean' or 'sum')")
        n, coupled, sizes = self._plan(x)
        if len(sizes) == 1 or not (isinstance(criterion, CrossEntropyLoss)
                                   and criterion.weight is None):
            loss = criterion(self(x), target)
            self.backward(criterion.backward())
            return self._step_if_finite(optimizer, loss)
        target = np.asarray(target)
        if target.shape != (n,) or not np.issubdtype(target.dtype, np.integer):
            raise ValueError(f"{self.describe()}: target is a {target.dtype} array of shape "
                             f"{target.shape}; expected integer class indices of shape ({n},), "
                             "one per sample of the batch")
        if not is_grad_enabled():
            raise RuntimeError(f"{self.describe()}: forward_backward computes gradients; call it "
                               "outside no_grad()")
        # The whole batch's divisor, as the criterion computes it (its ignored targets count 0).
        divisor = (float(np.count_nonzero(target != criterion.ignore_index))
                   if criterion.reduction == "mean" else 1.0)
        options = {"divisor": divisor, "ignore_index": criterion.ignore_index,
                   "label_smoothing": criterion.label_smoothing}
        self._sharded_batch, self._backward_done = None, True
        self._make_replicas(len(sizes), signature(self.module))
        splits = np.cumsum(sizes)[:-1]
        processes = min(self.num_shards, len(sizes))
        split = (optimizer.split_step(list(self.module.parameters()), processes)
                 if optimizer is not None and self.workers == "processes" else None)
        try:
            losses, group_sums = self._run("train", np.split(x, splits), coupled,
                                           np.split(target, splits), options, split)
        except ValueError:
            # A shard names its bad target by its index in the shard: the whole batch's check
            # (with the class count the first shard's logits gave) names it in the batch.
            if options.get("classes") is not None:
                try:
                    criterion._check_target(target, n, options["classes"])
                except ValueError as whole_batch:
                    raise whole_batch from None  # the shard's version would only confuse
            raise
        try:
            # The unsharded criterion's sum, in its order, and its reduction (every target
            # ignored: NaN, and the step is skipped).
            loss = reduce_losses(np.concatenate(losses).sum(), divisor, criterion.reduction)
            if split is not None and self._finish_split(split, group_sums, np.isfinite(loss)):
                return loss
        except BaseException:
            self.close()  # the workers may still wait for _finish_split's answer
            raise
        if split is None:
            self._add_gradients(group_sums)
        return self._step_if_finite(optimizer, loss)

    @staticmethod
    def _step_if_finite(optimizer: Optimizer | None, loss: np.generic) -> np.generic:
        if optimizer is not None and np.isfinite(loss):
            optimizer.step()
        return loss

    def _finish_split(self, split: SplitStep, group_sums: list[list[np.ndarray | None]],
                      finite: bool) -> bool:
        """After a split train request (each worker waiting with its gradients in shared
        memory): the split step, if the loss is ``finite`` and every parameter's gradients lie
        where the step adds them up (this process's in the parameters' gradient buffers, see
        ``_sync``), and True; otherwise the gradients added up here into ``.grad``, and False.
        The workers are released either way."""
        assert self._processes is not None
        workers = self._processes.workers
        params = split.group["params"]  # this module's, in order (``Optimizer.split_step``)
        go = bool(finite) and all(
            local is param.grad_buffer for local, param in zip(group_sums[0], params, strict=True)
        ) and all(grad is not None for sums in group_sums[1:] for grad in sums)
        if not go:
            self._add_gradients(group_sums)  # before the workers move on
        for worker in workers:
            worker.request({"split": go})
        if go:
            split.run([worker.gradients.vector for worker in workers])
        for worker in workers:
            worker.reply()
        if go:
            split.finish()
        return go

    def _add_gradients(self, group_sums: list[list[np.ndarray | None]]) -> None:
        """Add each group's summed parameter gradients, in group order, into ``.grad``."""
        for param, sums in zip(self.module.parameters(), zip(*group_sums, strict=True),
                               strict=True):
            present = [grad for grad in sums if grad is not None]
            if not present:
                continue
            # Worker processes' sums live in shared memory they overwrite: never keep those.
            first = present[0]
            kept = first.flags.owndata or first is param.grad_buffer
            total = first if kept else first.copy()
            for grad in present[1:]:
                total += grad
            if param.grad is None:
                param.grad = total
            else:
                param.grad += total
