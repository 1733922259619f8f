"""The NumPy side as N MPI ranks, the way PyTorch DDP runs: every rank runs the same command
(SPMD) on its part of each batch, and rank 0 alone runs the PyTorch side, prints and writes.

``compare``, ``bench``, ``train`` and ``accuracy`` call ``relaunch`` first: with N > 1 ranks
asked for (N is the thread count PyTorch gets: ``--threads``, else all cores) and no MPI job
around this process yet, the command re-runs itself as N ranks under ``mpiexec``
(``scratchcnn.distributed.launch``) and returns their exit code. Inside the job, ``start``
joins the process group. Everything else here is the few collective steps the harness needs,
written on ``scratchcnn.distributed``'s torch.distributed names; with one process each of them
is the plain single-process thing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

MPI_INSTALL = "pip install 'scratchcnn[mpi]'"


def under_mpiexec() -> bool:
    """Whether this process is a rank of an MPI job (started by us or by a user's mpiexec)."""
    from scratchcnn.distributed import launch

    return launch.launched_by_mpiexec()


def mpi_problem() -> str | None:
    """What is missing to start ranks (None: nothing): mpi4py, or the mpiexec program."""
    import scratchcnn.distributed as dist
    from scratchcnn.distributed import launch

    if not dist.is_available():
        return "mpi4py is not installed"
    if launch.find_mpiexec() is None:
        return "mpiexec is not found"
    return None


def relaunch(command: str, argv: list[str], ranks: int, explicit: bool,
             warn: Callable[[str], None] | None = None) -> int | None:
    """The exit code of this command re-run as ``ranks`` MPI ranks, or None: run it here, in
    this process (one rank, already inside an MPI job, or MPI missing and ``ranks`` only the
    default: then one line says so). MPI missing with ``ranks`` asked for (``explicit``) is a
    ValueError naming the fix."""
    if ranks <= 1 or under_mpiexec():
        return None
    problem = mpi_problem()
    if problem is not None:
        if explicit:
            raise ValueError(f"{ranks} threads run the NumPy side as {ranks} MPI ranks, but "
                             f"{problem}; install it with {MPI_INSTALL}, or use --threads 1")
        (warn or _stderr)(f"scratchcnn {command}: {problem}, so the NumPy side runs as one "
                          f"process ({MPI_INSTALL} runs it as {ranks} ranks)")
        return None
    from scratchcnn.distributed import launch

    return launch.run_under_mpiexec(ranks, argv)


def python_under_mpiexec(count: int, arguments: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run ``python -m <arguments>`` as ``count`` ranks the way
    ``relaunch`` runs a command (``launch.mpiexec_command``)."""
    from scratchcnn.distributed import launch

    module, *rest = arguments
    return launch.mpiexec_command(count, rest, module=module)


def helper_environment() -> dict[str, str]:
    """The environment for a helper process a rank starts (a memory probe): without what marks
    this process as a rank, so the helper does not try to join the job."""
    from scratchcnn.distributed import launch

    return launch.child_environment()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start(threads: int | None) -> int:
    """Join the process group when this process is a rank of an MPI job; returns the world
    size (1 outside one). ``threads`` given and different from an MPI job's size is a
    ValueError: the ranks are the threads."""
    import scratchcnn.distributed as dist

    if under_mpiexec() and not dist.is_initialized():
        dist.init_process_group(backend="mpi")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1 and threads is not None and threads != world:
        raise ValueError(f"--threads {threads} asks for {threads} ranks, but mpiexec started "
                         f"{world}; give --threads {world} or leave it out")
    return world


def rank() -> int:
    import scratchcnn.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import scratchcnn.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, the one that prints, writes and runs PyTorch (always true in one process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (politely: a waiting rank sleeps); nothing in one process."""
    if world_size() > 1:
        import scratchcnn.distributed as dist

        dist.barrier()


def sum_over_ranks(values: Any) -> np.ndarray:
    """The element-wise sum over the ranks of ``values`` (float64), on every rank."""
    array = np.array(values, dtype=np.float64, ndmin=1)
    if world_size() > 1:
        import scratchcnn.distributed as dist

        dist.all_reduce(array, op=dist.ReduceOp.SUM)
    return array


def broadcast_value(value: float) -> float:
    """Rank 0's ``value`` on every rank."""
    array = np.array([value], dtype=np.float64)
    if world_size() > 1:
        import scratchcnn.distributed as dist

        dist.broadcast(array, src=0)
    return float(array[0])


def main_first(work: Callable[[], T]) -> T:
    """``work()`` on rank 0, then on the other ranks once it has finished (a download done by
    rank 0 is then found on disk by the others). A failure on rank 0 still releases them."""
    if world_size() == 1:
        return work()
    if is_main():
        try:
            return work()
        finally:
            barrier()
    barrier()
    return work()


def only_main(work: Callable[[], T]) -> T | None:
    """``work()`` on rank 0 while the other ranks wait in a barrier; None on those ranks."""
    try:
        return work() if is_main() else None
    finally:
        barrier()


def on_main_with_threads(work: Callable[[], T], threads: int) -> T | None:
    """``only_main(work)`` with rank 0's BLAS at ``threads`` threads meanwhile (the cores the
    waiting ranks leave free: a matmul peak measured for the whole machine)."""
    if world_size() == 1:
        return work()

    def limited() -> T:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=threads, user_api="blas"):
            return work()

    return only_main(limited)


def local_part(indices: np.ndarray) -> np.ndarray:
    """This rank's part of a global batch of indices (the whole batch in one process)."""
    if world_size() == 1:
        return indices
    from scratchcnn.data import split_batch

    return split_batch(indices, rank(), world_size())


def distribute(model: Any, seed: int) -> Any:
    """``model`` ready for the ranks, as a PyTorch DDP user prepares one: BatchNorm layers
    swapped for SyncBatchNorm (so the ranks together normalise as one process would), wrapped
    in ``DistributedDataParallel`` (rank 0's weights, gradients averaged in backward), and each
    rank's Dropout drawing from its own stream (``seed_dropout``). ``model`` itself in one
    process."""
    if world_size() == 1:
        return model
    from scratchcnn import nn
    from scratchcnn.nn.parallel import DistributedDataParallel

    if any(isinstance(layer, nn.BatchNorm2d) for layer in model.modules()):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_dropout(model, [seed])
    return DistributedDataParallel(model)


def seed_dropout(model: Any, key: list[int]) -> None:
    """Give ``model``'s Dropout layers a generator seeded with ``key`` and this rank: with the
    same generator on every rank, ranks with equal shares would draw equal masks."""
    from scratchcnn import nn

    generator = np.random.default_rng([*key, rank()])
    for layer in model.modules():
        if isinstance(layer, nn.Dropout):
            layer.rng = generator


def is_distributed(model: Any) -> bool:
    """Whether ``model`` is trained by the ranks together (``distribute`` wrapped it); a plain
    model on one rank of a job runs alone."""
    if world_size() == 1:
        return False
    from scratchcnn.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def unwrapped(model: Any) -> Any:
    """The model inside a ``DistributedDataParallel`` (``module``), else ``model``."""
    return getattr(model, "module", model)


def contiguous_share(count: int) -> tuple[int, int]:
    """(first, end) of this rank's contiguous share of ``count`` items, the shares differing by
    at most one item (``np.array_split``'s)."""
    size, extra = divmod(count, world_size())
    here = rank()
    first = here * size + min(here, extra)
    return first, first + size + (here < extra)


def stop_group() -> None:
    import scratchcnn.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
