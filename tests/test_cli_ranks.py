"""The CLI's NumPy side as MPI ranks: ``train`` and ``compare`` with ``--threads 2`` re-run
themselves as 2 ranks under mpiexec; the results equal one process's (float64, a model without
Dropout), rank 0 alone prints and writes, a checkpoint records its rank count, a resume with the
same count is bit-identical, and missing MPI is a warning (default) or an error (asked for)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scratchcnn.cli import main
from scratchcnn.formats.checkpoint import load_checkpoint
from scratchcnn.harness import ranks, threads

pytestmark = pytest.mark.skipif(
    ranks.mpi_problem() is not None or threads.available_cores() < 2,
    reason="needs mpi4py, mpiexec and 2 cores",
)

TINY = ["--dataset", "mnist-sample", "--limit-train", "150", "--limit-test", "70",
        "--batch-size", "25", "--dtype", "float64", "--no-progress"]


def scratchcnn(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m scratchcnn *argv`` as a user runs it (a fresh process, not inside pytest's)."""
    return subprocess.run([sys.executable, "-m", "scratchcnn", *argv], capture_output=True,
                          text=True, timeout=300, env=env, check=False)


def weights(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files if k != "__metadata__"}


def test_train_as_two_ranks_equals_one_process_and_rank_0_alone_writes(tmp_path):
    two = scratchcnn("train", "--out", str(tmp_path / "two"), *TINY, "--epochs", "2",
                     "--optimizer", "adam", "--lr", "0.002", "--threads", "2")
    assert two.returncode == 0, two.stderr
    # One rank printed: each epoch line once.
    assert two.stdout.count("epoch 2/2:") == 1, two.stdout
    assert two.stdout.count("training simple-cnn") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["best.npz", "last.npz"]
    assert load_checkpoint(tmp_path / "two" / "last.npz").metadata["ranks"] == 2

    assert main(["train", "--out", str(tmp_path / "one"), *TINY, "--epochs", "2",
                 "--optimizer", "adam", "--lr", "0.002", "--threads", "1"]) == 0
    assert load_checkpoint(tmp_path / "one" / "last.npz").metadata["ranks"] == 1
    one, two_w = weights(tmp_path / "one" / "last.npz"), weights(tmp_path / "two" / "last.npz")
    for key in one:
        if key.startswith("model/"):
            np.testing.assert_allclose(two_w[key], one[key], rtol=1e-9, atol=1e-12, err_msg=key)
    history = [load_checkpoint(tmp_path / run / "last.npz").metadata["history"]
               for run in ("one", "two")]
    for a, b in zip(*history, strict=True):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)


def test_resume_with_the_same_ranks_is_bit_identical_and_another_count_says_so(tmp_path):
    options = [*TINY, "--model", "bn-cnn", "--optimizer", "adam", "--lr", "0.002",
               "--limit-train", "60", "--limit-test", "20", "--threads", "2"]
    straight = scratchcnn("train", "--out", str(tmp_path / "straight"), *options,
                          "--epochs", "2")
    assert straight.returncode == 0, straight.stderr
    first = scratchcnn("train", "--out", str(tmp_path / "resumed"), *options, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    last = tmp_path / "resumed" / "last.npz"
    resumed = scratchcnn("train", "--resume", str(last), "--epochs", "2", "--threads", "2",
                         "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "note:" not in resumed.stdout
    expected, got = weights(tmp_path / "straight" / "last.npz"), weights(last)
    assert expected.keys() == got.keys()
    for key in expected:  # BatchNorm synchronised, Dropout per (seed, epoch, rank): exact
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)

    # The epoch-1 checkpoint continued by one process: it runs, and says it is not the same.
    other = tmp_path / "other"
    other.mkdir()
    copy = other / "last.npz"
    copy.write_bytes((tmp_path / "straight" / "best.npz").read_bytes())
    epoch = load_checkpoint(copy).epoch
    code = scratchcnn("train", "--resume", str(copy), "--epochs", str(epoch + 1),
                      "--threads", "1", "--no-progress")
    assert code.returncode == 0, code.stderr
    notes = [line for line in code.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "2 rank(s)" in notes[0] and "uses 1" in notes[0], code.stdout
    assert load_checkpoint(copy).metadata["ranks"] == 1


def test_compare_as_two_ranks_writes_one_report_equal_to_torch(tmp_path):
    out = tmp_path / "compare"
    done = scratchcnn("compare", "--dataset", "mnist-sample", "--limit-train", "128",
                      "--limit-test", "64", "--epochs", "1", "--batch-size", "32",
                      "--dtype", "float64", "--no-plots", "--no-memory", "--quiet",
                      "--threads", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("| Test accuracy |") == 1, done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["numpy-model.npz", "report.json",
                                                      "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["ranks"] == 2 and report["config"]["threads"] == 2
    numpy_side, torch_side = report["frameworks"]["numpy"], report["frameworks"]["torch"]
    # float64, same weights and batches: the NumPy ranks together train as PyTorch does.
    np.testing.assert_allclose(numpy_side["step_losses"], torch_side["step_losses"], rtol=1e-8)
    assert numpy_side["test_accuracy"] == torch_side["test_accuracy"]
    assert any("2 MPI ranks" in note for note in report["notes"])


def test_a_users_own_mpiexec_works(tmp_path):
    from scratchcnn.distributed import launch
    from scratchcnn.distributed._environment import LAUNCH_MARKER

    command, env = launch.mpiexec_command(
        2, ["train", "--out", str(tmp_path), *TINY, "--epochs", "1"])
    env.pop(LAUNCH_MARKER)  # as a user's plain mpiexec starts it
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("epoch 1/1:") == 1
    assert load_checkpoint(tmp_path / "last.npz").metadata["ranks"] == 2


def test_missing_mpi_warns_for_the_default_and_refuses_an_explicit_count(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ranks, "mpi_problem", lambda: "mpi4py is not installed")
    assert main(["train", "--out", str(tmp_path / "asked"), *TINY, "--threads", "2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "mpi4py is not installed" in error[0] and "pip install 'scratchcnn[mpi]'" in error[0]
    assert not (tmp_path / "asked").exists()

    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert main(["train", "--out", str(tmp_path / "default"), *TINY]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "mpi4py" in line]
    assert len(warnings) == 1 and "runs as one process" in warnings[0]
    assert load_checkpoint(tmp_path / "default" / "last.npz").metadata["ranks"] == 1


def test_threads_that_contradict_the_mpi_job_are_refused(tmp_path):
    from scratchcnn.distributed import launch

    command, env = launch.mpiexec_command(
        2, ["train", "--out", str(tmp_path), *TINY, "--epochs", "1", "--threads", "1"])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode != 0
    assert "--threads 1 asks for 1 ranks, but mpiexec started 2" in done.stderr
    assert os.listdir(tmp_path) == []


def test_an_error_on_another_rank_is_said_after_a_wait_naming_the_rank(monkeypatch, capsys):
    import scratchcnn.cli as cli
    from scratchcnn.harness import ranks

    waits = []
    monkeypatch.setattr(ranks, "is_main", lambda: False)
    monkeypatch.setattr(ranks, "rank", lambda: 1)
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    cli._say_once("scratchcnn train: error: disk full")
    assert waits == [cli.RANK_ERROR_DELAY]
    assert capsys.readouterr().err == "[rank 1] scratchcnn train: error: disk full\n"
