"""Where datasets live: the search path, the public mirrors, checksums and a safe download.

A download never leaves a partial or unverified file where a loader would find it: each file is
streamed into a hidden temporary file in the destination directory, its MD5 is checked against the
published one (and, where known, the SHA-256 of its decompressed bytes), and only then is it
renamed into place with ``os.replace``, which is atomic. Any failure, including Ctrl-C, deletes
the temporary file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchcnn.data.idx import DatasetError

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


# MD5s as published by torchvision (MNIST, FashionMNIST); the decompressed SHA-256s of MNIST
# guard against a mirror serving different bytes that happen to be valid gzip.
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
            RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
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


def missing_idx_files(directory: Path) -> list[str]:
    return [stem for stem in IDX_STEMS if find_idx_file(directory, stem) is None]


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
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float | None = None,
    quiet: bool = False,
) -> Path:
    """Download the files of dataset ``name`` that ``directory`` lacks; return the directory.

    ``mirrors`` and ``files`` replace the built-in mirror list and checksum table (tests serve
    synthetic files this way); by default $SCRATCHCNN_MIRRORS, then the public mirrors are used.
    """
    if name not in REMOTE_DATASETS:
        known = ", ".join(REMOTE_DATASETS)
        raise DatasetError(f"dataset {name!r} cannot be downloaded (downloadable: {known})")
    directory = Path(directory) if directory is not None else default_download_dir(name)
    base_urls = mirrors_for(name, mirrors)
    for remote in files if files is not None else REMOTE_DATASETS[name].files:
        if find_idx_file(directory, remote.filename.removesuffix(".gz")) is not None:
            continue
        download_file(remote, base_urls, directory, timeout=timeout, retries=retries,
                      backoff=backoff, quiet=quiet)
    return directory
