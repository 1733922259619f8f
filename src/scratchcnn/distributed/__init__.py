"""``torch.distributed``'s names on MPI (mpi4py): ranks, all-reduce, broadcast, barrier.

The model of parallelism is SPMD, as in PyTorch DDP and Horovod: ``mpiexec -n N python train.py``
starts N copies of one ordinary training script (the *ranks*, numbered 0 .. N-1); each calls
``init_process_group()``, trains on its part of every batch, and the ranks meet only in
collectives such as ``all_reduce`` (every rank ends with the element-wise sum of every rank's
array). ``nn.parallel.DistributedDataParallel`` and ``nn.SyncBatchNorm`` are built on these.

A process that mpiexec did not start is a world of one (rank 0, size 1): it never imports mpi4py,
needs no MPI installed, and every collective leaves its array as it is. So one script runs both
ways, ``python train.py`` and ``mpiexec -n 2 python train.py``.

Collectives work in place on C-contiguous NumPy arrays, which every rank passes with the same
shape and dtype, in the same order (MPI matches calls by order, not by name).

How a job ends when one rank fails (the others may be waiting for it in a collective):

* an uncaught exception, also one raised by ``init_process_group`` itself or still propagating
  after ``destroy_process_group`` (``try: train() finally: destroy_process_group()``): the rank
  prints its traceback and aborts the whole job (``MPI_Abort``), see ``init_process_group``;
* a rank killed by a signal (SIGKILL included): mpiexec sees it die and ends the job;
* ``sys.exit(code)`` (or ``raise SystemExit(code)``) with a non-zero code while other ranks still
  run: NOT handled, the job hangs. Python gives ``sys.excepthook`` no SystemExit, and tells no
  exit handler the exit status; at exit mpi4py calls ``MPI_Finalize``, which waits for every
  rank, and the ranks waiting in a collective wait for this one forever. Leave a failing rank
  with an exception instead, or with ``os._exit(code)`` (after flushing your files), which skips
  ``MPI_Finalize``: mpiexec then sees the non-zero exit and ends the job.

Launched by torchrun (``WORLD_SIZE`` > 1 but not mpiexec), ``init_process_group`` refuses to
start, naming ``mpiexec -n N python script.py``: each process would otherwise train alone.
"""

from __future__ import annotations

import enum
import sys
import time
import traceback
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from scratchcnn.distributed._environment import (
    FOREIGN_WORLD_SIZE,
    MPI_INSTALL,
    foreign_world_size,
    launched_by_mpiexec,
)

__all__ = [
    "ReduceOp",
    "Work",
    "all_reduce",
    "barrier",
    "broadcast",
    "destroy_process_group",
    "get_rank",
    "get_world_size",
    "init_process_group",
    "is_available",
    "is_initialized",
    "launched_by_mpiexec",
]


class ReduceOp(enum.Enum):
    """How ``all_reduce`` combines the ranks' arrays, element by element (torch's names).
    AVG is the SUM divided by the world size (floating arrays only)."""

    SUM = "sum"
    PRODUCT = "product"
    MIN = "min"
    MAX = "max"
    AVG = "avg"


@dataclass
class _ProcessGroup:
    """The default (and only) group: every rank of the job. ``comm`` is mpi4py's
    ``MPI.COMM_WORLD``, or None in a world of one (no MPI at all)."""

    comm: Any
    rank: int
    size: int
    blas_limits: Any = None  # threadpoolctl's limiter, undone by destroy_process_group


_group: _ProcessGroup | None = None
# sys.excepthook before _abort_job_on_exception replaced it (which then stays until exit), and
# whether the last init_process_group asked for the abort.
_previous_excepthook: Any = None
_abort_enabled = False


def is_available() -> bool:
    """Whether mpi4py can be found (it is not imported: importing it starts MPI)."""
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def is_initialized() -> bool:
    """Whether ``init_process_group`` has run (and ``destroy_process_group`` not since)."""
    return _group is not None


def init_process_group(
    backend: str | None = None,
    init_method: str | None = None,
    timeout: Any = None,
    world_size: int = -1,
    rank: int = -1,
    *,
    blas_threads: int | None = 1,
    abort_on_exception: bool = True,
) -> None:
    """Join the job's process group, as ``torch.distributed.init_process_group``.

    The ranks and the world size come from mpiexec; ``world_size`` and ``rank``, if given, must
    agree with them. ``backend`` must be "mpi" (or None); ``init_method`` None or "env://" (the
    rendezvous is mpiexec's); ``timeout`` is accepted for torch's signature and ignored (MPI
    collectives have none: a stuck job is ended by the fault handling below instead).

    With more than one rank:

    * ``blas_threads`` (default 1): this rank's BLAS and OpenMP thread pools are limited to that
      many threads (threadpoolctl), since N ranks x several BLAS threads on N cores thrash;
      None leaves them alone. ``destroy_process_group`` restores them.
    * ``abort_on_exception`` (default True): an uncaught exception in this rank prints its
      traceback, each line prefixed ``[rank r]``, and aborts the whole job (``MPI_Abort``), so
      that the other ranks do not wait forever in their next collective. The hook is installed
      before this function checks its arguments (a ``rank`` that is wrong on one rank only
      ends the job too) and stays installed until the process exits, also after
      ``destroy_process_group``: an exception still propagating through ``try: ... finally:
      destroy_process_group()`` would otherwise leave this rank waiting in ``MPI_Finalize``
      and the others in their collective, forever. (A rank killed by a signal ends the job
      too: mpiexec sees it die. ``sys.exit(code)`` does not: see the module's docstring.)

    Outside mpiexec this process is the whole world (rank 0 of 1) and mpi4py is not imported;
    but with torchrun's ``WORLD_SIZE`` > 1 set, a RuntimeError says to launch with mpiexec.
    Launched by mpiexec without a working mpi4py: a RuntimeError naming the fix.
    """
    global _group
    if _group is not None:
        raise RuntimeError("trying to initialize the default process group twice!")
    if backend is not None and str(backend).lower() != "mpi":
        raise ValueError(f"backend {backend!r} is not supported: scratchcnn.distributed runs "
                         "on MPI only (backend='mpi')")
    if init_method not in (None, "env://"):
        raise ValueError(f"init_method {init_method!r} is not supported: the ranks find each "
                         "other through mpiexec (leave init_method out)")
    if not launched_by_mpiexec():
        others = foreign_world_size()
        if others is not None:
            raise RuntimeError(
                f"init_process_group: {FOREIGN_WORLD_SIZE}={others} (torchrun's) is set, but "
                f"this process was not started by mpiexec, so it would train alone as rank 0 "
                f"of 1; launch with `mpiexec -n {others} python script.py` instead of torchrun")
        group = _ProcessGroup(comm=None, rank=0, size=1)
    else:
        mpi = _import_mpi()
        comm = mpi.COMM_WORLD
        group = _ProcessGroup(comm=comm, rank=comm.Get_rank(), size=comm.Get_size())
    if group.size > 1:
        # Before the checks below, whose errors may differ between ranks: a rank that raises
        # here while the others go on to their first collective must end the job too.
        _install_abort_hook(abort_on_exception)
    for name, given, actual in (("world_size", world_size, group.size),
                                ("rank", rank, group.rank)):
        if given != -1 and given != actual:
            raise ValueError(f"init_process_group: {name}={given}, but mpiexec made this "
                             f"process {name} {actual}; leave {name} out")
    if group.size > 1 and blas_threads is not None:
        from threadpoolctl import threadpool_limits

        group.blas_limits = threadpool_limits(limits=blas_threads)
    _group = group


def _install_abort_hook(enabled: bool) -> None:
    """Make ``_abort_job_on_exception`` this process's ``sys.excepthook`` (once: it stays until
    exit), aborting the job or not as ``enabled`` says."""
    global _previous_excepthook, _abort_enabled
    _abort_enabled = enabled
    if enabled and sys.excepthook is not _abort_job_on_exception:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _abort_job_on_exception


def _import_mpi() -> Any:
    """mpi4py's MPI module (importing it initialises MPI), or a one-line RuntimeError."""
    try:
        from mpi4py import MPI
    except Exception as error:  # ImportError, or a broken MPI library (OSError, RuntimeError)
        raise RuntimeError(
            f"this process was started by mpiexec, but mpi4py cannot be loaded "
            f"({type(error).__name__}: {error}); install it with {MPI_INSTALL}"
        ) from None
    return MPI


def _abort_job_on_exception(kind: type[BaseException], error: BaseException,
                            trace: TracebackType | None) -> None:
    """``sys.excepthook`` of a rank: its traceback, each line prefixed with the rank, then
    ``MPI_Abort``, which makes mpiexec end every rank (the others may be waiting for this one
    in a collective, and would wait forever). Whether or not the process group is still
    initialized; but only while MPI runs (initialized, not finalized) with more than one rank,
    and the last ``init_process_group`` asked for it: else the hook it replaced runs."""
    comm = _running_world()
    if comm is None or not _abort_enabled:
        (_previous_excepthook or sys.__excepthook__)(kind, error, trace)
        return
    prefix = f"[rank {comm.Get_rank()}] "
    if issubclass(kind, KeyboardInterrupt):
        lines = ["interrupted\n"]  # Ctrl-C reaches every rank: N tracebacks would say nothing
    else:
        lines = traceback.format_exception(kind, error, trace)
    text = "".join(lines)
    sys.stderr.write("".join(prefix + line for line in text.splitlines(keepends=True)))
    sys.stderr.flush()
    sys.stdout.flush()
    comm.Abort(1)


def _running_world() -> Any:
    """mpi4py's ``COMM_WORLD`` if MPI is initialized, not yet finalized, and has more than one
    rank; else None (mpi4py is not imported here if it was not already)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    return mpi.COMM_WORLD if mpi.COMM_WORLD.Get_size() > 1 else None


def _require_group(caller: str) -> _ProcessGroup:
    if _group is None:
        raise RuntimeError(f"{caller}: the default process group has not been initialized; "
                           "call scratchcnn.distributed.init_process_group() first")
    return _group


def get_rank() -> int:
    """This process's rank, 0 .. world size - 1."""
    return _require_group("get_rank").rank


def get_world_size() -> int:
    """The number of ranks in the job (1 outside mpiexec)."""
    return _require_group("get_world_size").size


def _check_array(array: Any, caller: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{caller}: expected a NumPy array (changed in place), got "
                        f"{type(array).__name__}")
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError(f"{caller}: the array must be C-contiguous and writeable (it is "
                         "changed in place); pass np.ascontiguousarray(a) and copy the result "
                         "back")
    return array


# How long a wait polls before it starts sleeping. In a training step a rank waits for the others
# by their jitter, a fraction of a millisecond: polled, it resumes at once, where the sleeps
# below (time.sleep(1e-5) takes ~60 us) cost DistributedDataParallel's wait for the batch size
# 0.2-0.3 ms a step on 2 ranks, ~4% of a simple-cnn step. Waits longer than this sleep.
SPIN_SECONDS = 2e-3


def _wait(request: Any) -> None:
    """``request.Wait()`` without holding a core for long: MPI's blocking waits poll a core at
    100%, which a rank waiting for rank 0 (running PyTorch on every core, say) would take from
    it. Poll for up to ``SPIN_SECONDS``, then Test and sleep a little longer each time, up to
    2 ms."""
    deadline = time.perf_counter() + SPIN_SECONDS
    while not request.Test():
        if time.perf_counter() > deadline:
            break
    else:
        return
    pause = 0.0
    while not request.Test():
        time.sleep(pause)
        pause = min(2 * pause + 1e-5, 2e-3)


class Work:
    """A collective started with ``async_op=True`` (torch's name): ``wait()`` blocks until it
    is done (sleeping, not polling a core), ``is_completed()`` asks without blocking."""

    def __init__(self, request: Any = None, finish: Any = None) -> None:
        self._request, self._finish = request, finish

    def is_completed(self) -> bool:
        if self._request is not None and not self._request.Test():
            return False
        self._complete()
        return True

    def wait(self) -> bool:
        if self._request is not None:
            _wait(self._request)
        self._complete()
        return True

    def _complete(self) -> None:
        self._request = None
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()


def all_reduce(array: np.ndarray, op: ReduceOp = ReduceOp.SUM, group: None = None,
               async_op: bool = False) -> Work | None:
    """Combine ``array`` over the ranks with ``op``, in place: afterwards every rank holds the
    same result (for SUM: the element-wise sum of every rank's array). A world of one leaves it
    unchanged. ``group`` must be None (only the default group exists).

    ``async_op=True`` returns at once with a ``Work``: the array holds the result once its
    ``wait()`` has returned (do not touch the array before), and work may go on meanwhile."""
    group_ = _require_group("all_reduce")
    _check_array(array, "all_reduce")
    _check_group_argument(group, "all_reduce")
    if not isinstance(op, ReduceOp):
        raise TypeError(f"all_reduce: op must be a ReduceOp (e.g. ReduceOp.SUM), got {op!r}")
    if op is ReduceOp.AVG and array.dtype.kind != "f":
        raise TypeError(f"all_reduce: ReduceOp.AVG needs a floating array, got {array.dtype}")
    if group_.size == 1:
        return Work() if async_op else None
    from mpi4py import MPI

    mpi_op = {ReduceOp.SUM: MPI.SUM, ReduceOp.AVG: MPI.SUM, ReduceOp.PRODUCT: MPI.PROD,
              ReduceOp.MIN: MPI.MIN, ReduceOp.MAX: MPI.MAX}[op]

    def finish() -> None:
        if op is ReduceOp.AVG:
            np.divide(array, group_.size, out=array)

    if async_op:
        return Work(group_.comm.Iallreduce(MPI.IN_PLACE, array, op=mpi_op), finish)
    # Blocking: in training the ranks arrive together, and Open MPI's blocking all-reduce is
    # twice as fast as its non-blocking one for a simple-cnn gradient (see nn/parallel.py).
    group_.comm.Allreduce(MPI.IN_PLACE, array, op=mpi_op)
    finish()
    return None


def broadcast(array: np.ndarray, src: int = 0, group: None = None) -> None:
    """Overwrite ``array`` on every rank with rank ``src``'s, in place (a waiting rank sleeps
    rather than polling a core)."""
    group_ = _require_group("broadcast")
    _check_array(array, "broadcast")
    _check_group_argument(group, "broadcast")
    if isinstance(src, bool) or not isinstance(src, (int, np.integer)) or not (
            0 <= src < group_.size):
        raise ValueError(f"broadcast: src must be a rank in [0, {group_.size - 1}], got {src!r}")
    if group_.size > 1:
        _wait(group_.comm.Ibcast(array, root=int(src)))


def barrier(group: None = None) -> None:
    """Wait until every rank has called ``barrier`` (a waiting rank sleeps rather than polling
    a core). Nothing to wait for in a world of one."""
    group_ = _require_group("barrier")
    _check_group_argument(group, "barrier")
    if group_.size > 1:
        _wait(group_.comm.Ibarrier())


def _check_group_argument(group: Any, caller: str) -> None:
    if group is not None:
        raise ValueError(f"{caller}: only the default group exists here; leave group out")


def destroy_process_group(group: None = None) -> None:
    """Leave the process group (torch's name): BLAS threads are restored. Nothing here talks to
    the other ranks, and MPI itself stays up (it cannot start twice in one process; mpi4py
    finalizes it at exit), so ``init_process_group`` may run again. The abort on an uncaught
    exception stays installed (see ``init_process_group``)."""
    global _group
    _check_group_argument(group, "destroy_process_group")
    group_ = _require_group("destroy_process_group")
    if group_.blas_limits is not None:
        group_.blas_limits.restore_original_limits()
    _group = None
