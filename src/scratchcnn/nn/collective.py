"""Collectives for the layers whose result depends on the whole batch, BatchNorm2d's statistics
and Dropout's masks, when ``DataParallel`` runs a batch as shards in parallel (what
``torch.nn.SyncBatchNorm`` does across processes with ``torch.distributed``).

Every shard runs the same layers in the same order, so every shard makes the same sequence of
collective calls, each of which waits for all shards and gives every one the same answer:

    combine_sum(partial) -> sum over shards k of partial_k, added in rank order (deterministic)
    all_gather(partial)  -> every shard's partial_k, stacked in rank order
    draw_once(draw)      -> draw() called once, by rank 0, for the whole batch, shared by all

A layer sees a ``BatchShard``. Here, shards in threads (``ThreadShard``) meet at one
``threading.Barrier``: each leaves its contribution, the last to arrive combines them while the
others wait. Threads share the GIL, which costs 15-20% on many mid-sized NumPy calls, so shards in
DataParallel's worker processes meet through their pipes instead (``nn.process_collective``),
with the same answers to the bit.

``DataParallel`` makes one ``BatchGroup`` per sharded forward or backward run in threads, gives
replica k's BatchNorm2d and Dropout layers the view ``group.shards[k]`` as their ``batch_shard``
for the duration of the call, and aborts the group when a shard raises: the others then leave
their barrier with ``threading.BrokenBarrierError`` instead of waiting forever for it. Layers with
no ``batch_shard`` (every layer outside a sharded call) compute over their own input, as always.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
Combine = Callable[[list[Any]], Any]  # every shard's contribution, by rank -> the shared answer


def sum_in_rank_order(partials: list[np.ndarray]) -> np.ndarray:
    """partials[0] + partials[1] + ..., in that order: the same bits wherever it is computed."""
    total = np.array(partials[0], copy=True)  # a new array: a shard may still hold its partial
    for partial in partials[1:]:
        total += partial
    return total


def different_collectives() -> RuntimeError:
    return RuntimeError("shards called different collectives; every shard must run the same "
                        "layers in the same order")


def _call_first(draws: list[Callable[[], Any]]) -> Any:
    return draws[0]()  # every shard passed an equivalent function; rank 0's is the one called


class BatchGroup:
    """The shards of one batch, ``sizes[k]`` samples each in batch order, run concurrently (one
    thread per shard: the barrier needs every shard to arrive) for one forward or backward."""

    def __init__(self, sizes: Sequence[int]) -> None:
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"BatchGroup needs two or more non-empty shards, got sizes {sizes}")
        self.batch_size = int(sum(sizes))
        self.num_shards = len(sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.shards = [ThreadShard(self, rank, slice(starts[rank], starts[rank + 1]))
                       for rank in range(len(sizes))]
        self._pending: list[tuple[Combine, Any] | None] = [None] * len(sizes)
        self._answer: Any = None
        self._barrier = threading.Barrier(len(sizes), action=self._combine)

    def abort(self) -> None:
        """Release every shard waiting in (or later arriving at) a collective, with
        ``BrokenBarrierError``: called when a shard raises and will never arrive."""
        self._barrier.abort()

    def _meet(self, rank: int, combine: Combine, contribution: Any) -> Any:
        self._pending[rank] = (combine, contribution)
        self._barrier.wait()
        # Safe to read: the next meeting's _combine cannot run before this shard arrives there.
        return self._answer

    def _combine(self) -> None:
        """Runs in the last shard to arrive, once all have left their contribution."""
        combines = {id(entry[0]) for entry in self._pending}
        if len(combines) != 1:  # a bug in a layer: without this, shards would mix answers
            raise different_collectives()
        combine = self._pending[0][0]
        self._answer = combine([contribution for _, contribution in self._pending])


class BatchShard:
    """Shard ``rank``'s part in the collectives of one batch: samples ``rows`` of a batch of
    ``batch_size``. Layers call ``combine_sum`` and ``draw_once``; every shard must call them
    the same number of times in the same order (each call waits for all shards). Made by
    ``BatchGroup`` (threads) and ``nn.process_collective`` (processes)."""

    def __init__(self, rank: int, rows: slice, batch_size: int, num_shards: int) -> None:
        self.rank = rank
        self.rows = rows
        self.batch_size = batch_size  # samples in the whole batch (N of the unsharded call)
        self.num_shards = num_shards

    def combine_sum(self, partial: np.ndarray) -> np.ndarray:
        """Sum over the shards of ``partial``, an array of the same shape on each, e.g. the
        per-channel sums (C,) of this shard's samples -> the whole batch's sums (C,).
        The answer may be shared by every shard: read it, do not modify it."""
        raise NotImplementedError

    def all_gather(self, partial: np.ndarray) -> np.ndarray:
        """Every shard's ``partial`` (arrays of one shape and dtype), stacked by rank: shape
        (num_shards, *partial.shape). One meeting, as a sum of arrays that are zero but in their
        own shard's slot (adding zeros is exact). The answer may be shared: do not modify it."""
        slots = np.zeros((self.num_shards, *partial.shape), partial.dtype)
        slots[self.rank] = partial
        return self.combine_sum(slots)

    def draw_once(self, draw: Callable[[], T]) -> T:
        """``draw()``, called by one shard only, e.g. a whole batch's random numbers (an array)
        drawn from a generator that must be advanced exactly as an unsharded call would. The
        answer may be shared by every shard: read it (e.g. take ``answer[shard.rows]``), do not
        modify it."""
        raise NotImplementedError


class ThreadShard(BatchShard):
    """A shard run in a thread, meeting the others of its ``BatchGroup`` at its barrier."""

    def __init__(self, group: BatchGroup, rank: int, rows: slice) -> None:
        super().__init__(rank, rows, group.batch_size, group.num_shards)
        self._group = group

    def combine_sum(self, partial: np.ndarray) -> np.ndarray:
        return self._group._meet(self.rank, sum_in_rank_order, partial)

    def draw_once(self, draw: Callable[[], T]) -> T:
        return self._group._meet(self.rank, _call_first, draw)
