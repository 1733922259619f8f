"""What the numbers were measured on: versions, BLAS, CPU model and thread counts."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from scratchcnn.harness.allocator import allocator_setting
from scratchcnn.harness.threads import available_cores


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def blas_info() -> dict[str, Any]:
    """NumPy's BLAS library: from threadpoolctl when installed (library, version, threads, file),
    else from ``np.show_config``'s build information."""
    try:
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            if pool.get("user_api") == "blas":
                return {
                    "library": pool.get("internal_api"),
                    "version": pool.get("version"),
                    "threads": pool.get("num_threads"),
                    "architecture": pool.get("architecture"),
                    "file": pool.get("filepath"),
                }
    except ImportError:
        pass
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return {"library": blas.get("name"), "version": blas.get("version"), "threads": None}
    except (TypeError, KeyError, ValueError):
        return {"library": "unknown", "version": None, "threads": None}


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the system has none."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def describe_environment(threads: int | None = None) -> dict[str, Any]:
    """Versions, BLAS, CPU and threads. torch is reported as None when it isn't installed; it is
    only imported here if something else imported it already (its version comes from metadata)."""
    torch_version: str | None = None
    torch_threads: int | None = None
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch_version, torch_threads = torch.__version__, torch.get_num_threads()
    else:
        with contextlib.suppress(PackageNotFoundError):
            torch_version = version("torch")
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch_version,
        "blas": blas_info(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "available_cores": available_cores(),
        "threads": threads if threads is not None else available_cores(),
        "torch_threads": torch_threads,
        "allocator": allocator_setting(),
        "platform": platform.platform(),
    }
