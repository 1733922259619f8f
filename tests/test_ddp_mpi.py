"""Data parallel training on real MPI ranks: N ranks (mpiexec) against one process.

Each test starts ``mpiexec`` with ``tests/mpi_scripts/ddp_worker.py``; the one-process reference
is the same training run here, on the whole batches, without DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from scratchcnn import nn
from scratchcnn.distributed import launch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or launch.find_mpiexec() is None,
    reason="needs mpi4py and mpiexec (pip install 'scratchcnn[mpi]')")

WORKER = Path(__file__).parent / "mpi_scripts" / "ddp_worker.py"
FAULT_WORKER = Path(__file__).parent / "mpi_scripts" / "fault_worker.py"
MODELS = ("simple-cnn", "bn-cnn")


def _worker_module():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _worker_module()


def run_ranks(ranks: int, *args: str, mca_tcp: bool = False, timeout: float = 120,
              script: Path = WORKER, marker: str | None = None
              ) -> tuple[subprocess.CompletedProcess, float, str]:
    """Run the worker (or ``script``) as ``ranks`` ranks; (result, seconds taken, the marker its
    command line carries, for pgrep)."""
    marker = marker or f"ddp-test-{uuid.uuid4().hex}"
    command, env = launch.mpiexec_command(ranks, [str(script), *args, marker], module=None)
    if mca_tcp:  # the transport between machines, here over 127.0.0.1
        command[1:1] = ["--mca", "btl", "tcp,self"]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
    return result, time.perf_counter() - start, marker


def leftover_processes(marker: str) -> str:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
    return found.stdout.strip()


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, np.ndarray]]:
    return {name: worker.train(name, distributed=False) for name in MODELS}


def trained(tmp_path: Path, ranks: int, mca_tcp: bool = False) -> dict[str, list[dict]]:
    result, _, marker = run_ranks(ranks, "train", str(tmp_path), ",".join(MODELS),
                                  mca_tcp=mca_tcp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not leftover_processes(marker)
    return {name: [dict(np.load(tmp_path / f"{name}-rank{rank}.npz")) for rank in range(ranks)]
            for name in MODELS}


def relative_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert got.keys() == want.keys()
    return max(float(np.max(np.abs(got[key] - want[key])) / max(np.max(np.abs(want[key])), 1e-300))
               for key in want)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_ranks_train_the_one_process_weights(tmp_path, reference, ranks):
    # float64, 8 Adam steps over batches 16, 16, 16, 7 split unevenly (3 ranks: 6/5/5, 3/2/2);
    # bn-cnn through SyncBatchNorm. The training moves weights by ~1e-2 (and the running
    # statistics by much more), so a wrong gradient weighting or unsynchronised statistics
    # would show as errors far above 1e-10.
    states = trained(tmp_path, ranks)
    for name in MODELS:
        first = states[name][0]
        assert relative_error(first, reference[name]) <= 1e-10, name
        assert relative_error(first, dict(worker.build_model(name, dtype=np.float64, rng=0)
                                          .state_dict())) > 1e-4  # it did train
        for other in states[name][1:]:  # every rank holds the very same weights
            assert all(np.array_equal(other[key], first[key]) for key in first), name


@pytest.mark.slow
def test_tcp_transport_gives_the_shared_memory_result(tmp_path, reference):
    (tmp_path / "tcp").mkdir()
    (tmp_path / "shm").mkdir()
    over_tcp = trained(tmp_path / "tcp", 2, mca_tcp=True)
    shared = trained(tmp_path / "shm", 2)
    for name in MODELS:
        assert relative_error(over_tcp[name][0], shared[name][0]) <= 1e-12
        assert relative_error(over_tcp[name][0], reference[name]) <= 1e-10


def test_sync_batchnorm_over_two_ranks_is_batchnorm_on_the_whole_batch(tmp_path):
    result, _, _ = run_ranks(2, "syncbn", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    data = worker.syncbn_data()
    want = worker.syncbn_step(nn.BatchNorm2d(4, dtype=np.float64), data["x"], data["grad"])
    parts = [dict(np.load(tmp_path / f"syncbn-rank{rank}.npz")) for rank in range(2)]
    assert [len(part["out"]) for part in parts] == [7, 6]
    for key in ("out", "grad_input"):
        np.testing.assert_allclose(np.concatenate([part[key] for part in parts]), want[key],
                                   rtol=0, atol=1e-10 * np.max(np.abs(want[key])))
    for key in ("weight_grad", "bias_grad"):  # each rank's own sums: together the whole's
        np.testing.assert_allclose(parts[0][key] + parts[1][key], want[key], rtol=1e-10)
        assert not np.allclose(parts[0][key], want[key], rtol=1e-3)
    for key in ("running_mean", "running_var"):
        np.testing.assert_array_equal(parts[0][key], parts[1][key])
        np.testing.assert_allclose(parts[0][key], want[key], rtol=1e-10)


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failing_rank_ends_the_whole_job(mode):
    # Rank 0 waits for rank 1 (in a barrier, or an all-reduce) that never comes: without the
    # abort on an uncaught exception, or with mpiexec ignoring a killed rank, the job would
    # hang until the worker's 60 s sleep and the 45 s timeout.
    result, seconds, marker = run_ranks(2, mode, timeout=45)
    assert result.returncode != 0
    assert seconds < 20
    if mode == "raise":
        assert "[rank 1] ValueError: rank 1 fails on purpose" in result.stderr
        assert "[rank 1] Traceback (most recent call last):" in result.stderr
    time.sleep(0.5)
    assert not leftover_processes(marker)


def ends_quickly_with(mode: str, error: str, returncode: int = 1
                      ) -> subprocess.CompletedProcess:
    """Run fault_worker.py's ``mode`` on 2 ranks: the job must end within seconds, with rank 1's
    ``error`` line and ``returncode``, leaving no process."""
    marker = f"ddp-test-{uuid.uuid4().hex}"
    try:
        result, seconds, _ = run_ranks(2, mode, timeout=30, script=FAULT_WORKER, marker=marker)
    except subprocess.TimeoutExpired:
        for pid in leftover_processes(marker).split():  # ranks orphaned by killing mpiexec
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        pytest.fail(f"{mode}: the job hung (killed after 30 s)")
    assert result.returncode == returncode, result.stderr[-3000:]
    assert seconds < 20
    assert error in result.stderr, result.stderr[-3000:]
    time.sleep(0.5)
    assert not leftover_processes(marker)
    return result


def test_a_rank_raising_through_try_finally_destroy_ends_the_job():
    # torch's idiom: destroy_process_group used to restore sys.excepthook, so rank 1 waited in
    # MPI_Finalize at exit and rank 0 in its all-reduce, forever.
    result = ends_quickly_with("finally", "[rank 1] RuntimeError: rank 1 fails inside try/finally")
    assert "[rank 1] Traceback (most recent call last):" in result.stderr


def test_init_process_group_refusing_one_rank_ends_the_job():
    # rank=0 on every rank: only rank 1's init_process_group raises, before it used to install
    # the abort, while rank 0 waits in its first all-reduce.
    ends_quickly_with("rank-argument", "[rank 1] ValueError: init_process_group: rank=0, but "
                                       "mpiexec made this process rank 1; leave rank out")


def test_destroy_then_init_again_and_a_failure_after_the_last_destroy():
    # The group comes back after destroy (MPI is not finalized by it), and the abort on an
    # uncaught exception outlives the last destroy (rank 0 sleeps 60 s otherwise).
    result = ends_quickly_with("reinit", "[rank 1] ValueError: rank 1 fails after "
                                         "destroy_process_group")
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0 round 0 sum 3", "rank 0 round 1 sum 5", "rank 1 round 0 sum 3",
        "rank 1 round 1 sum 5"]


def test_os_exit_of_one_rank_ends_the_job_with_its_code():
    # What the module's docstring advises instead of sys.exit(code) (which hangs: Python tells
    # no hook of a SystemExit, and MPI_Finalize at exit waits for every rank).
    ends_quickly_with("os-exit", "", returncode=3)


def test_collectives_on_three_ranks():
    result, _, _ = run_ranks(3, "collectives")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 3
    want = {"SUM": [6.0, 27.0], "PRODUCT": [6.0, 720.0], "MIN": [1.0, 8.0], "MAX": [3.0, 10.0],
            "AVG": [2.0, 9.0]}
    want.update({f"{name}-async": value for name, value in want.items()})
    want["broadcast"] = [1.0, 1.0, 1.0]
    for line in lines:
        assert json.loads(line.split(" ", 2)[2]) == want


def test_a_rank_waiting_in_barrier_leaves_the_core_free():
    # MPI's own blocking barrier would poll at 100% CPU: ~2 s of CPU for 2 s of waiting.
    result, _, _ = run_ranks(2, "barrier")
    assert result.returncode == 0, result.stderr[-3000:]
    waited, cpu = map(float, re.search(r"rank 1 waited ([\d.]+) s using ([\d.]+) s of CPU",
                                       result.stdout).groups())
    assert waited > 1.5 and cpu < 0.25 * waited


def test_run_under_mpiexec_returns_the_ranks_exit_code(capfd):
    # Each rank prints its rank, BLAS thread count and launch marker; rank 1 then fails.
    script = ("import os, sys, time; rank = os.environ['OMPI_COMM_WORLD_RANK']; "
              "print('rank', rank, os.environ['OPENBLAS_NUM_THREADS'], "
              f"os.environ['{launch.LAUNCH_MARKER}'], flush=True); time.sleep(0.3); "
              "rank == '1' and print('rank 1: error: fails on purpose', file=sys.stderr); "
              "sys.exit(3 if rank == '1' else 0)")
    assert launch.run_under_mpiexec(2, ["-c", script], module=None) == 3
    out, err = capfd.readouterr()
    assert "rank 0 1 1" in out and "rank 1 1 1" in out
    # The rank's own line, not Open MPI's banner about its exit status after it.
    assert "rank 1: error: fails on purpose\n" in err and "non-zero status" not in err, err


def test_one_process_run_of_the_worker_needs_no_mpiexec(tmp_path):
    # Not launched by mpiexec: a world of one, mpi4py never imported.
    result = subprocess.run([sys.executable, "-c", (
        "import sys, runpy; sys.argv = ['w', 'syncbn', sys.argv[1]];"
        f"runpy.run_path({str(WORKER)!r}, run_name='__main__');"
        "assert 'mpi4py' not in sys.modules"), str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(np.load(tmp_path / "syncbn-rank0.npz")["out"]) == 13


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_the_launcher_ends_every_rank(signum):
    # The launcher's process alone gets the signal (not the whole terminal's process group):
    # it must pass it on to mpiexec, or the ranks would sleep on for 100 s.
    marker = f"ddp-test-{uuid.uuid4().hex}"
    ranks_code = ("import time; from scratchcnn import distributed as dist; "
                  f"dist.init_process_group(); dist.barrier(); time.sleep(100)  # {marker}")
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from scratchcnn.distributed import launch; "
        f"sys.exit(launch.run_under_mpiexec(2, ['-c', {ranks_code!r}], module=None))")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    # Until the launcher, mpiexec and both ranks run (and the ranks wait in their barrier).
    while len(leftover_processes(marker).split()) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    start = time.perf_counter()
    launcher.send_signal(signum)
    code = launcher.wait(timeout=30)
    assert time.perf_counter() - start < 15
    assert code != 0 and (code == 130 or signum != signal.SIGINT)
    time.sleep(0.5)
    assert not leftover_processes(marker)
