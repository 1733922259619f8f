"""The harness's allocator setting (harness/allocator.py) does what it is for."""

import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="the allocator setting is glibc's")


def fresh_python(script, **variables):
    """``script``'s output in a new interpreter, with no MALLOC_* or
    SCRATCHCNN_KEEP_FREED_MEMORY settings inherited, plus ``variables``."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MALLOC_") and key != "SCRATCHCNN_KEEP_FREED_MEMORY"}
    env.update(variables)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, check=True).stdout


@glibc_only
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """In a fresh process, allocating and freeing blocks of a few MB page-faults their memory in
    again and again; after keep_freed_memory() (glibc only) it is reused without faults."""
    script = """
import sys
import numpy as np
from scratchcnn.harness.allocator import allocator_setting, keep_freed_memory

def faults_while_reallocating():
    before = int(open("/proc/self/stat").read().split(")")[1].split()[7])
    for size in [4, 9, 2, 16, 6] * 6:  # MB, mixed so glibc's own threshold never settles
        block = np.empty(size * 2**18, dtype=np.float32)
        block.fill(1.0)
        del block
    return int(open("/proc/self/stat").read().split(")")[1].split()[7]) - before

default = faults_while_reallocating()
setting = keep_freed_memory()
faults_while_reallocating()  # the heap grows to the largest block once
print(default, faults_while_reallocating(), allocator_setting() == setting, setting)
"""
    output = fresh_python(script)
    default, kept, reported, setting = output.split(maxsplit=3)
    assert int(default) > 1000, output  # thousands of pages, faulted in again and again
    assert int(kept) < int(default) / 20
    assert reported == "True" and setting.startswith("glibc, blocks up to 32 MiB")


@glibc_only
@pytest.mark.parametrize("variable, applied", [(None, False), ("1", True), ("0", False)])
def test_apply_threads_keeps_freed_memory_only_when_asked(variable, applied):
    """Opt-in through SCRATCHCNN_KEEP_FREED_MEMORY=1: by default both frameworks run with the
    C library's allocator as shipped."""
    variables = {} if variable is None else {"SCRATCHCNN_KEEP_FREED_MEMORY": variable}
    script = ("from scratchcnn.harness.threads import apply_threads\n"
              "from scratchcnn.harness.allocator import allocator_setting\n"
              "apply_threads(1, torch=False)\n"
              "print(allocator_setting())\n")
    output = fresh_python(script, **variables)
    assert output.startswith("glibc, blocks up to") == applied, output
