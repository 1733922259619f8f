"""Ranks that fail in the ways ported torch scripts do (``mpiexec -n 2 python fault_worker.py MODE
MARKER``); the job must end within seconds with the failing rank's error. The last argument is a
marker the tests look for with pgrep.

Modes: ``finally`` (rank 1 raises inside ``try: ... finally: destroy_process_group()`` while
rank 0 waits in an all-reduce), ``rank-argument`` (every rank passes ``rank=0``, as a script
reading torchrun's RANK with a default of 0 does: rank 1's init_process_group raises while rank 0
goes on to an all-reduce), ``reinit`` (init, all-reduce, destroy, twice; then rank 1 raises while
rank 0 waits, after the last destroy), ``os-exit`` (rank 1 leaves with ``os._exit(3)``, as the
distributed module's docstring advises instead of ``sys.exit(3)``, while rank 0 waits).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from scratchcnn import distributed as dist


def wait_for_rank_1() -> None:
    dist.all_reduce(np.zeros(3))  # rank 1 never comes
    time.sleep(60)  # never reached in a working job: the test would time out


def main() -> None:
    mode = sys.argv[1]
    if mode == "finally":
        dist.init_process_group(backend="mpi")
        try:
            if dist.get_rank() == 1:
                time.sleep(0.5)  # rank 0 is waiting by then
                raise RuntimeError("rank 1 fails inside try/finally")
            wait_for_rank_1()
        finally:
            dist.destroy_process_group()
    elif mode == "rank-argument":
        if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
            time.sleep(0.5)
        dist.init_process_group(backend="mpi", rank=int(os.environ.get("RANK", 0)))
        wait_for_rank_1()
    elif mode == "reinit":
        for round_ in range(2):
            dist.init_process_group()
            rank = dist.get_rank()
            array = np.full(2, rank + 1.0 + round_)
            dist.all_reduce(array)
            print(f"rank {rank} round {round_} sum {array[0]:g}", flush=True)
            dist.destroy_process_group()
        if rank == 1:
            time.sleep(0.5)
            raise ValueError("rank 1 fails after destroy_process_group")
        time.sleep(60)  # a rank still running: the abort must end it
    elif mode == "os-exit":
        dist.init_process_group()
        if dist.get_rank() == 1:
            time.sleep(0.5)
            os._exit(3)
        wait_for_rank_1()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
