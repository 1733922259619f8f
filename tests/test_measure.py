"""PeakMemory: the work's own allocations, plus what child processes add."""

import mmap
import multiprocessing
import sys
import time

import numpy as np
import pytest

from scratchcnn.harness.measure import PeakMemory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
MB = 2**20


def hold(ready, release, megabytes):
    """A forked child that writes ``megabytes`` of its own (0: only reads the parent's pages)."""
    data = np.ones(megabytes * MB // 8) if megabytes else None
    ready.set()
    release.wait(10)
    del data


def run_child(megabytes, shared):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    with PeakMemory() as peak:
        child = context.Process(target=hold, args=(ready, release, megabytes))
        child.start()
        ready.wait(10)
        shared.sum()  # the parent's own pages, touched by the parent only
        time.sleep(0.05)  # a few samples while the child holds its memory
        release.set()
        child.join()
    return peak


def test_counts_own_allocations():
    # A fresh private mapping, written: np.ones may reuse heap that earlier tests left resident,
    # which rightly adds nothing to the resident size.
    with PeakMemory() as peak:
        fresh = mmap.mmap(-1, 40 * MB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        np.frombuffer(fresh, dtype=np.uint8)[:] = 1
    assert 35 <= peak.mb <= 60


def test_adds_a_child_process_private_memory_but_not_pages_it_shares():
    shared = np.ones(40 * MB // 8)  # allocated before the window: baseline, shared with children
    writer = run_child(30, shared)
    assert 25 <= writer.mb <= 50, writer.mb
    assert "child processes" in writer.method
    reader = run_child(0, shared)
    assert reader.mb < 15, reader.mb


def test_children_alive_before_the_window_count_only_what_they_add():
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    bystander = context.Process(target=hold, args=(ready, release, 30))
    bystander.start()
    ready.wait(10)
    try:
        with PeakMemory() as peak:
            time.sleep(0.05)
    finally:
        release.set()
        bystander.join()
    assert peak.mb < 10, peak.mb
