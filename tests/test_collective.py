"""BatchGroup: every shard leaves a collective with the same answer, draws happen once, shards out
of step or aborted are released with an error instead of waiting forever."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from scratchcnn.nn.collective import BatchGroup


def run_shards(group, work):
    """``work(shard)`` for every shard of ``group``, each in its own thread: results or errors."""
    def guarded(shard):
        try:
            return work(shard)
        except Exception as error:
            group.abort()
            return error

    with ThreadPoolExecutor(len(group.shards)) as pool:
        futures = [pool.submit(guarded, shard) for shard in group.shards]
        return [future.result(timeout=60) for future in futures]


def test_combine_sum_and_draw_once_give_every_shard_the_same_answer():
    group = BatchGroup([3, 1, 2])
    assert group.batch_size == 6
    assert [shard.rows for shard in group.shards] == [slice(0, 3), slice(3, 4), slice(4, 6)]
    calls = []

    def work(shard):
        def draw():
            calls.append(shard.rank)
            return np.arange(6)

        total = shard.combine_sum(np.full(2, shard.rank + 1.0))
        drawn = shard.draw_once(draw)
        again = shard.combine_sum(np.array([shard.rows.stop - shard.rows.start]))
        return total, drawn[shard.rows], again

    results = run_shards(group, work)
    assert len(calls) == 1
    for rank, (total, rows, again) in enumerate(results):
        np.testing.assert_array_equal(total, [6.0, 6.0])
        np.testing.assert_array_equal(rows, np.arange(6)[group.shards[rank].rows])
        np.testing.assert_array_equal(again, [6])
    assert results[0][0] is results[2][0]  # one shared answer


def test_all_gather_gives_every_shard_each_partial_in_rank_order():
    group = BatchGroup([2, 1, 3])
    assert [shard.num_shards for shard in group.shards] == [3, 3, 3]

    def work(shard):
        return shard.all_gather(np.array([[shard.rank, -shard.rank - 0.5]], np.float32))

    for gathered in run_shards(group, work):
        assert gathered.shape == (3, 1, 2) and gathered.dtype == np.float32
        np.testing.assert_array_equal(gathered[:, 0], [[0, -0.5], [1, -1.5], [2, -2.5]])


def test_shards_out_of_step_fail_instead_of_mixing_answers():
    group = BatchGroup([1, 1])

    def work(shard):
        if shard.rank == 0:
            return shard.combine_sum(np.zeros(1))
        return shard.draw_once(lambda: 0)

    errors = run_shards(group, work)
    kinds = sorted(type(error).__name__ for error in errors)
    assert kinds == ["BrokenBarrierError", "RuntimeError"]


def test_abort_releases_waiting_shards():
    group = BatchGroup([2, 2, 2])
    results = run_shards(group, lambda shard: shard.combine_sum(np.ones(1)) if shard.rank else
                         group.abort())
    assert results[0] is None
    assert all(isinstance(error, threading.BrokenBarrierError) for error in results[1:])


@pytest.mark.parametrize("sizes", [[4], [2, 0]])
def test_needs_two_non_empty_shards(sizes):
    with pytest.raises(ValueError, match="two or more non-empty shards"):
        BatchGroup(sizes)
