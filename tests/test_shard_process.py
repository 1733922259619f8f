"""DataParallel's worker processes: the same bits as threads, kept in step with the module
(weights, buffers, flags, grad mode, structure), errors raised in the caller, dead workers
replaced, stopped on close."""

import os
import signal

import numpy as np
import pytest

from scratchcnn import nn
from scratchcnn.forked import processes_available, recv_array, send_array
from scratchcnn.models import build_model
from scratchcnn.nn.parallel import DataParallel
from test_parallel import forward_backward, sparse_images

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


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.arange(24, dtype=np.float64).reshape(2, 3, 4).transpose(0, 2, 1),  # a strided view
    np.zeros((0, 5), np.float32),
    np.array(2.5),
])
def test_arrays_cross_a_pipe_with_values_and_memory_order(array):
    import multiprocessing

    sender, receiver = multiprocessing.Pipe()
    send_array(sender, array)
    got = recv_array(receiver)
    np.testing.assert_array_equal(got, array)
    assert got.dtype == array.dtype
    assert np.argsort(got.strides).tolist() == np.argsort(array.strides).tolist()
