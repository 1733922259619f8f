"""The collectives of ``nn.collective`` for shards in DataParallel's worker processes.

Threads share the GIL, and shards that hand it over on every NumPy call lose 15-20% to it, so
coupled shards (BatchNorm2d with batch statistics, Dropout in training) run in the worker
processes too, one shard each. They meet as the workers' questions to the caller (through a
shared-memory mailbox when the message fits, else the pipe, see ``scratchcnn.forked``), a star
with the calling process, rank 0, as its hub:

- a worker (rank k >= 1) sends ``{"collective": "sum"}`` and its partial, or
  ``{"collective": "draw"}``, then waits for the answer (``forked.ask_parent``);
- the hub reads every worker's message in rank order, computes the answer as threads would
  (``sum_in_rank_order``, or rank 0's ``draw()``: the generator lives in the caller), and sends
  it to every worker. The answers are the threads' to the bit.

A worker's error arrives in the hub's read instead of its question and is raised there (with its
type); a worker asking for another collective than the hub's is a RuntimeError. Either way, or
when the hub's own shard raises, ``DataParallel`` closes the workers, which exit where they wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from scratchcnn.forked import ForkedWorker, ask_parent
from scratchcnn.nn.collective import BatchShard, different_collectives, sum_in_rank_order

T = TypeVar("T")


class HubShard(BatchShard):
    """Rank 0, in the calling process: answers the collectives of ``workers`` (ranks 1, 2, ...,
    each running one shard of the batch for the request it was sent)."""

    def __init__(self, workers: Sequence[ForkedWorker], rows: slice, batch_size: int) -> None:
        super().__init__(0, rows, batch_size, len(workers) + 1)
        self._workers = workers

    def combine_sum(self, partial: np.ndarray) -> np.ndarray:
        partials = [partial] + [self._question(worker, "sum")[0] for worker in self._workers]
        total = sum_in_rank_order(partials)
        self._answer("sum", total)
        return total

    def draw_once(self, draw: Callable[[], T]) -> T:
        drawn = draw()  # must be an array: it crosses to the other processes
        for worker in self._workers:
            self._question(worker, "draw")
        self._answer("draw", drawn)
        return drawn

    @staticmethod
    def _question(worker: ForkedWorker, kind: str) -> list[np.ndarray]:
        message, arrays = worker.reply()  # raises the worker's error, if that is what came
        if message.get("collective") != kind:
            raise different_collectives()
        return arrays

    def _answer(self, kind: str, answer: np.ndarray) -> None:
        for worker in self._workers:
            worker.request({"collective": kind}, [answer])


class WorkerShard(BatchShard):
    """Rank ``rank`` >= 1, in a worker process: asks the caller's ``HubShard`` for the answers."""

    def combine_sum(self, partial: np.ndarray) -> np.ndarray:
        return self._ask("sum", [partial])

    def draw_once(self, draw: Callable[[], T]) -> T:
        return self._ask("draw", [])  # ``draw`` is rank 0's to call, as in threads

    @staticmethod
    def _ask(kind: str, arrays: list[np.ndarray]) -> np.ndarray:
        message, answer = ask_parent({"collective": kind}, arrays)
        if message.get("collective") != kind:
            raise different_collectives()
        return answer[0]
