"""Where datasets live: the search path, the public mirrors, checksums and a safe download.

A download never leaves a partial or unverified file where a loader would find it: each file is
streamed into a hidden temporary file in the destination directory, its MD5 is checked against the
published one (and, where known, the SHA-256 of its decompressed bytes), and only then is it
renamed into place with ``os.replace``, which is atomic. Any failure, including Ctrl-C, deletes
the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchcnn.data.idx import GZIP_MAGIC, DatasetError

SYSTEM_DATA_DIR = Path("/usr/share/datasets")
RETRY_BACKOFF = 1.0  # seconds before the first retry; doubles each time
USER_AGENT = "scratchcnn-data/0.1 (+https://pypi.org/project/scratchcnn)"
# The four files of an MNIST-family dataset, by their standard names without ".gz".
IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
TEST_STEMS = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# How messages name each dataset.
DISPLAY_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "mnist-sample": "mnist-sample"}


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file and its published checksums."""

    filename: str
    md5: str  # of the file as served (the .gz)
    sha256_decompressed: str | None = None


@dataclass(frozen=True)
class RemoteDataset:
    name: str
    mirrors: tuple[str, ...]  # base URLs, tried in order; "{name}" is replaced by the dataset name
    files: tuple[RemoteFile, ...]


# MD5s as published by torchvision (MNIST, FashionMNIST). The decompressed SHA-256s guard against
# a mirror serving different bytes that happen to be valid gzip, and also recognise local copies
# that were recompressed (Debian's Fashion-MNIST, for one, has other .gz bytes and MD5s); the
# Fashion-MNIST ones are those of the files inside the archives with the published MD5s.
REMOTE_DATASETS: dict[str, RemoteDataset] = {
    "mnist": RemoteDataset(
        "mnist",
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        (
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                "9fb629c4189551a2d022fa330f9573f3",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                "ec29112dd5afa0611ce80d1b7f02629c",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        ),
    ),
    "fashion-mnist": RemoteDataset(
        "fashion-mnist",
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        ),
        (
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                "bef4ecab320f06d8554ea6380940ec79",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                "bb300cfdad3c16e7a12a480ee83cd310",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ),
    ),
}


# ----------------------------------------------------------------------------- where data lives


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scratchcnn"


def search_dirs(name: str) -> list[Path]:
    """Directories searched for dataset ``name``, in order."""
    dirs = []
    if os.environ.get("SCRATCHCNN_DATA"):
        dirs.append(Path(os.environ["SCRATCHCNN_DATA"]) / name)
    dirs.append(user_cache_dir() / name)
    dirs.append(SYSTEM_DATA_DIR / name)
    return dirs


def default_download_dir(name: str) -> Path:
    """Where a download goes when the caller names no directory: the first of the search path."""
    return search_dirs(name)[0]


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """The file holding ``stem`` in ``directory``: gzip-compressed, raw, or with the dotted name
    (``train-images.idx3-ubyte``) that some unpackers produce."""
    dotted = stem.replace("-idx", ".idx")
    for candidate in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def missing_idx_files(directory: Path, stems: Sequence[str] = IDX_STEMS) -> list[str]:
    """The ``stems`` (default: all four) that ``directory`` has no file for."""
    return [stem for stem in stems if find_idx_file(directory, stem) is None]


def check_data_dir(data_dir: str | os.PathLike, name: str = "mnist") -> Path:
    """``data_dir`` (a --data-dir given by the user) as a Path, or a one-line DatasetError when it
    does not exist, is not a directory or cannot be read. Nothing is created: a mistyped path
    must not become a new directory that downloads then fill."""
    path = Path(data_dir)
    try:
        if not path.exists():
            raise DatasetError(
                f"--data-dir {path}: no such directory; check the path (to download {name} into "
                f"a new directory: scratchcnn datasets --download {name} --data-dir {path})"
            )
        if not path.is_dir():
            raise DatasetError(
                f"--data-dir {path}: not a directory; pass the directory that holds the four "
                "IDX files"
            )
        # Listing needs read and finding the files needs search permission; root has both
        # whatever the mode bits say, and os.access knows that.
        if not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as error:
        raise DatasetError(
            f"--data-dir {path}: cannot read the directory ({error.strerror or error}); fix its "
            "permissions or pass another directory"
        ) from None
    return path


# Only the label files are fingerprinted: they tell the datasets apart just as well as the images,
# at 70 KB instead of 55 MB to decompress and hash on every load.
FINGERPRINT_STEMS = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")
# Larger (decompressed) files are custom data, not a published label file (those are 60,008 bytes).
MAX_FINGERPRINT_BYTES = 1 << 20


def identify_idx_file(path: Path) -> str | None:
    """The known dataset (a key of REMOTE_DATASETS) whose published file ``path`` is, judged by
    the SHA-256 of its decompressed bytes, raw or gzip; None for anything else (custom data, a
    modified copy, an unreadable or corrupt file: reading it reports those) and for anything over
    MAX_FINGERPRINT_BYTES decompressed, which leaves out the image files."""
    known = {
        remote.sha256_decompressed: dataset.name
        for dataset in REMOTE_DATASETS.values()
        for remote in dataset.files
        if remote.sha256_decompressed is not None
    }
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(len(GZIP_MAGIC)) == GZIP_MAGIC
        opener = gzip.open if compressed else open
        with opener(path, "rb") as stream:
            data = stream.read(MAX_FINGERPRINT_BYTES + 1)
    except (OSError, EOFError, zlib.error):
        return None
    if len(data) > MAX_FINGERPRINT_BYTES:
        return None
    return known.get(hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------------- mirrors


def mirrors_for(name: str, mirrors: Sequence[str] | None = None) -> tuple[str, ...]:
    """Base URLs for ``name``: ``mirrors`` if given, else $SCRATCHCNN_MIRRORS (comma-separated),
    else the built-in list. ``{name}`` in a base URL becomes the dataset name."""
    if mirrors is None:
        env = os.environ.get("SCRATCHCNN_MIRRORS", "").strip()
        if env:
            mirrors = [part.strip() for part in env.split(",") if part.strip()]
        else:
            mirrors = REMOTE_DATASETS[name].mirrors
    resolved = []
    for base in mirrors:
        base = base.replace("{name}", name)
        resolved.append(base if base.endswith("/") else base + "/")
    return tuple(resolved)


# -------------------------------------------------------------------------------- download


class _PermanentError(Exception):
    """A failure that retrying the same URL will not fix (HTTP 4xx, checksum mismatch)."""


@contextlib.contextmanager
def _temporary_file(destination: Path) -> Iterator[Path]:
    """A hidden temporary file next to ``destination``; deleted on exit unless renamed."""
    handle, name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part",
                                    dir=destination.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decompressed_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError) as error:
        raise _PermanentError(f"downloaded file is not valid gzip ({error})") from None
    return digest.hexdigest()


def _fetch(url: str, temporary: Path, timeout: float, quiet: bool) -> None:
    """Stream ``url`` into ``temporary``; raise _PermanentError for 4xx, OSError for the rest."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if 400 <= error.code < 500:
            raise _PermanentError(f"HTTP {error.code} {error.reason}") from None
        raise
    with response, open(temporary, "wb") as output:
        length_header = response.headers.get("Content-Length")
        expected = int(length_header) if length_header and length_header.isdigit() else None
        from tqdm.auto import tqdm

        progress = tqdm(
            total=expected, unit="B", unit_scale=True, unit_divisor=1024,
            desc=url.rsplit("/", 1)[-1], leave=False,
            disable=quiet or not sys.stderr.isatty(),
        )
        received = 0
        with progress:
            while True:
                block = response.read(1 << 16)
                if not block:
                    break
                output.write(block)
                received += len(block)
                progress.update(len(block))
        if expected is not None and received != expected:
            raise ConnectionError(f"connection closed after {received} of {expected} bytes")
        output.flush()
        os.fsync(output.fileno())


def download_file(
    remote: RemoteFile,
    base_urls: Sequence[str],
    directory: str | os.PathLike,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float | None = None,
    quiet: bool = False,
) -> Path:
    """Download ``remote`` into ``directory``, trying each base URL in order.

    Transient failures (timeouts, dropped connections, HTTP 5xx) are retried ``retries`` times
    per mirror with exponential backoff (``backoff`` seconds, doubling; default RETRY_BACKOFF);
    HTTP 4xx and checksum mismatches move on to the next
    mirror at once. Returns the final path, which exists only if its checksums matched.
    Raises DatasetError listing what went wrong at each mirror.
    """
    backoff = RETRY_BACKOFF if backoff is None else backoff
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    destination = directory / remote.filename
    failures = []
    for base in base_urls:
        url = base + remote.filename
        for attempt in range(max(1, retries)):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                with _temporary_file(destination) as temporary:
                    if not quiet:
                        print(f"Downloading {url}", file=sys.stderr)
                    _fetch(url, temporary, timeout, quiet)
                    _verify(remote, temporary)
                    os.replace(temporary, destination)
                return destination
            except (_PermanentError, ValueError) as error:  # ValueError: a malformed URL
                failures.append(f"{url}: {error}")
                break
            except (OSError, http.client.HTTPException) as error:  # timeouts, dropped connections
                failures.append(f"{url} (attempt {attempt + 1}): {type(error).__name__}: {error}")
    raise DatasetError(
        f"could not download {remote.filename} into {directory}:\n  "
        + "\n  ".join(failures)
        + "\nCheck your connection, set SCRATCHCNN_MIRRORS to a working mirror, or download the "
        "file yourself and pass its directory with --data-dir."
    )


def _verify(remote: RemoteFile, path: Path) -> None:
    md5 = _file_md5(path)
    if md5 != remote.md5:
        raise _PermanentError(f"checksum mismatch: MD5 {md5}, expected {remote.md5}")
    if remote.sha256_decompressed is not None:
        sha256 = _decompressed_sha256(path)
        if sha256 != remote.sha256_decompressed:
            raise _PermanentError(
                f"checksum mismatch of the decompressed data: SHA-256 {sha256}, "
                f"expected {remote.sha256_decompressed}"
            )


def download_dataset(
    name: str,
    directory: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    files: Sequence[RemoteFile] | None = None,
    stems: Sequence[str] | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float | None = None,
    quiet: bool = False,
) -> Path:
    """Download the files of dataset ``name`` that ``directory`` lacks; return the directory.

    ``mirrors`` and ``files`` replace the built-in mirror list and checksum table (tests serve
    synthetic files this way); by default $SCRATCHCNN_MIRRORS, then the public mirrors are used.
    ``stems`` limits the download to those files (e.g. TEST_STEMS when only the test split is
    read).
    """
    if name not in REMOTE_DATASETS:
        known = ", ".join(REMOTE_DATASETS)
        raise DatasetError(f"dataset {name!r} cannot be downloaded (downloadable: {known})")
    directory = Path(directory) if directory is not None else default_download_dir(name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError(
            f"cannot create {directory} to download {name} into ({error.strerror or error}); "
            "pick another directory with --data-dir"
        ) from None
    base_urls = mirrors_for(name, mirrors)
    for remote in files if files is not None else REMOTE_DATASETS[name].files:
        stem = remote.filename.removesuffix(".gz")
        if (stems is not None and stem not in stems) or find_idx_file(directory, stem) is not None:
            continue
        download_file(remote, base_urls, directory, timeout=timeout, retries=retries,
                      backoff=backoff, quiet=quiet)
    return directory
