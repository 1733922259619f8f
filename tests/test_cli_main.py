"""The command-line dispatcher: help, user errors as one line, debug tracebacks, broken pipes."""

import os
import subprocess
import sys

import numpy as np
import pytest

from scratchcnn.cli import build_parser, main


def test_help_lists_every_registered_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("compare", "train", "evaluate", "predict", "datasets"):
        assert command in out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: scratchcnn" in capsys.readouterr().out


def test_value_error_is_one_line_without_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.npz"
    assert main(["evaluate", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scratchcnn evaluate: error:") and "missing.npz" in err
    assert "Traceback" not in err


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHCNN_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["evaluate", str(tmp_path / "missing.npz")])


def test_broken_pipe_ends_quietly():
    # `datasets` prints a table; the reader closes the pipe before reading anything.
    process = subprocess.Popen(
        [sys.executable, "-m", "scratchcnn", "datasets"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "SCRATCHCNN_DATA": "/nonexistent"},
    )
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    assert b"Traceback" not in err
    assert process.returncode in (0, 1)


def test_parser_builds_without_importing_torch():
    code = "import sys, scratchcnn.cli as c; c.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_build_parser_is_reusable():
    assert build_parser().prog == "scratchcnn"


def _raise_permission_error(*args, **kwargs):
    raise PermissionError(13, "Permission denied", "runs/compare/curves.png")


def test_running_out_of_memory_is_one_line_that_says_what_to_do(monkeypatch, tmp_path, capsys):
    from scratchcnn.harness import compare

    def allocate(*args, **kwargs):
        return np.empty((1 << 62,), dtype=np.uint8)  # NumPy refuses: far above any RAM

    monkeypatch.setattr(compare, "run_compare", allocate)
    command = ["compare", "--frameworks", "numpy", "--out", str(tmp_path), "--threads", "1"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("scratchcnn compare: error: out of memory (Unable to allocate ")
    assert err.endswith("use smaller sizes (batch size, images, --limit-train / --limit-test)\n")


def test_os_error_is_one_line_with_the_file(monkeypatch, tmp_path, capsys):
    # The safety net behind the commands' own checks: e.g. a directory made read-only mid-run.
    from scratchcnn.harness import compare

    monkeypatch.setattr(compare, "run_compare", _raise_permission_error)
    command = ["compare", "--frameworks", "numpy", "--out", str(tmp_path), "--threads", "1"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err == "scratchcnn compare: error: Permission denied: runs/compare/curves.png\n"
    monkeypatch.setenv("SCRATCHCNN_DEBUG", "1")
    with pytest.raises(PermissionError):
        main(command)
