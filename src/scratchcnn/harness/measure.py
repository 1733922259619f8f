"""Timing and peak-memory helpers (shared by ``compare`` and ``bench``).

Peak memory is measured the same way for every framework: the work runs in a fresh Python
subprocess, and we report the peak resident set size (Linux ``VmHWM``) during the work minus the
resident size just before it, after imports and data loading. Separate processes keep one side's
freed-but-retained heap from hiding the other's allocations. Work run as N MPI ranks (the NumPy
side with ranks) is measured in each rank the same way, and the figure is the sum of the ranks'
peaks, each taken at its own moment: an upper bound on their combined peak. Child processes the
work starts add the peak of their private memory (a forked child shares its parent's pages until
it writes to them, so its private pages are what it adds).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

_MB = 1024 * 1024
# How PeakMemory's method says it added child processes' memory, and a measurement the ranks'.
RANKS_METHOD = ", summed over {ranks} MPI ranks"
CHILDREN_METHOD = " + child processes' private memory sampled every 2 ms"


class Stopwatch:
    """``with Stopwatch() as watch: ...`` then ``watch.seconds`` (wall time, perf_counter)."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    """Resident set size now, in MiB (None where /proc is unavailable)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class _PeakSampler(threading.Thread):
    """The largest value ``read()`` (kB) takes from ``start()`` to ``stop()``, polled every
    2 ms; ``start_kb`` is its value when the sampler was made."""

    def __init__(self, read: Callable[[], int]) -> None:
        super().__init__(daemon=True)
        self._read = read
        self.start_kb = self.peak_kb = read()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.002):
            self.peak_kb = max(self.peak_kb, self._read())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak_kb, self._read())


def _rss_kb() -> int:
    return _status_kb("VmRSS") or 0


def _child_pids() -> list[int]:
    """This process's child processes (Linux; empty elsewhere)."""
    pids = []
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as children:
                pids += [int(pid) for pid in children.read().split()]
        except OSError:
            pass
    return pids


def _private_kb(pid: int) -> int:
    """Memory only process ``pid`` holds: Private_Clean + Private_Dirty (0 if it is gone)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total


def _children_private_kb() -> int:
    """The child processes' private memory, added up."""
    return sum(_private_kb(pid) for pid in _child_pids())


class PeakMemory:
    """``with PeakMemory() as peak: work()`` then ``peak.mb``: the peak RSS above the RSS at
    entry, in MiB, and ``peak.method`` saying how it was measured."""

    mb: float | None = None
    method: str = "unavailable"

    def __enter__(self) -> PeakMemory:
        self._baseline_kb = _status_kb("VmRSS")
        # When the kernel's peak mark cannot be reset, poll the resident size instead.
        self._sampler: _PeakSampler | None = None
        if self._baseline_kb is not None and not _reset_peak():
            self._sampler = _PeakSampler(_rss_kb)
            self._sampler.start()
        self._children = _PeakSampler(_children_private_kb)
        self._children.start()
        return self

    def __exit__(self, *exc: object) -> None:
        children_kb = self._children.stop() - self._children.start_kb
        if self._baseline_kb is None:
            return
        if self._sampler is not None:
            peak_kb, self.method = self._sampler.stop(), "VmRSS sampled every 2 ms"
        else:
            peak_kb, self.method = _status_kb("VmHWM") or 0, "VmHWM (peak RSS), reset at start"
        if children_kb:
            self.method += CHILDREN_METHOD
        self.mb = (max(peak_kb - self._baseline_kb, 0) + children_kb) / 1024


def adds_child_processes(method: str | None) -> bool:
    """Whether a peak measured by ``method`` adds several processes' own peaks (child processes,
    or MPI ranks), taken at their own moments: an upper bound on the combined peak."""
    return CHILDREN_METHOD in (method or "") or "MPI ranks" in (method or "")


ProbeFunction = Callable[[dict[str, Any], Callable[[], contextlib.AbstractContextManager]], Any]


def measure_in_subprocess(target: str, payload: dict[str, Any], *, timeout: float = 600.0,
                          ranks: int = 1) -> dict[str, Any]:
    """Run ``target`` ("package.module:function") in a fresh interpreter (``ranks`` > 1: as that
    many MPI ranks, each running it; their peaks are added up) and measure its memory.

    The function is called as ``function(payload, window)``: it does its setup (imports, loading
    data), then runs the work to be measured inside ``with window(): ...``. Returns
    ``{"peak_mb", "method", "result"}`` where ``result`` is the function's JSON-able return value.
    Raises RuntimeError with the child's stderr when it fails.
    """
    with tempfile.TemporaryDirectory(prefix="scratchcnn-probe-") as tmp:
        # A file rather than standard input: mpiexec hands that to rank 0 alone.
        payload_file = os.path.join(tmp, "payload.json")
        with open(payload_file, "w", encoding="utf-8") as file:
            json.dump(payload, file)
        arguments = ["scratchcnn.harness.measure", target, payload_file]
        if ranks > 1:
            from scratchcnn.harness.ranks import python_under_mpiexec

            command, env = python_under_mpiexec(ranks, arguments)
        else:
            from scratchcnn.harness.ranks import helper_environment

            command, env = [sys.executable, "-m", *arguments], helper_environment()
        env["PYTHONUNBUFFERED"] = "1"
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                   env=env, check=False, stdin=subprocess.DEVNULL)
    if completed.returncode != 0:
        raise RuntimeError(
            f"memory probe {target} failed (exit {completed.returncode}):\n"
            f"{completed.stderr.strip()[-2000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _child_main(target: str, payload_file: str) -> None:
    module_name, function_name = target.split(":")
    function: ProbeFunction = getattr(importlib.import_module(module_name), function_name)
    from scratchcnn.harness import ranks

    world = ranks.start(None)
    with open(payload_file, encoding="utf-8") as file:
        payload = json.load(file)
    windows: list[PeakMemory] = []

    @contextlib.contextmanager
    def window() -> Iterator[PeakMemory]:
        with PeakMemory() as peak:
            yield peak
        windows.append(peak)

    result = function(payload, window)
    if not windows:
        raise RuntimeError(f"{target} never opened its measurement window")
    peak = max(windows, key=lambda w: w.mb or 0.0)
    peak_mb, method = peak.mb, peak.method
    if world > 1:
        peak_mb = float(ranks.sum_over_ranks(peak_mb or 0.0)[0])
        method += RANKS_METHOD.format(ranks=world)
    if ranks.is_main():
        print(json.dumps({"peak_mb": peak_mb, "method": method, "result": result}))
    ranks.stop_group()


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
