"""What the environment says about MPI, read without importing mpi4py (which starts MPI)."""

from __future__ import annotations

import os

MPI_INSTALL = "pip install 'scratchcnn[mpi]'"

# Set by scratchcnn's launcher (``launch.run_under_mpiexec``) in the ranks it starts.
LAUNCH_MARKER = "SCRATCHCNN_LAUNCHED_BY_MPIEXEC"

# Set by mpiexec in every rank it starts: Open MPI (and PMIx-based launchers), MPICH and Intel MPI
# (Hydra's PMI). Each names a rank or a job size; none is set in an ordinary process.
MPIEXEC_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE")


def launched_by_mpiexec() -> bool:
    """Whether this process is a rank started by mpiexec (ours or a user's), from its
    environment alone, so it is safe to call before importing mpi4py."""
    return os.environ.get(LAUNCH_MARKER) == "1" or any(
        os.environ.get(name) for name in MPIEXEC_VARIABLES)


def launched_by_scratchcnn() -> bool:
    """Whether this rank was started by ``launch.run_under_mpiexec`` (a CLI command re-run as
    ranks), not by a user's own mpiexec."""
    return os.environ.get(LAUNCH_MARKER) == "1"


# Set by torchrun (torch.distributed.run) in each process it starts, and by launchers built like it
# (torch.distributed.launch, accelerate, deepspeed): the job's size, which mpiexec does not set.
FOREIGN_WORLD_SIZE = "WORLD_SIZE"


def foreign_world_size() -> int | None:
    """The job size a non-MPI launcher such as torchrun gave this process (``WORLD_SIZE``), if
    it says more than one process; None otherwise (unset, 1 or not a number)."""
    try:
        size = int(os.environ.get(FOREIGN_WORLD_SIZE, ""))
    except ValueError:
        return None
    return size if size > 1 else None
