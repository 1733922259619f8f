"""glibc's malloc asked to keep the memory it frees (opt-in), for both frameworks alike.

By default glibc serves large blocks (above 128 KB, a threshold that rises to at most 32 MB as
such blocks are freed) with fresh ``mmap``s, and gives freed memory at the top of its heap back
to the system. Either way, the next allocation page-faults its memory back in, at ~1.4 µs per
4 KB page on the development machine. How often depends on the process's history: a simple-cnn
training step at batch 64 took from a few to a few hundred faults a process (up to ~0.45 ms of a
~7 ms step; with MPI ranks, the slowest rank's faults delay every rank at the gradient
all-reduce). Serving blocks up to 32 MB from the heap and never trimming it brings that to ~0 in
every run. The price: memory freed stays with the process.

It is opt-in: ``SCRATCHCNN_KEEP_FREED_MEMORY=1`` makes ``apply_threads`` apply it, for NumPy
(every rank) and PyTorch alike (the memory probes keep the default, since keeping freed memory
raises the peak of whichever side fragments more). By default both frameworks run as their users
run them. The setting helps PyTorch more than NumPy: in paired bench runs its inference of
10,000 simple-cnn images took 0.52 s instead of 0.86 s, scratch-notebook-cnn's 0.09 s instead of
0.26 s, NumPy's unchanged. A user's own ``MALLOC_*`` settings are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems, and a trim threshold it never reaches.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**40

_state: str | None = None  # the description once decided


def keep_freed_memory() -> str:
    """Apply the setting (once per process) and describe what is in force, for reports."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def allocator_setting() -> str:
    """What is in force, for reports (without applying anything)."""
    return _state or "the C library's default (not changed)"


def _apply() -> str:
    if platform.libc_ver()[0] != "glibc":
        return "system default (not glibc)"
    if any(name.startswith("MALLOC_") for name in os.environ):
        return "glibc, as set by the MALLOC_* environment variables"
    mallopt = ctypes.CDLL(None).mallopt
    applied = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
               and mallopt(_M_TRIM_THRESHOLD, min(TRIM_THRESHOLD, 2**31 - 1)) == 1)
    if not applied:
        return "glibc default (mallopt refused)"
    return f"glibc, blocks up to {MMAP_THRESHOLD // 2**20} MiB from the heap, never trimmed"
