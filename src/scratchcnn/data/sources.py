"""Where datasets live: the search path, the public mirrors, checksums and a safe download.

A download never leaves a partial or unverified file where a loader would find it: each file is
streamed into a hidden temporary file in the destination directory, its MD5 is checked against the
published one (and, where known, the SHA-256 of its decompressed bytes), and only then is it
renamed into place with ``os.replace``, which is atomic. Any failure, including Ctrl-C, deletes
the temporary file.

Waiting is bounded (see Timeouts) so that a first run on a bad network, one that refuses, stalls
or blackholes the mirrors, gives up within seconds and ``compare`` can fall back to the offline
sample; while it waits, one line on stderr says for whom and for what.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import http.client
import math
import os
import queue
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

from scratchcnn.data.idx import GZIP_MAGIC, DatasetError

SYSTEM_DATA_DIR = Path("/usr/share/datasets")
RETRY_BACKOFF = 1.0  # seconds before the first retry; doubles each time
TIMEOUTS_VARIABLE = "SCRATCHCNN_DOWNLOAD_TIMEOUTS"  # replaces Timeouts' defaults, see there
POLL_INTERVAL = 0.1  # seconds between looks at the clock while a download waits
WAITING_NOTICE_AFTER = 2.0  # a shorter wait is not worth a line on stderr
WORKER_GRACE = 1.0  # see _Attempt
BLOCK_SIZE = 1 << 16
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


def _idx_file_names(stem: str) -> tuple[str, ...]:
    dotted = stem.replace("-idx", ".idx")
    return (f"{stem}.gz", stem, f"{dotted}.gz", dotted)


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """The file holding ``stem`` in ``directory``: gzip-compressed, raw, or with the dotted name
    (``train-images.idx3-ubyte``) that some unpackers produce."""
    for candidate in _idx_file_names(stem):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def missing_idx_files(directory: Path, stems: Sequence[str] = IDX_STEMS) -> list[str]:
    """The ``stems`` (default: all four) that ``directory`` has no file for."""
    return [stem for stem in stems if find_idx_file(directory, stem) is None]


def non_file_entries(directory: Path, stems: Sequence[str] = IDX_STEMS) -> list[str]:
    """For the ``stems`` that ``directory`` has no file for, what sits under their file names
    instead, e.g. "t10k-images-idx3-ubyte.gz is a directory": calling those files missing would
    send the user to download them, and a download cannot replace a directory."""
    entries = []
    for stem in missing_idx_files(directory, stems):
        for name in _idx_file_names(stem):
            path = directory / name
            if path.exists():  # and is no file, or find_idx_file would have found it
                kind = "a directory" if path.is_dir() else "not a regular file"
                entries.append(f"{name} is {kind}")
    return entries


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


@dataclass(frozen=True)
class Timeouts:
    """How long a download waits, in seconds, before giving up on a mirror or on the file.

    ``connect``: per mirror, to look the host up and open the connection (TCP, TLS, a proxy's
    tunnel). ``stall``: once connected, for the next byte, be it the answer's first or the
    body's next; a slow download that keeps receiving never reaches it. ``deadline``: per file,
    across mirrors and retries: no attempt starts after it, and it cuts short an attempt that
    has received none of the body by then. An attempt that is receiving runs on until it stalls:
    a total cap would also stop a big file on a slow but working link.

    The defaults are sized for a first run on an unknown network, where falling back to the
    offline sample soon beats waiting minutes (``compare`` does that when the download fails):

    - a refused connection or an unknown host fails at once, and is not retried; even a DNS
      server that never answers costs at most ``connect`` per mirror: 3 x 3 s = 9 s <= 10 s;
    - mirrors that connect and then stall cost at most ``deadline + stall`` = 21 + 7 = 28 s
      <= 30 s in all: the last attempt may start just before the deadline, receive part of the
      body, and stall. The deadline is 3 stalls, so that each of the 3 built-in MNIST mirrors
      gets its chance. 7 s without a byte is long for a working connection, even a slow one.
    """

    connect: float = 3.0
    stall: float = 7.0
    deadline: float = 21.0

    def __post_init__(self) -> None:
        for field in fields(self):
            seconds = getattr(self, field.name)
            if not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
                raise ValueError(f"{field.name}={seconds!r}: a timeout is a number of seconds > 0")

    @classmethod
    def from_environment(cls) -> Timeouts:
        """The defaults, with those that $SCRATCHCNN_DOWNLOAD_TIMEOUTS names replaced, e.g.
        ``connect=10,stall=60,deadline=300`` on a slow link (or small values in tests)."""
        text = os.environ.get(TIMEOUTS_VARIABLE, "")
        names = {field.name for field in fields(cls)}
        values = {}
        try:
            for part in filter(None, (part.strip() for part in text.split(","))):
                name, _, seconds = (piece.strip() for piece in part.partition("="))
                if name not in names:
                    raise ValueError(f"{name!r} is not one of {', '.join(sorted(names))}")
                values[name] = float(seconds)
            return cls(**values)
        except ValueError as error:
            raise DatasetError(
                f"${TIMEOUTS_VARIABLE}={text!r}: {error}; expected seconds as in "
                "connect=3,stall=7,deadline=21"
            ) from None


class _TryNextMirror(Exception):
    """A failure that retrying the same URL soon will not fix: HTTP 4xx, a checksum mismatch, no
    connection (refused, unknown host, connect timeout), or a mirror that stopped answering."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


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
        raise _TryNextMirror(f"downloaded file is not valid gzip ({error})") from None
    return digest.hexdigest()


class _Attempt:
    """One request, shared by the thread that downloads (the caller's) and the worker thread
    that does the network I/O for it.

    The worker reports through ``events``, in order: ("connecting", host) and ("connected",
    host), again after a redirect; ("headers", the Content-Length or None); ("data", block),
    the last block empty; or ("failed", exception) at any point. The caller sets ``abandoned``
    when it stops listening.
    """

    def __init__(self, timeouts: Timeouts) -> None:
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.abandoned = threading.Event()
        # The caller's clock decides when to give up; the worker's socket timeouts, a little
        # longer, only make an abandoned worker end by itself instead of lingering.
        self.connect_timeout = timeouts.connect + WORKER_GRACE
        self.read_timeout = timeouts.stall + WORKER_GRACE

    def report(self, event: str, value: Any = None) -> None:
        self.events.put((event, value))


class _ReportsConnecting:
    """Mixin for http.client's connections: tells the attempt when connecting starts and ends,
    and switches the socket from the connect timeout to the read timeout."""

    def __init__(self, *args: Any, attempt: _Attempt, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempt = attempt

    def connect(self) -> None:
        self.attempt.report("connecting", self.host)
        super().connect()
        self.sock.settimeout(self.attempt.read_timeout)
        self.attempt.report("connected", self.host)


class _ReportingHTTPConnection(_ReportsConnecting, http.client.HTTPConnection):
    pass


class _ReportingHTTPSConnection(_ReportsConnecting, http.client.HTTPSConnection):
    pass


class _ReportsConnections:
    """Mixin for urllib's HTTP and HTTPS handlers: their connections report to the attempt.
    (Proxies from the environment and redirects work as with plain ``urlopen``.)"""

    def __init__(self, attempt: _Attempt) -> None:
        super().__init__()
        self.attempt = attempt

    def do_open(self, connection_class: type, request: urllib.request.Request,
                **connection_args: Any) -> http.client.HTTPResponse:
        reporting = (_ReportingHTTPSConnection
                     if issubclass(connection_class, http.client.HTTPSConnection)
                     else _ReportingHTTPConnection)
        connection = functools.partial(reporting, attempt=self.attempt)
        return super().do_open(connection, request, **connection_args)


class _ReportingHTTPHandler(_ReportsConnections, urllib.request.HTTPHandler):
    pass


class _ReportingHTTPSHandler(_ReportsConnections, urllib.request.HTTPSHandler):
    pass


def _receive(request: urllib.request.Request, attempt: _Attempt) -> None:
    """The worker thread: send ``request`` and pass on what arrives (see _Attempt)."""
    opener = urllib.request.build_opener(_ReportingHTTPHandler(attempt),
                                         _ReportingHTTPSHandler(attempt))
    try:
        with opener.open(request, timeout=attempt.connect_timeout) as response:
            attempt.report("headers", response.headers.get("Content-Length"))
            while not attempt.abandoned.is_set():
                # read1 returns what has arrived instead of waiting for a whole block, so every
                # byte counts as progress when it comes, not when 64 KiB have.
                block = response.read1(BLOCK_SIZE)
                attempt.report("data", block)
                if not block:
                    break
    except Exception as error:  # the downloading thread decides what each failure means
        if isinstance(error, urllib.error.HTTPError):
            error.close()  # its body, unread
        attempt.report("failed", error)


class _WaitingLine:
    """The line on stderr that says what a download is waiting for, once a wait has lasted
    WAITING_NOTICE_AFTER seconds. On a terminal it is redrawn as the seconds pass (inside the
    progress bar once there is one) and erased when the wait ends; in a log, where each redraw
    would be a new line, it is printed once per attempt."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.on_terminal = sys.stderr.isatty()
        self.bar: Any = None  # the tqdm bar, once the body is arriving
        self.shown = ""  # what the terminal shows now
        self.printed = False

    def show(self, text: str, waited: float) -> None:
        if not self.enabled or waited < WAITING_NOTICE_AFTER or text == self.shown:
            return
        if not self.on_terminal:
            if not self.printed:
                print(text, file=sys.stderr, flush=True)
                self.printed = True
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            sys.stderr.write(f"\r{text}\033[K")
            sys.stderr.flush()
        self.shown = text

    def clear(self) -> None:
        if not self.shown:
            return
        if self.bar is not None:
            self.bar.set_postfix_str("")
        else:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        self.shown = ""


def _activity(phase: str, received: int) -> str:
    """What an attempt in ``phase`` is doing while it waits, for messages."""
    if phase == "connecting":
        return "connecting"
    if phase == "answer":
        return "connected, no answer yet"
    if not received:
        return "answered, no data yet"
    return f"stalled after {received:,} bytes"


def _fetch(url: str, output: BinaryIO, timeouts: Timeouts, deadline: float, quiet: bool) -> None:
    """Stream ``url`` into ``output`` until the end of the body, or until ``timeouts`` or
    ``deadline`` (a ``time.monotonic()`` value) say to give up. Raises _TryNextMirror, or
    OSError or HTTPException for a failure worth retrying (a dropped connection, HTTP 5xx).

    The network I/O runs in a worker thread and this one watches the clock: that way the limits
    hold whatever blocks (a DNS lookup ignores socket timeouts), this thread can say what it is
    waiting for, and Ctrl-C stops it at once. A worker given up on is left to end by itself; it
    never touches ``output``.
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    host = urllib.parse.urlsplit(url).hostname or url
    attempt = _Attempt(timeouts)
    worker = threading.Thread(target=_receive, args=(request, attempt), daemon=True,
                              name=f"download {url}")
    waiting = _WaitingLine(enabled=not quiet)
    phase = "connecting"  # then "answer" (waiting for the response headers), then "body"
    since = time.monotonic()  # when the current wait began
    received, expected, bar = 0, None, None
    worker.start()
    try:
        while True:
            try:
                event, value = attempt.events.get(timeout=POLL_INTERVAL)
            except queue.Empty:
                now = time.monotonic()
                limit = timeouts.connect if phase == "connecting" else timeouts.stall
                # The deadline cuts only the waits of an attempt that has received nothing yet.
                give_up_at = since + limit if received else min(since + limit, deadline)
                activity = _activity(phase, received)
                if now >= give_up_at:
                    when = (f"at the {timeouts.deadline:g} s deadline for this file"
                            if give_up_at == deadline else f"after {limit:g} s")
                    raise _TryNextMirror(f"gave up on {host} ({activity}) {when}",
                                         timed_out=True) from None
                waiting.show(f"waiting for {host} ({activity}, {int(now - since)} s; gives up "
                             f"at {round(give_up_at - since, 1):g} s)...", now - since)
                continue
            since = time.monotonic()
            if event == "connecting":
                phase, host = "connecting", value
            elif event == "connected":
                phase = "answer"
            elif event == "headers":
                phase = "body"
                expected = int(value) if value and value.isdigit() else None
                waiting.clear()
                bar = _progress_bar(url, expected, quiet)
                waiting.bar = bar if waiting.on_terminal else None
            elif event == "data":
                if not value:
                    break
                output.write(value)
                received += len(value)
                bar.update(len(value))
                waiting.clear()
            else:  # "failed"
                raise _failure(value, phase, host)
    finally:
        attempt.abandoned.set()
        waiting.clear()
        if bar is not None:
            bar.close()
    if expected is not None and received != expected:
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")


def _progress_bar(url: str, expected: int | None, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                desc=url.rsplit("/", 1)[-1], leave=False,
                disable=quiet or not sys.stderr.isatty())


def _failure(error: Exception, phase: str, host: str) -> Exception:
    """What the worker's ``error``, raised while in ``phase``, means for the download."""
    if isinstance(error, urllib.error.HTTPError):
        if 400 <= error.code < 500:
            return _TryNextMirror(f"HTTP {error.code} {error.reason}")
        return error  # 5xx: the server's trouble, often passing
    if phase == "connecting" and isinstance(error, OSError):
        # Refused, unknown host, TLS or proxy failure: another try in a second or two would
        # fail the same way, and on a first run the time is better spent on the next mirror.
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        detail = getattr(reason, "strerror", None) or reason
        return _TryNextMirror(f"cannot connect to {host} ({detail})")
    return error


def download_file(
    remote: RemoteFile,
    base_urls: Sequence[str],
    directory: str | os.PathLike,
    *,
    timeouts: Timeouts | None = None,
    retries: int = 3,
    backoff: float | None = None,
    quiet: bool = False,
) -> Path:
    """Download ``remote`` into ``directory``, trying each base URL in order.

    A connection dropped mid-way or an HTTP 5xx is retried ``retries`` times per mirror with
    exponential backoff (``backoff`` seconds, doubling; default RETRY_BACKOFF). HTTP 4xx,
    checksum mismatches, failures to connect and mirrors that stop answering move on to the
    next mirror at once. ``timeouts`` (default: Timeouts.from_environment()) bounds the waiting,
    see Timeouts. Returns the final path, which exists only if its checksums matched.
    Raises DatasetError listing what went wrong at each mirror.
    """
    timeouts = timeouts or Timeouts.from_environment()
    return _download_file(remote, base_urls, directory, timeouts, retries, backoff, quiet)[0]


def _download_file(remote: RemoteFile, base_urls: Sequence[str], directory: str | os.PathLike,
                   timeouts: Timeouts, retries: int, backoff: float | None, quiet: bool
                   ) -> tuple[Path, str]:
    """download_file, also returning the base URL that served the file."""
    backoff = RETRY_BACKOFF if backoff is None else backoff
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    destination = directory / remote.filename
    deadline = time.monotonic() + timeouts.deadline
    failures = []
    timed_out = False
    for base in base_urls:
        url = base + remote.filename
        for attempt in range(max(1, retries)):
            pause = backoff * 2 ** (attempt - 1) if attempt else 0.0
            if time.monotonic() + pause >= deadline:
                again = " again" if attempt else ""
                failures.append(f"{url}: not tried{again}, the {timeouts.deadline:g} s deadline "
                                "for this file had passed")
                timed_out = True
                break
            time.sleep(pause)
            try:
                with _temporary_file(destination) as temporary:
                    if not quiet:
                        print(f"Downloading {url}", file=sys.stderr)
                    with open(temporary, "wb") as output:
                        _fetch(url, output, timeouts, deadline, quiet)
                        output.flush()
                        os.fsync(output.fileno())
                    _verify(remote, temporary)
                    os.replace(temporary, destination)
                return destination, base
            except (_TryNextMirror, ValueError) as error:  # ValueError: a malformed URL
                failures.append(f"{url}: {error}")
                timed_out = timed_out or getattr(error, "timed_out", False)
                break
            except (OSError, http.client.HTTPException) as error:  # dropped connections, 5xx
                failures.append(f"{url} (attempt {attempt + 1}): {type(error).__name__}: {error}")
    slow_network = (f" On a slow network, allow more time with {TIMEOUTS_VARIABLE}, e.g. "
                    "connect=10,stall=60,deadline=300." if timed_out else "")
    raise DatasetError(
        f"could not download {remote.filename} into {directory}:\n  "
        + "\n  ".join(failures)
        + "\nCheck your connection, set SCRATCHCNN_MIRRORS to a working mirror, or download the "
        "file yourself and pass its directory with --data-dir." + slow_network
    )


def _verify(remote: RemoteFile, path: Path) -> None:
    md5 = _file_md5(path)
    if md5 != remote.md5:
        raise _TryNextMirror(f"checksum mismatch: MD5 {md5}, expected {remote.md5}")
    if remote.sha256_decompressed is not None:
        sha256 = _decompressed_sha256(path)
        if sha256 != remote.sha256_decompressed:
            raise _TryNextMirror(
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
    timeouts: Timeouts | None = None,
    retries: int = 3,
    backoff: float | None = None,
    quiet: bool = False,
) -> Path:
    """Download the files of dataset ``name`` that ``directory`` lacks; return the directory.

    ``mirrors`` and ``files`` replace the built-in mirror list and checksum table (tests serve
    synthetic files this way); by default $SCRATCHCNN_MIRRORS, then the public mirrors are used.
    ``stems`` limits the download to those files (e.g. TEST_STEMS when only the test split is
    read). ``timeouts`` (default: Timeouts.from_environment()) applies to each file; the first
    file that cannot be downloaded ends the download, so a dead network costs one file's worth.
    """
    if name not in REMOTE_DATASETS:
        known = ", ".join(REMOTE_DATASETS)
        raise DatasetError(f"dataset {name!r} cannot be downloaded (downloadable: {known})")
    timeouts = timeouts or Timeouts.from_environment()
    directory = Path(directory) if directory is not None else default_download_dir(name)
    wanted = [remote for remote in (files if files is not None else REMOTE_DATASETS[name].files)
              if stems is None or remote.filename.removesuffix(".gz") in stems]
    if directory.is_dir():
        in_the_way = non_file_entries(directory, [r.filename.removesuffix(".gz") for r in wanted])
        if in_the_way:
            raise DatasetError(
                f"{directory}: {'; '.join(in_the_way)} where an IDX file should be; move it "
                f"out of the way, then try again"
            )
    created = [path for path in (directory, *directory.parents) if not os.path.lexists(path)]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError(
            f"cannot create {directory} to download {name} into ({error.strerror or error}); "
            "pick another directory with --data-dir"
        ) from None
    base_urls = list(mirrors_for(name, mirrors))
    try:
        for remote in wanted:
            if find_idx_file(directory, remote.filename.removesuffix(".gz")) is not None:
                continue
            _, served_by = _download_file(remote, base_urls, directory, timeouts, retries,
                                          backoff, quiet)
            # Ask the mirror that worked first for the remaining files: each one before it
            # would cost its timeouts again, file after file.
            base_urls.remove(served_by)
            base_urls.insert(0, served_by)
    except BaseException:
        # An empty directory left by a failed download would look like the dataset's home
        # and hide a mistyped --data-dir the next time; whatever holds files stays.
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break
        raise
    return directory
