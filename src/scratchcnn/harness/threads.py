"""Thread counts applied identically to both frameworks: NumPy's BLAS (through threadpoolctl) and
PyTorch's intra-op pool (``torch.set_num_threads``); with them, the same allocator setting
(``allocator.keep_freed_memory``)."""

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


def configured_threads() -> int:
    """The thread count the last ``apply_threads`` set, else all available cores (the default
    of both frameworks); the NumPy side splits batches across this many threads."""
    return available_cores() if _configured_threads is None else _configured_threads


def apply_threads(threads: int | None, *, torch: bool = True,
                  keep_memory: bool | None = None) -> int:
    """Limit BLAS (and PyTorch when ``torch`` is True) to ``threads`` threads; None means all
    available cores. Returns the number applied. With ``keep_memory`` (None: when the
    environment sets ``SCRATCHCNN_KEEP_FREED_MEMORY=1``), the allocator also keeps the memory it
    frees, for both frameworks (see allocator.py); by default each runs as its users run it."""
    if keep_memory is None:
        keep_memory = os.environ.get("SCRATCHCNN_KEEP_FREED_MEMORY", "").strip() == "1"
    if keep_memory:
        keep_freed_memory()
    if threads is None:
        threads = available_cores()
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    global _configured_threads
    _configured_threads = threads
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        # Without threadpoolctl, only newly started BLAS pools honour these variables.
        for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(threads)
    else:
        _active_limits.append(threadpool_limits(limits=threads))
    if torch:
        import torch as torch_module

        torch_module.set_num_threads(threads)
    return threads
