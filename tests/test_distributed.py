"""scratchcnn.distributed, DistributedDataParallel, SyncBatchNorm and the samplers in one process:
the world of one (no mpiexec, no mpi4py), argument checks, the launcher's command, and the
gradient arithmetic against a stand-in for two identical ranks. Real ranks: test_ddp_mpi.py."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchcnn.distributed as dist
from scratchcnn import nn
from scratchcnn.data import BatchSampler, DistributedSampler, split_batch
from scratchcnn.distributed import launch
from scratchcnn.models import build_model
from scratchcnn.nn.parallel import DistributedDataParallel
from scratchcnn.optim import Adam


@pytest.fixture
def no_mpi(monkeypatch):
    """Not under mpiexec, and mpi4py impossible to import (as if not installed)."""
    for name in (*launch.MPIEXEC_VARIABLES, launch.LAUNCH_MARKER, "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def world_of_one(no_mpi):
    dist.init_process_group()
    return dist


@pytest.fixture
def two_identical_ranks(world_of_one, monkeypatch):
    """The group as seen by one of two ranks that hold the same arrays: a sum over the ranks
    is twice this one's, a maximum or a broadcast changes nothing; ``calls`` records the sums'
    sizes."""
    calls = []

    def all_reduce(array, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op is dist.ReduceOp.MAX:  # DDP's check that the ranks' models agree: they do
            return dist.Work() if async_op else None
        assert op is dist.ReduceOp.SUM
        calls.append(array.size)
        array *= 2
        return dist.Work() if async_op else None

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "broadcast", lambda array, src=0, group=None: None)
    return calls


# -- the process group --------------------------------------------------------------------------


def test_a_process_not_started_by_mpiexec_is_a_world_of_one_without_mpi4py(no_mpi):
    assert not launch.launched_by_mpiexec()
    assert not dist.is_initialized()
    dist.init_process_group(backend="mpi")
    assert dist.is_initialized() and dist.get_rank() == 0 and dist.get_world_size() == 1
    array = np.arange(6.0).reshape(2, 3)
    for op in dist.ReduceOp:
        dist.all_reduce(array, op=op)
    work = dist.all_reduce(array, async_op=True)
    assert work.is_completed() and work.wait()
    dist.broadcast(array, src=0)
    dist.barrier()
    np.testing.assert_array_equal(array, np.arange(6.0).reshape(2, 3))
    assert sys.modules["mpi4py"] is None  # never imported (the stand-in would have raised)
    dist.destroy_process_group()
    assert not dist.is_initialized()
    dist.init_process_group()  # again, after destroy
    assert sys.excepthook is sys.__excepthook__


def test_group_misuse_is_refused_in_one_line(no_mpi):
    with pytest.raises(RuntimeError, match="init_process_group"):
        dist.get_rank()
    with pytest.raises(RuntimeError, match="init_process_group"):
        dist.all_reduce(np.zeros(2))
    with pytest.raises(ValueError, match=r"backend 'gloo' is not supported.*'mpi'"):
        dist.init_process_group(backend="gloo")
    with pytest.raises(ValueError, match="init_method"):
        dist.init_process_group(init_method="tcp://10.0.0.1:23456")
    with pytest.raises(ValueError, match="world_size=2, but mpiexec made this process "
                                         "world_size 1"):
        dist.init_process_group(world_size=2)
    with pytest.raises(ValueError, match="rank=1"):
        dist.init_process_group(rank=1)
    assert not dist.is_initialized()
    dist.init_process_group(world_size=1, rank=0)
    with pytest.raises(RuntimeError, match="twice"):
        dist.init_process_group()
    with pytest.raises(TypeError, match="expected a NumPy array"):
        dist.all_reduce([1.0, 2.0])
    with pytest.raises(ValueError, match="C-contiguous"):
        dist.all_reduce(np.zeros((3, 4))[:, ::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        dist.broadcast(np.zeros((3, 4)).T)
    with pytest.raises(TypeError, match="ReduceOp"):
        dist.all_reduce(np.zeros(2), op="sum")
    with pytest.raises(TypeError, match="AVG needs a floating array"):
        dist.all_reduce(np.zeros(2, dtype=np.int64), op=dist.ReduceOp.AVG)
    with pytest.raises(ValueError, match=r"src must be a rank in \[0, 0\]"):
        dist.broadcast(np.zeros(2), src=1)
    with pytest.raises(ValueError, match="default group"):
        dist.barrier(group=object())


@pytest.mark.parametrize("variable", [*launch.MPIEXEC_VARIABLES, launch.LAUNCH_MARKER])
def test_started_by_mpiexec_without_mpi4py_names_the_fix(no_mpi, monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert launch.launched_by_mpiexec()
    with pytest.raises(RuntimeError, match=r"started by mpiexec, but mpi4py cannot be loaded"
                                           r".*pip install 'scratchcnn\[mpi\]'"):
        dist.init_process_group()
    assert not dist.is_initialized()


def test_a_process_started_by_torchrun_is_told_to_use_mpiexec(no_mpi, monkeypatch):
    # torchrun sets WORLD_SIZE (and RANK) but no MPI variable: each process would be a world of
    # one, and N of them would train and save alone.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RuntimeError, match=r"^init_process_group: WORLD_SIZE=3 \(torchrun's\) "
                                           r"is set, but this process was not started by "
                                           r"mpiexec.*`mpiexec -n 3 python script.py` instead "
                                           r"of torchrun$"):
        dist.init_process_group(init_method="env://")
    assert not dist.is_initialized()
    for value in ("1", "", "two"):  # a world of one, as before
        monkeypatch.setenv("WORLD_SIZE", value)
        dist.init_process_group()
        assert dist.get_world_size() == 1
        dist.destroy_process_group()
    monkeypatch.setenv("WORLD_SIZE", "3")  # mpiexec's ranks are what counts under mpiexec
    monkeypatch.setenv(launch.MPIEXEC_VARIABLES[0], "2")
    with pytest.raises(RuntimeError, match="mpi4py cannot be loaded"):
        dist.init_process_group()


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.skipif(not os.access(TORCHRUN, os.X_OK), reason="needs torchrun (PyTorch)")
def test_torchrun_launch_fails_in_every_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("from scratchcnn import distributed as dist\n"
                      "dist.init_process_group(init_method='env://')\n"
                      "print('trained alone as rank', dist.get_rank(), flush=True)\n")
    env = {name: value for name, value in os.environ.items()
           if name not in (*launch.MPIEXEC_VARIABLES, launch.LAUNCH_MARKER)}
    result = subprocess.run([TORCHRUN, "--nproc_per_node=2", str(script)], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "trained alone" not in result.stdout
    assert ("launch with `mpiexec -n 2 python script.py` instead of torchrun"
            in result.stdout + result.stderr), result.stderr[-3000:]


# -- the launcher -------------------------------------------------------------------------------


def test_mpiexec_command_pins_one_blas_thread_and_marks_the_ranks(monkeypatch):
    program = launch.find_mpiexec()
    if program is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("needs mpiexec and mpi4py")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    command, env = launch.mpiexec_command(3, ["compare", "--epochs", "1"])
    assert command[:3] == [program, "-n", "3"]
    assert command[-6:] == [sys.executable, "-m", "scratchcnn", "compare", "--epochs", "1"]
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env[name] == "1"
    assert env[launch.LAUNCH_MARKER] == "1"
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in env or "OMPI_ALLOW_RUN_AS_ROOT" in os.environ
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    _, env = launch.mpiexec_command(2, [])
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    command, _ = launch.mpiexec_command(2, ["script.py", "-x"], module=None)
    assert command[-3:] == [sys.executable, "script.py", "-x"]


def test_launcher_without_mpiexec_or_mpi4py_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"mpiexec is not found.*scratchcnn\[mpi\]"):
        launch.mpiexec_command(2, [], python=str(tmp_path / "python"))
    (tmp_path / "mpiexec").write_text("#!/bin/sh\n")
    (tmp_path / "mpiexec").chmod(0o755)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ModuleNotFoundError, match=r"mpi4py is not installed.*scratchcnn\[mpi\]"):
        launch.mpiexec_command(2, [])
    with pytest.raises(ValueError, match="positive int"):
        launch.mpiexec_command(0, [])


def test_child_environment_drops_what_marks_a_rank(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("PMIX_RANK", "1")
    monkeypatch.setenv(launch.LAUNCH_MARKER, "1")
    monkeypatch.setenv("SCRATCHCNN_SOMETHING_ELSE", "kept")
    env = launch.child_environment()
    assert env["SCRATCHCNN_SOMETHING_ELSE"] == "kept"
    assert not {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", launch.LAUNCH_MARKER} & env.keys()


# -- DistributedDataParallel --------------------------------------------------------------------


def _batch(rng, n=10):
    return rng.standard_normal((n, 1, 28, 28)), rng.integers(0, 10, n)


def _step(model, x, y):
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    return loss


def test_ddp_in_a_world_of_one_is_the_plain_model(world_of_one, rng):
    plain = build_model("simple-cnn", dtype=np.float64, rng=0)
    ddp = DistributedDataParallel(build_model("simple-cnn", dtype=np.float64, rng=0))
    assert list(ddp.state_dict()) == [f"module.{key}" for key in plain.state_dict()]
    optimizers = [Adam(model.parameters(), lr=1e-3) for model in (plain, ddp)]
    for _ in range(3):
        x, y = _batch(rng)
        for model, optimizer in zip((plain, ddp), optimizers, strict=True):
            optimizer.zero_grad()
            _step(model, x, y)
            optimizer.step()
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(ddp.module.state_dict()[key], value)
    # Backward wrote the gradients straight into the one vector the all-reduce takes.
    for param in ddp.parameters():
        assert param.grad is param.grad_buffer and np.shares_memory(param.grad, ddp._gradients)


def test_ddp_needs_a_process_group(no_mpi):
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedDataParallel(build_model("tiny-cnn", rng=0))


def test_ddp_gradient_is_the_whole_batch_gradient(two_identical_ranks, rng):
    # Two ranks holding the same n samples: the whole batch is those samples twice, whose
    # mean-loss gradient is the one-process gradient of the n samples. Each rank scales its
    # output gradient by n / 2n, and one all-reduce of the gradient vector doubles it back.
    x, y = _batch(rng)
    plain = build_model("simple-cnn", dtype=np.float64, rng=0)
    _step(plain, x, y)
    ddp = DistributedDataParallel(build_model("simple-cnn", dtype=np.float64, rng=0))
    two_identical_ranks.clear()
    _step(ddp, x, y)
    params = list(ddp.parameters())
    size = sum(param.size for param in params)
    # The count in forward; in backward the gradients and, per parameter, how many ranks have it.
    assert two_identical_ranks == [1, size + len(params)]
    for mine, want in zip(ddp.parameters(), plain.parameters(), strict=True):
        np.testing.assert_allclose(mine.grad, want.grad, rtol=1e-12, atol=1e-15)


def test_ddp_leaves_a_gradient_no_rank_has_none_and_keeps_a_foreign_one(two_identical_ranks,
                                                                         rng):
    ddp = DistributedDataParallel(build_model("tiny-cnn", dtype=np.float64, rng=0))
    params = list(ddp.parameters())
    first, last = params[0], params[-1]
    last.grad_buffer = None  # its gradient lands in an array of its own
    ddp(_batch(rng)[0])  # a forward, then a backward that never reaches ``first``
    first.grad = None
    ddp.module[-1].weight.grad = None
    own = np.ones_like(last.data)
    last.grad = own
    ddp._all_reduce_gradients()
    # Neither rank (both hold the same) has first's gradient: it stays None, as in one process,
    # so the optimizer leaves the parameter alone.
    assert first.grad is None
    assert last.grad is own and np.all(own == 2)  # reduced (two ranks' ones) in place


def test_no_sync_skips_the_gradient_all_reduce_until_the_next_backward(two_identical_ranks,
                                                                        rng):
    x, y = _batch(rng)
    plain = build_model("tiny-cnn", dtype=np.float64, rng=0)
    _step(plain, x, y)
    _step(plain, x, y)  # accumulated: twice the gradient
    ddp = DistributedDataParallel(build_model("tiny-cnn", dtype=np.float64, rng=0))
    two_identical_ranks.clear()
    with ddp.no_sync():
        _step(ddp, x, y)
    assert two_identical_ranks == [1]  # the count only
    _step(ddp, x, y)
    assert len(two_identical_ranks) == 3
    for mine, want in zip(ddp.parameters(), plain.parameters(), strict=True):
        np.testing.assert_allclose(mine.grad, want.grad, rtol=1e-12, atol=1e-15)


def test_ddp_under_no_grad_meets_no_other_rank(two_identical_ranks, rng):
    ddp = DistributedDataParallel(build_model("bn-cnn", dtype=np.float64, rng=0))
    two_identical_ranks.clear()
    with nn.no_grad():
        ddp.eval()(_batch(rng)[0])  # rank 0 may evaluate alone
    assert two_identical_ranks == []


# -- SyncBatchNorm ------------------------------------------------------------------------------


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_mode():
    model = build_model("bn-cnn", dtype=np.float64, rng=0)
    model[1].eval()
    model[1].running_mean += 0.5
    before = [(layer, layer.weight, layer.bias, layer.running_mean, layer.running_var,
               layer.num_batches_tracked, layer.training)
              for layer in model if isinstance(layer, nn.BatchNorm2d)]
    state = model.state_dict()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    after = [layer for layer in model if isinstance(layer, nn.BatchNorm2d)]
    assert len(after) == len(before) == 4
    for layer, (old, weight, bias, mean, var, count, training) in zip(after, before,
                                                                        strict=True):
        assert type(layer) is nn.SyncBatchNorm and layer is not old
        assert layer.weight is weight and layer.bias is bias
        assert layer.running_mean is mean and layer.running_var is var
        assert layer.num_batches_tracked is count and layer.training is training
        assert (layer.eps, layer.momentum) == (old.eps, old.momentum)
    assert list(model.state_dict()) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(model.state_dict()[key], value)
    root = nn.BatchNorm2d(3, affine=False, momentum=None)
    sync_root = nn.SyncBatchNorm.convert_sync_batchnorm(root)
    assert type(sync_root) is nn.SyncBatchNorm and sync_root.weight is None
    assert sync_root.momentum is None and sync_root.running_mean is root.running_mean


def test_sync_batchnorm_sums_every_rank_and_leaves_its_argument_alone(two_identical_ranks,
                                                                        rng):
    # Two identical ranks: every sum (and the count) doubles, so the statistics, output and
    # input gradient are BatchNorm2d's on one rank's batch.
    x, grad = rng.standard_normal((6, 3, 4, 4)), rng.standard_normal((6, 3, 4, 4))
    plain, sync = nn.BatchNorm2d(3, dtype=np.float64), nn.SyncBatchNorm(3, dtype=np.float64)
    two_identical_ranks.clear()
    np.testing.assert_allclose(sync(x), plain(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sync.backward(grad), plain.backward(grad), rtol=1e-12,
                               atol=1e-12)
    assert two_identical_ranks == [4, 3, 6]  # sums + M, sums of squares, backward's two sums
    whole = nn.BatchNorm2d(3, dtype=np.float64)
    whole(np.concatenate([x, x]))  # the unbiased running variance counts both ranks' values
    np.testing.assert_allclose(sync.running_var, whole.running_var, rtol=1e-12)
    assert not np.allclose(sync.running_var, plain.running_var, rtol=1e-6)
    partial = np.arange(4.0)
    total = sync._sum_over_batch(partial)
    np.testing.assert_array_equal(partial, np.arange(4.0))
    np.testing.assert_array_equal(total, 2 * np.arange(4.0))
    two_identical_ranks.clear()
    sync.eval()(x)  # eval: running statistics, nothing to meet over
    sync.backward(grad)
    assert two_identical_ranks == []


# -- DistributedSampler and split_batch ---------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 5, 10, 11, 64, 97])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_distributed_sampler_deals_out_indices_as_torch(torch, monkeypatch, size, replicas):
    from torch.utils.data import DistributedSampler as TorchSampler

    for shuffle in (False, True):
        for drop_last in (False, True):
            # Keywords: torch's argument names work here too.
            ours = [DistributedSampler(dataset=size, num_replicas=replicas, rank=rank,
                                       shuffle=shuffle, seed=3, drop_last=drop_last)
                    for rank in range(replicas)]
            # torch's own shuffle is torch.randperm: give it our permutation to compare the
            # padding, dropping and dealing out.
            monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.from_numpy(
                np.random.default_rng([3, 5]).permutation(n)))
            theirs = [TorchSampler(dataset=range(size), num_replicas=replicas, rank=rank,
                                   shuffle=shuffle, seed=3, drop_last=drop_last)
                      for rank in range(replicas)]
            for our, their in zip(ours, theirs, strict=True):
                our.set_epoch(5)
                their.set_epoch(5)
                assert len(our) == len(their)
                assert list(our) == list(their), (shuffle, drop_last)


def test_distributed_sampler_defaults_to_the_group(world_of_one):
    sampler = DistributedSampler(list(range(7)), shuffle=False)
    assert (sampler.num_replicas, sampler.rank, list(sampler)) == (1, 0, list(range(7)))
    with pytest.raises(ValueError, match=r"Invalid rank 2.*\[0, 1\]"):
        DistributedSampler(7, num_replicas=2, rank=2)
    sampler = DistributedSampler(10, num_replicas=2, rank=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) != first and list(sampler) != first


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_split_batch_parts_make_up_one_process_batches(world):
    sampler = BatchSampler(203, 64, shuffle=True, seed=1)
    for batch in sampler.epoch(2):
        parts = [split_batch(batch, rank, world) for rank in range(world)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)
        sizes = [len(part) for part in parts]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
        for part, expected in zip(parts, np.array_split(batch, world), strict=True):
            np.testing.assert_array_equal(part, expected)
    assert [len(split_batch(np.arange(64), rank, 3)) for rank in range(3)] == [22, 21, 21]
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\]"):
        split_batch(np.arange(4), 3, 3)


class _RequestDoneAfter:
    """A stand-in for an MPI request whose Test() succeeds from the given call on."""

    def __init__(self, calls: int) -> None:
        self.calls, self.left = 0, calls

    def Test(self) -> bool:  # mpi4py's name
        self.calls += 1
        return self.calls >= self.left


def test_a_short_wait_polls_and_a_long_one_sleeps(monkeypatch):
    """Waiting for another rank a few microseconds behind must not sleep (a sleep lasts ~60 us
    or more, a real cost once per training step); a wait past SPIN_SECONDS sleeps, so a rank
    waiting for a long time leaves its core free (test_ddp_mpi checks the CPU time)."""
    sleeps: list[float] = []
    monkeypatch.setattr(dist.time, "sleep", sleeps.append)
    dist._wait(_RequestDoneAfter(50))
    assert sleeps == []
    monkeypatch.setattr(dist, "SPIN_SECONDS", 0.0)
    request = _RequestDoneAfter(50)
    dist._wait(request)
    assert request.calls == 50 and len(sleeps) >= 45 and max(sleeps) <= 2e-3


# -- the launcher's stderr filter ------------------------------------------------------------

OPEN_MPI_BANNER = (
    b"-" * 74 + b"\n"
    b"prterun detected that one or more processes exited with non-zero status,\n"
    b"thus causing the job to be terminated. The first process to do so was:\n\n"
    b"   Process name: [prterun-vm-1953@1,0]\n   Exit code:    2\n" + b"-" * 74 + b"\n"
)
# What the ranks say around it: a progress bar redrawn with \r, a line that starts with a dash,
# a rule that starts another banner, and output with no final newline.
RANK_OUTPUT_BEFORE = (b"train epoch 1:  40%|####  | 4/10\rtrain epoch 1: 100%|#####| 10/10\n"
                      b"- a list item\n" + b"-" * 74 + b"\nMPI_ABORT was invoked on rank 1\n")
RANK_OUTPUT_AFTER = b"scratchcnn train: error: the data is truncated\n---\nno newline"


@given(cuts=st.lists(st.integers(0, len(RANK_OUTPUT_BEFORE + OPEN_MPI_BANNER
                                          + RANK_OUTPUT_AFTER)), max_size=12))
@settings(max_examples=200, deadline=None)
def test_the_launcher_drops_open_mpis_non_zero_exit_banner_and_nothing_else(cuts):
    stream = RANK_OUTPUT_BEFORE + OPEN_MPI_BANNER + RANK_OUTPUT_AFTER
    banner_filter = launch.NonZeroExitBannerFilter()
    bounds = [0, *sorted(cuts), len(stream)]
    passed = b"".join(banner_filter.feed(stream[start:end])
                      for start, end in itertools.pairwise(bounds))
    assert passed + banner_filter.close() == RANK_OUTPUT_BEFORE + RANK_OUTPUT_AFTER


def test_the_launcher_passes_a_progress_bar_on_before_its_line_ends():
    banner_filter = launch.NonZeroExitBannerFilter()
    assert banner_filter.feed(b"epoch 1:  40%|####") == b"epoch 1:  40%|####"
    assert banner_filter.feed(b"\repoch 1: 50%") == b"\repoch 1: 50%"
