"""DataParallel's worker processes: the same bits as threads, BatchNorm2d/Dropout models
included (collectives through the pipes), kept in step with the module (weights, buffers, flags,
grad mode, structure), errors raised in the caller (also from inside a collective, never a hang),
dead workers replaced, stopped on close."""

import os
import signal

import numpy as np
import pytest

from scratchcnn import nn
from scratchcnn.forked import processes_available, recv_message, send_message
from scratchcnn.models import build_model
from scratchcnn.nn import parallel
from scratchcnn.nn.parallel import DataParallel
from scratchcnn.nn.replica import BATCH_AWARE
from test_parallel import forward_backward, run_briefly, sparse_images

pytestmark = pytest.mark.skipif(not processes_available(), reason="worker processes need Linux")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch, shards, max_shard", [(64, 2, None), (256, 2, 64), (50, 3, 16)])
def test_processes_give_the_same_bits_as_threads(rng, dtype, batch, shards, max_shard):
    x, y = sparse_images(rng, batch, dtype)
    results = {}
    for workers in ("threads", "processes"):
        model = build_model("simple-cnn", dtype=dtype, rng=np.random.default_rng(1))
        runner = DataParallel(model, shards, max_shard_size=max_shard, workers=workers)
        loss, grad_input, grads = forward_backward(runner, model, x, y)
        results[workers] = [runner(x), loss, grad_input, *grads]
        runner.close()
    for got, want in zip(results["processes"], results["threads"], strict=True):
        assert np.asarray(got).dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, want)


def test_worker_follows_flags_grad_mode_and_structure(rng):
    model = build_model("tiny-cnn", dtype=np.float64, rng=rng)
    runner = DataParallel(model, 2, workers="processes")
    x, y = sparse_images(rng, 8)
    with nn.no_grad():  # the worker is forked here, inside no_grad
        np.testing.assert_allclose(runner(x), model(x), rtol=1e-13)
    forward_backward(runner, model, x, y)  # it must still keep caches for backward when asked to

    model[0].needs_input_grad = False  # flags travel with every forward
    assert forward_backward(runner, model, x, y)[1] is None

    model.append(nn.ReLU())  # a new structure: the worker is replaced by a fresh fork
    out = runner(x)
    assert out.min() >= 0
    np.testing.assert_allclose(out, model(x), rtol=1e-13)

    with nn.no_grad():
        runner(x)
    with pytest.raises(RuntimeError, match="forward"):  # as unsharded: no caches to use
        runner.backward(np.ones((8, 10)))
    runner.close()


def test_parameters_in_shared_memory_reach_the_worker_without_copies(rng):
    """Parameters already in shared memory (the harness's flat vector) are the worker's own
    arrays too: in-place updates reach it with nothing copied; rebinding one forks afresh."""
    model = build_model("tiny-cnn", dtype=np.float64, rng=rng)
    nn.flatten_parameters(model.parameters())
    runner = DataParallel(model, 2, workers="processes")
    x, _ = sparse_images(rng, 8, np.float64)
    np.testing.assert_allclose(runner(x), model(x), rtol=1e-13)
    pool = runner._processes
    assert pool._staged.arrays == []  # tiny-cnn has no buffers: nothing to copy each call
    first_workers = list(pool.workers)

    model[0].weight.data *= 2.0  # in place, as an optimizer step writes
    np.testing.assert_allclose(runner(x), model(x), rtol=1e-13)
    assert pool.workers == first_workers

    model[0].weight.data = model[0].weight.data * 3.0  # rebound to a private array
    np.testing.assert_allclose(runner(x), model(x), rtol=1e-13)
    assert pool.workers != first_workers and len(pool._staged.arrays) == 1
    runner.close()

class FailsOnNegative(nn.Module):
    """Raises in forward when its shard holds a negative number: only the worker's will."""

    def forward(self, x):
        if (x < 0).any():
            raise ValueError("negative input in this shard")
        return x

    def backward(self, grad_output):
        return grad_output


def test_worker_errors_are_raised_by_the_caller_and_the_runner_recovers():
    runner = DataParallel(FailsOnNegative(), 2, workers="processes")
    x = np.ones((4, 3))
    x[3, 0] = -1.0  # in the second shard
    with pytest.raises(ValueError, match="negative input in this shard"):
        runner(x)
    x[3, 0] = 1.0
    np.testing.assert_array_equal(runner(x), x)
    runner.close()


def test_a_killed_worker_is_reported_and_replaced(rng):
    model = build_model("tiny-cnn", rng=rng)
    runner = DataParallel(model, 2, workers="processes")
    x, _ = sparse_images(rng, 6, np.float32)
    runner(x)
    process = runner._processes.workers[0]._process
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    with pytest.raises(RuntimeError, match="worker process died"):
        runner(x)
    np.testing.assert_allclose(runner(x), model(x), rtol=1e-6)
    runner.close()


def test_close_stops_the_workers(rng):
    runner = DataParallel(build_model("tiny-cnn", rng=rng), 3, workers="processes")
    runner(sparse_images(rng, 6, np.float32)[0])
    processes = [worker._process for worker in runner._processes.workers]
    assert len(processes) == 2 and all(p.is_alive() for p in processes)
    runner.close()
    assert not any(p.is_alive() for p in processes)


def test_bad_workers_argument_is_rejected():
    with pytest.raises(ValueError, match="workers must be 'threads' or 'processes'"):
        DataParallel(nn.ReLU(), workers="gpus")


ARRAYS = [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.arange(24, dtype=np.float64).reshape(2, 3, 4).transpose(0, 2, 1),  # a strided view
    np.zeros((0, 5), np.float32),
    np.array(2.5),
]


@pytest.mark.parametrize("arrays", [ARRAYS[:1], ARRAYS[1:2], ARRAYS[2:3], ARRAYS[3:], ARRAYS,
                                    []])
def test_messages_cross_a_pipe_with_their_arrays_values_and_memory_order(arrays):
    import multiprocessing

    sender, receiver = multiprocessing.Pipe()
    send_message(sender, {"op": "x", "n": [1, 2]}, arrays)
    message, got = recv_message(receiver)
    assert message == {"op": "x", "n": [1, 2]}
    assert len(got) == len(arrays)
    for received, array in zip(got, arrays, strict=True):
        np.testing.assert_array_equal(received, array)
        assert received.shape == array.shape and received.dtype == array.dtype
        assert np.argsort(received.strides).tolist() == np.argsort(array.strides).tolist()
    assert not receiver.poll()  # nothing left over for the next message


def test_a_mailbox_hands_over_each_message_once_with_copies_of_its_arrays():
    from scratchcnn.forked import _Mailbox

    box = _Mailbox(capacity=4096)
    assert box.take() is None
    assert box.post({"op": "x"}, ARRAYS)
    message, got = box.take()
    assert message == {"op": "x"} and len(got) == len(ARRAYS)
    for received, array in zip(got, ARRAYS, strict=True):
        np.testing.assert_array_equal(received, array)
        assert received.shape == array.shape and received.dtype == array.dtype
        assert np.argsort(received.strides).tolist() == np.argsort(array.strides).tolist()
    assert box.take() is None  # taken once
    assert box.post({"op": "y"}, [np.full((2, 3, 4), 7.0)])  # the slot is reused...
    np.testing.assert_array_equal(got[1], ARRAYS[1])  # ...but what was taken is a copy
    assert box.take()[0] == {"op": "y"}


def test_a_mailbox_refuses_what_does_not_fit_and_announces_nothing(monkeypatch):
    from scratchcnn import forked

    box = forked._Mailbox(capacity=1024)
    assert not box.post({}, [np.zeros(1024)])  # 8 KB of arrays
    assert not box.post({"text": "x" * 2000})  # its JSON alone
    assert box.take() is None
    monkeypatch.setattr(forked, "_ORDERED_STORES", False)  # a machine that may reorder stores
    assert not box.post({})
    assert box.take() is None


def _echo_handler():
    """A worker that returns its request's arrays (through the pipe) and whether each one was a
    view of shared memory (the inbox) rather than an array read from the pipe."""
    from scratchcnn.forked import is_shared

    def handle(message, arrays):
        return {"shared": [is_shared(array) for array in arrays]}, arrays

    return handle


def test_request_arrays_travel_through_the_inbox_when_they_fit():
    from scratchcnn.forked import ForkedWorker

    arrays = [np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(0, 2, 1),
              np.arange(5, dtype=np.int64), np.zeros((0, 3)), np.array(2.5)]
    worker = ForkedWorker(_echo_handler, "scratchcnn-test", inbox_bytes=4096)
    try:
        for through_inbox, big in ((True, False), (False, False), (True, True)):
            sent = arrays + ([np.ones(2048)] if big else [])  # 16 KB: more than the inbox
            worker.request({}, sent, through_inbox=through_inbox)
            message, got = worker.reply()
            assert message["shared"] == [through_inbox and not big] * len(sent)
            for want, have in zip(sent, got, strict=True):
                np.testing.assert_array_equal(have, want)
                assert have.dtype == want.dtype
                assert np.argsort(have.strides).tolist() == np.argsort(want.strides).tolist()
    finally:
        worker.close()


def _slow_asker():
    """A worker that sleeps ``delay`` seconds, asks the caller a question, sleeps again and
    answers with the caller's reply doubled."""
    import time

    from scratchcnn.forked import ask_parent

    def handle(message, arrays):
        time.sleep(message["delay"])
        _, answer = ask_parent({"question": True}, arrays)
        time.sleep(message["delay"])
        return {}, [2 * answer[0]]

    return handle


@pytest.mark.parametrize("delay", [0.0, 0.03])
@pytest.mark.parametrize("size", [3, 2**18])  # 2 MB: more than a mailbox holds, so the pipe
@pytest.mark.parametrize("ordered_stores", [True, False])  # False: the pipe only
def test_answers_arrive_whether_they_come_within_the_polling_time_or_after_it(
        monkeypatch, delay, size, ordered_stores):
    """Both ends poll their pipe and mailbox for SPIN_SECONDS, then nap on the pipe between
    looks; a longer wait (the worker sleeps 30 ms where they poll 2 ms) must still end in the
    answer, whichever way the question, the answer and the reply travel."""
    from scratchcnn import forked

    # Before the fork: the worker's too.
    monkeypatch.setattr(forked, "SPIN_SECONDS", 0.002)
    monkeypatch.setattr(forked, "_ORDERED_STORES", ordered_stores)
    worker = forked.ForkedWorker(_slow_asker, "scratchcnn-test")
    try:
        for _ in range(2):  # the mailboxes' second messages too
            worker.request({"delay": delay}, [np.arange(float(size))])
            question, arrays = worker.reply()
            assert question == {"question": True}
            worker.request({}, [arrays[0] + 1])
            _, (answer,) = worker.reply()
            np.testing.assert_array_equal(answer, 2 * np.arange(1.0, size + 1))
    finally:
        worker.close()


@pytest.mark.parametrize("pause", [0.0, 0.03])
def test_a_lingering_worker_answers_the_next_request_within_or_after_its_polling(monkeypatch,
                                                                                pause):
    """After a request marked "linger" the worker polls for the next one before sleeping: one
    sent while it polls, or after it went back to sleep, is answered all the same."""
    import time

    from scratchcnn import forked

    monkeypatch.setattr(forked, "SPIN_SECONDS", 0.002)
    worker = forked.ForkedWorker(_echo_handler, "scratchcnn-test")
    try:
        for index in range(3):
            worker.request({"linger": True}, [np.full(2, index)])
            _, (echoed,) = worker.reply()
            np.testing.assert_array_equal(echoed, [index, index])
            time.sleep(pause)
    finally:
        worker.close()


def test_inputs_a_worker_keeps_for_backward_survive_the_backward_request(rng):
    """Flatten -> Linear keeps views of its input for backward: that input came through the
    worker's inbox, so the backward request's gradients must not, or they would overwrite it."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, dtype=np.float64, rng=rng))
    x, labels = rng.standard_normal((8, 3, 2, 2)), rng.integers(0, 3, 8)
    _, _, whole = forward_backward(model, model, x, labels)
    runner = DataParallel(model, 2, workers="processes")
    _, _, sharded = forward_backward(runner, model, x, labels)
    runner.close()
    for got, want in zip(sharded, whole, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def coupled_model(name, dtype):
    """bn-cnn, or a small Conv -> BatchNorm -> ReLU -> Dropout -> Linear; Dropout generators seeded
    alike, so two calls of this give the same masks."""
    rng = np.random.default_rng(11)
    if name == "bn-cnn":
        return build_model(name, dtype=dtype, rng=rng)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False, dtype=dtype, rng=rng),
                         nn.BatchNorm2d(4, dtype=dtype), nn.ReLU(), nn.Dropout(0.4, rng=rng),
                         nn.Flatten(), nn.Linear(4 * 26 * 26, 10, dtype=dtype, rng=rng))


def no_thread_collectives(sizes):
    raise AssertionError("coupled shards met in threads, not in the worker processes")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, batch, shards", [("bn-cnn", 7, 2), ("small", 10, 3),
                                                 ("small", 9, 2)])
def test_coupled_shards_in_processes_give_the_same_bits_as_in_threads(rng, monkeypatch, dtype,
                                                                      name, batch, shards):
    """BatchNorm2d's batch statistics, their gradients, the running statistics and the dropout
    masks: the worker processes' collectives answer exactly what the threads' do."""
    steps = [sparse_images(rng, batch, dtype) for _ in range(2)]  # fresh statistics and masks
    results = {}
    for workers in ("threads", "processes"):
        model = coupled_model(name, dtype)
        model[0].needs_input_grad = True
        runner = DataParallel(model, shards, workers=workers)
        if workers == "processes":
            monkeypatch.setattr(parallel, "BatchGroup", no_thread_collectives)
        results[workers] = []
        for x, y in steps:
            loss, grad_input, grads = forward_backward(runner, model, x, y)
            assert runner._coupled and len(runner._sharded_batch) == shards
            results[workers] += [loss, grad_input, *grads]
        results[workers] += [buffer.copy() for _, buffer in model.named_buffers()]
        if workers == "processes":
            pids = {worker._process.pid for worker in runner._processes.workers}
            assert len(pids) == shards - 1 and os.getpid() not in pids
        runner.close()
    assert len(results["processes"]) == len(results["threads"])
    for got, want in zip(results["processes"], results["threads"], strict=True):
        assert np.asarray(got).dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, want)


class FailsOnShardSize(nn.Module):
    """The identity, but raises in ``when`` ("forward"/"backward") on a shard of ``size`` samples
    run in ``where``: "parent" (rank 0, the hub) or "worker" (the processes)."""

    def __init__(self, size, when, where):
        super().__init__()
        self.size, self.when, self.where = size, when, where
        self.parent_pid = os.getpid()

    def _check(self, x, when):
        in_parent = os.getpid() == self.parent_pid
        if when == self.when and len(x) == self.size and in_parent == (self.where == "parent"):
            raise FloatingPointError(f"this shard fails in {when}")
        return x

    def forward(self, x):
        return self._check(x, "forward")

    def backward(self, grad_output):
        return self._check(grad_output, "backward")


@pytest.mark.parametrize("when", ["forward", "backward"])
@pytest.mark.parametrize("size, where", [
    (2, "worker"),  # rank 2, while rank 1 waits for the answer to its question
    (3, "worker"),  # rank 1, while rank 2 waits
    (3, "parent"),  # rank 0, the hub: both workers wait for answers that never come
])
def test_a_failing_shard_in_a_coupled_process_run_raises_its_error_and_the_runner_recovers(
        rng, when, size, where):
    # Every shard passes the first BatchNorm's collectives; the others wait at the next.
    model = nn.Sequential(nn.BatchNorm2d(2, dtype=np.float64), nn.Dropout(0.5),
                          FailsOnShardSize(size, when, where), nn.BatchNorm2d(2, dtype=np.float64))
    runner = DataParallel(model, num_shards=3, workers="processes")
    x = rng.standard_normal((8, 2, 3, 3))  # shards of 3, 3 and 2
    error = run_briefly(lambda: runner.backward(runner(x)))
    assert isinstance(error, FloatingPointError) and f"fails in {when}" in str(error)
    assert runner._processes is None  # closed: the workers waiting in a collective are gone
    assert all(layer.batch_shard is None for replica in runner._replicas
               for layer in replica.modules() if isinstance(layer, BATCH_AWARE))

    for net in (model, *runner._replicas):
        net[2].size = None
    assert run_briefly(lambda: runner.backward(runner(x))) is None
    assert runner._sharded_batch == [3, 3, 2] and len(runner._processes.workers) == 2
    runner.close()


class AsksForASum(nn.Dropout):
    """A Dropout whose shards in worker processes also ask for a sum, ``before`` or after their
    mask: a layer whose shards call different collectives."""

    def __init__(self, before):
        super().__init__(0.5)
        self.before = before
        self.parent_pid = os.getpid()

    def _uniform(self, x):
        in_worker = os.getpid() != self.parent_pid
        if in_worker and self.before:
            self.batch_shard.combine_sum(np.zeros(1))
        drawn = super()._uniform(x)
        if in_worker and not self.before:
            self.batch_shard.combine_sum(np.zeros(1))
        return drawn


@pytest.mark.parametrize("before", [True, False])
def test_shards_calling_different_collectives_across_processes_fail(rng, before):
    runner = DataParallel(nn.Sequential(nn.BatchNorm2d(2, dtype=np.float64), AsksForASum(before)),
                          num_shards=2, workers="processes")
    error = run_briefly(lambda: runner(rng.standard_normal((4, 2, 3, 3))))
    assert isinstance(error, RuntimeError) and "different collectives" in str(error)
    assert runner._processes is None
