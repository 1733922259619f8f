"""What train, compare, bench and accuracy refuse before any slow work: output paths they could
not write, more threads than cores, seeds out of range; plus two messages of their own (a binary
--table file, a diverging compare)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest

from scratchcnn.cli import CommandError, check_output_dir, check_output_file, main
from scratchcnn.harness.threads import apply_threads, available_cores

TINY = ["--dataset", "mnist-sample", "--limit-train", "40", "--limit-test", "20"]


def _slow_work_fails(*args, **kwargs):
    raise AssertionError("the slow work started before the options were checked")


@pytest.fixture
def no_slow_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every command's data loading, training or benchmark fail the test if reached."""
    from scratchcnn.harness import accuracy, bench, compare, training_run

    monkeypatch.setattr(training_run, "TrainingRun", _slow_work_fails)
    monkeypatch.setattr(compare, "run_compare", _slow_work_fails)
    monkeypatch.setattr(bench, "run_bench", _slow_work_fails)
    monkeypatch.setattr(accuracy, "run_target", _slow_work_fails)


def command(name: str, out: str, *options: str) -> list[str]:
    """``name``'s command line writing to ``out`` (a directory, or accuracy's JSON file)."""
    return {
        "train": ["train", *TINY, "--no-progress", "--out", out],
        "compare": ["compare", *TINY, "--quiet", "--out", out],
        "bench": ["bench", "--dataset", "random", "--quiet", "--out", out],
        "accuracy": ["accuracy", "mnist-simple-b64", *TINY[2:], "--out", out],
    }[name] + ["--threads", "1"] + list(options)  # one process: monkeypatching reaches it


def _unwritable_directory(tmp_path: Path) -> Path | None:
    """A directory this process cannot create files in: a read-only one of its own, or, for
    root (whom permissions do not stop), a system one such as /sys; None if there is none."""
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o500)
    for candidate in (locked, Path("/sys")):
        try:
            with tempfile.NamedTemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    return None


def bad_outputs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """{case: (path for a directory option, what the message says)}."""
    (tmp_path / "a-file").write_text("")
    cases = {
        "existing file": (str(tmp_path / "a-file"), "exists and is a file"),
        "under a file": (str(tmp_path / "a-file" / "sub"), "a-file is a file"),
    }
    if Path("/proc/self").is_dir():  # Linux: nothing can be created at the top of /proc
        cases["cannot create"] = ("/proc/scratchcnn-nope", "cannot create")
    unwritable = _unwritable_directory(tmp_path)
    if unwritable is not None:
        cases["not writable"] = (str(unwritable), "not writable")
    return cases


@pytest.mark.parametrize("name", ["train", "compare", "bench", "accuracy"])
def test_a_bad_output_path_is_refused_before_any_work(name, tmp_path, capsys, no_slow_work):
    for case, (directory, problem) in bad_outputs(tmp_path).items():
        out = str(Path(directory) / "results.json") if name == "accuracy" else directory
        assert main(command(name, out)) == 2, case
        err = capsys.readouterr().err
        assert err.startswith(f"scratchcnn {name}: error: --out {out}: "), (case, err)
        assert problem in err and "choose another --out" in err, (case, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (case, err)


@pytest.mark.parametrize("name", ["compare", "bench"])
def test_an_empty_output_directory_is_refused_not_read_as_here(name, tmp_path, monkeypatch,
                                                               capsys, no_slow_work):
    monkeypatch.chdir(tmp_path)
    assert main(command(name, "")) == 2
    err = capsys.readouterr().err
    assert err == f"scratchcnn {name}: error: --out is empty; give a directory\n"
    assert list(tmp_path.iterdir()) == []


def test_accuracy_refuses_a_directory_as_its_results_file(tmp_path, capsys, no_slow_work):
    assert main(command("accuracy", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path}: is a directory; give a file name" in err


def test_output_checks_create_what_is_missing_and_leave_nothing_else(tmp_path):
    directory = check_output_dir(tmp_path / "new" / "run")
    assert directory.is_dir() and list(directory.iterdir()) == []
    results = check_output_file(tmp_path / "results" / "target.json")
    assert results.parent.is_dir() and list(results.parent.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "results"]


# -- threads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train", "compare", "bench", "accuracy"])
def test_more_threads_than_cores_is_refused_at_parse_time(name, tmp_path, capsys, no_slow_work):
    cores = available_cores()
    out = str(tmp_path / "out.json")
    with pytest.raises(SystemExit) as exited:
        main(command(name, out, "--threads", str(cores + 1)))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert (f"argument --threads: {cores + 1} is more than the {cores} CPU core" in err
            and f"use at most {cores}" in err), err
    assert not Path(out).exists()
    from scratchcnn.cli import build_parser

    assert build_parser().parse_args([name, "--threads", str(cores)]).threads == cores


def test_bench_checks_the_thread_variable_against_the_cores(monkeypatch, tmp_path, capsys,
                                                            no_slow_work):
    monkeypatch.setenv("SCRATCHCNN_NUM_THREADS", str(available_cores() + 1))
    assert main(command("bench", str(tmp_path / "bench"))[:-2]) == 2  # no --threads
    assert "SCRATCHCNN_NUM_THREADS: " in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_apply_threads_refuses_more_threads_than_cores():
    with pytest.raises(ValueError, match="use at most"):
        apply_threads(available_cores() + 1, torch=False)


# -- seeds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, option, value", [
    ("train", "--seed", "-1"), ("compare", "--seed", "-1"), ("train", "--seed", str(2**64)),
    ("compare", "--seed", str(2**64)), ("accuracy", "--seeds", f"0,{2**64}"),
])
def test_a_seed_out_of_range_is_refused_at_parse_time(name, option, value, tmp_path, capsys,
                                                      no_slow_work):
    with pytest.raises(SystemExit) as exited:
        main(command(name, str(tmp_path / "out"), option, value))
    assert exited.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err


def test_the_seed_bound_is_torchs(tmp_path, capsys, torch):
    # torch.manual_seed takes up to 2**64 - 1: that seed gets through all of train, one more is
    # refused when parsed.
    with pytest.raises(SystemExit):
        main(command("train", str(tmp_path), "--framework", "torch", "--seed", str(2**64)))
    assert "argument --seed: " in capsys.readouterr().err
    assert main(command("train", str(tmp_path), "--framework", "torch", "--model", "tiny-cnn",
                        "--batch-size", "20", "--seed", str(2**64 - 1))) == 0
    assert (tmp_path / "last.npz").exists()


# -- counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, option", [
    ("compare", "--epochs"), ("compare", "--limit-test"), ("bench", "--rounds"),
    ("bench", "--inference-images"), ("accuracy", "--limit-train"),
])
@pytest.mark.parametrize("value, message", [
    ("0", "must be at least 1, got 0"), ("-2", "must be at least 1, got -2"),
    ("2.5", "expected a whole number, got '2.5'"), ("ten", "expected a whole number, got 'ten'"),
])
def test_a_count_that_is_not_a_positive_whole_number_is_refused(name, option, value, message,
                                                                tmp_path, capsys, no_slow_work):
    with pytest.raises(SystemExit) as exited:
        main(command(name, str(tmp_path / "out"), f"{option}={value}"))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    # argparse names the type function in its own message: the type must say it instead.
    assert f"argument {option}: {message}" in err and "_int" not in err, err
    assert not (tmp_path / "out").exists()


# -- the commands' own messages -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["train", "compare"])
def test_a_failed_run_leaves_no_empty_output_directory_behind(name, tmp_path, capsys):
    # The loss diverges at the second step: nothing is written, and the directories the command
    # created for its output go again; the one that was there before stays.
    out = tmp_path / "runs" / "diverged"
    options = ["--model", "tiny-cnn", "--batch-size", "20", "--epochs", "1", "--lr", "1e30"]
    if name == "compare":
        options += ["--frameworks", "numpy", "--no-memory", "--no-plots"]
    assert main(command(name, str(out), *options)) == 3
    assert "loss became" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_what_it_wrote_into_a_directory_it_created(tmp_path, monkeypatch):
    out = tmp_path / "new"

    def fails_after_writing(args):
        (check_output_dir(args.out) / "partial.txt").write_text("kept")
        raise CommandError("stopped")

    monkeypatch.setattr("scratchcnn.cli.train.run", fails_after_writing)
    assert main(command("train", str(out))) == 2
    assert (out / "partial.txt").read_text() == "kept"


def test_accuracy_table_names_a_binary_file(tmp_path, capsys):
    binary = tmp_path / "checkpoint.npz"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["accuracy", "--table", str(binary)]) == 2
    err = capsys.readouterr().err
    assert f"{binary}: not a JSON accuracy results file" in err and "utf-8" not in err


def test_a_diverging_compare_prints_no_numpy_warnings(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["compare", *TINY, "--frameworks", "numpy", "--model", "tiny-cnn",
                     "--batch-size", "20", "--epochs", "1", "--lr", "1e30", "--no-memory",
                     "--no-plots", "--quiet", "--out", str(tmp_path), "--threads", "1"])
    assert code == 3
    assert "loss became" in capsys.readouterr().err
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []

