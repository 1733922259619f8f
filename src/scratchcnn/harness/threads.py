"""Thread counts for both frameworks: PyTorch's intra-op pool (``torch.set_num_threads``) and
NumPy's BLAS (through threadpoolctl); with them, the same allocator setting
(``allocator.keep_freed_memory``).

N threads means PyTorch with N threads against the NumPy side as N MPI ranks of one BLAS thread
each (``ranks.py``); in one process (N = 1, or MPI missing) NumPy's BLAS gets the N threads."""

from __future__ import annotations

import os
from typing import Any

from scratchcnn.harness.allocator import keep_freed_memory

# threadpoolctl limits stay in force while their controller object is alive.
_active_limits: list[Any] = []
_configured_threads: int | None = None  # the last apply_threads value


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and containers' cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_problem(threads: int) -> str | None:
    """What is wrong with ``threads`` as a thread count (None: nothing). More threads than
    cores is refused: torch's OpenMP pool crashes (segfault, or "Thread creation failed") at
    tens of thousands, and the NumPy side runs a rank per thread, so even a few times the
    cores makes training several times slower, never faster."""
    if threads < 1:
        return f"must be at least 1, got {threads}"
    cores = available_cores()
    if threads > cores:
        return (f"{threads} is more than the {cores} CPU core{'s' if cores != 1 else ''} "
                f"available; use at most {cores}")
    return None


def check_threads(threads: int, name: str = "--threads") -> int:
    """``threads`` if ``threads_problem`` finds nothing wrong, else ValueError naming ``name``
    (the option or variable it came from)."""
    problem = threads_problem(threads)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")
    return threads


def threads_from_environment(variable: str = "SCRATCHCNN_NUM_THREADS") -> int | None:
    """The thread count set in the environment ``variable``, checked (ValueError naming the
    variable), or None when it is unset or empty."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"{variable} must be a positive integer, got {text!r}")
    return check_threads(int(text), variable)


def configured_threads() -> int:
    """The thread count the last ``apply_threads`` set, else all available cores (the default
    of both frameworks)."""
    return available_cores() if _configured_threads is None else _configured_threads


def apply_threads(threads: int | None, *, torch: bool = True,
                  keep_memory: bool | None = None, blas: int | None = None) -> int:
    """Limit BLAS (and PyTorch when ``torch`` is True) to ``threads`` threads; None means all
    available cores, and more than that is a ValueError (see ``threads_problem``). ``blas``
    gives NumPy's BLAS another count (an MPI rank's one thread). Returns ``threads``. With
    ``keep_memory`` (None: when the environment sets ``SCRATCHCNN_KEEP_FREED_MEMORY=1``), the
    allocator also keeps the memory it frees, for both frameworks (see allocator.py); by default
    each runs as its users run it."""
    if keep_memory is None:
        keep_memory = os.environ.get("SCRATCHCNN_KEEP_FREED_MEMORY", "").strip() == "1"
    if keep_memory:
        keep_freed_memory()
    threads = available_cores() if threads is None else check_threads(threads)
    blas = threads if blas is None else blas
    global _configured_threads
    _configured_threads = threads
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        # NumPy's BLAS pool has started: only threadpoolctl can resize it. All cores is what it
        # runs anyway; anything else would be reported but not applied (an MPI rank's BLAS is
        # pinned to one thread by its environment before it starts).
        if blas != available_cores() and os.environ.get("OPENBLAS_NUM_THREADS") != str(blas):
            raise ValueError(f"cannot limit NumPy to {blas} thread(s): threadpoolctl is not "
                             "installed; pip install threadpoolctl, or use all cores") from None
    else:
        _active_limits.append(threadpool_limits(limits=blas, user_api="blas"))
    if torch:
        import torch as torch_module

        torch_module.set_num_threads(threads)
    return threads
