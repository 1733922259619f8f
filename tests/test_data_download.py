"""Downloads against real HTTP servers on 127.0.0.1: after every outcome the destination holds
either the complete, verified file or nothing at all (no partial or temporary files), and a bad
network (refused, unknown host, a mirror that stalls) is given up on within the time limits."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from scratchcnn.data import DatasetError, download_dataset, load_dataset, sources, write_idx
from scratchcnn.data.sources import IDX_STEMS, RemoteFile, Timeouts, download_file, mirrors_for

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    """Keep every test off the network: no proxy or timeouts from the environment, and every
    host name but 127.0.0.1 and localhost fails to resolve without asking a DNS server."""
    for variable in (*PROXY_VARIABLES, *(v.upper() for v in PROXY_VARIABLES),
                     sources.TIMEOUTS_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    resolve = socket.getaddrinfo

    def resolve_locally(host, *args, **kwargs):
        if host in ("127.0.0.1", "localhost"):
            return resolve(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", resolve_locally)


class LocalServer:
    """Serves ``files`` (URL path -> bytes). Paths in ``drop`` send a full Content-Length, then
    half the body, then close (``drop[path]`` times, then serve normally); paths in ``stall``
    wait that many seconds before answering. Every requested path is logged."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop: dict[str, int] = {}
        self.stall: dict[str, float] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path in server.stall:
                    server.stall_event.wait(server.stall[self.path])
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop.get(self.path, 0) > 0:
                    server.drop[self.path] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.stall_event = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stall_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as running:
        yield running


def synthetic_dataset(directory: Path, train: int = 30, test: int = 10, seed: int = 0) -> dict:
    """Four small gzip IDX files in ``directory``; returns the arrays written."""
    generator = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": generator.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": generator.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": generator.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": generator.integers(0, 10, test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(directory / f"{stem}.gz", array)
    return arrays


def remote_for(data: bytes, filename: str = "train-labels-idx1-ubyte.gz",
               with_sha256: bool = True) -> RemoteFile:
    sha256 = hashlib.sha256(gzip.decompress(data)).hexdigest() if with_sha256 else None
    return RemoteFile(filename, hashlib.md5(data).hexdigest(), sha256)


def assert_only(directory: Path, names: set[str]) -> None:
    present = {path.name for path in directory.iterdir()} if directory.exists() else set()
    assert present == names, f"{directory} holds {sorted(present)}, expected {sorted(names)}"


LABELS = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(range(10)) * 20, mtime=0)


def test_success_writes_the_verified_file_and_nothing_else(server, tmp_path):
    server.files["/a/train-labels-idx1-ubyte.gz"] = LABELS
    path = download_file(remote_for(LABELS), [server.url + "/a/"], tmp_path, quiet=True)
    assert path == tmp_path / "train-labels-idx1-ubyte.gz"
    assert path.read_bytes() == LABELS
    assert_only(tmp_path, {path.name})


def test_md5_mismatch_is_an_error_and_leaves_nothing(server, tmp_path):
    server.files["/a/train-labels-idx1-ubyte.gz"] = LABELS
    wrong = RemoteFile("train-labels-idx1-ubyte.gz", "0" * 32)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        download_file(wrong, [server.url + "/a/"], tmp_path, quiet=True, backoff=0)
    assert_only(tmp_path, set())
    assert server.requests == ["/a/train-labels-idx1-ubyte.gz"]  # a mismatch is not retried


def test_decompressed_sha256_mismatch_is_an_error(server, tmp_path):
    server.files["/a/train-labels-idx1-ubyte.gz"] = LABELS
    remote = RemoteFile("train-labels-idx1-ubyte.gz", hashlib.md5(LABELS).hexdigest(), "f" * 64)
    with pytest.raises(DatasetError, match="decompressed"):
        download_file(remote, [server.url + "/a/"], tmp_path, quiet=True, backoff=0)
    assert_only(tmp_path, set())


def test_404_on_first_mirror_then_second_mirror(server, tmp_path):
    server.files["/second/train-labels-idx1-ubyte.gz"] = LABELS
    mirrors = [server.url + "/first/", server.url + "/second/"]
    path = download_file(remote_for(LABELS), mirrors, tmp_path, quiet=True, backoff=0)
    assert path.read_bytes() == LABELS
    assert server.requests == ["/first/train-labels-idx1-ubyte.gz",
                               "/second/train-labels-idx1-ubyte.gz"]
    assert_only(tmp_path, {path.name})


def test_bad_checksum_on_first_mirror_falls_back_to_second(server, tmp_path):
    server.files["/first/train-labels-idx1-ubyte.gz"] = LABELS[:-1] + b"\x00"
    server.files["/second/train-labels-idx1-ubyte.gz"] = LABELS
    mirrors = [server.url + "/first/", server.url + "/second/"]
    path = download_file(remote_for(LABELS), mirrors, tmp_path, quiet=True, backoff=0)
    assert path.read_bytes() == LABELS


def test_connection_dropped_every_time_leaves_nothing(server, tmp_path):
    server.files["/a/train-labels-idx1-ubyte.gz"] = LABELS
    server.drop["/a/train-labels-idx1-ubyte.gz"] = 99
    with pytest.raises(DatasetError, match="attempt 3") as caught:
        download_file(remote_for(LABELS), [server.url + "/a/"], tmp_path, quiet=True,
                      retries=3, backoff=0)
    assert "train-labels-idx1-ubyte.gz" in str(caught.value)
    assert len(server.requests) == 3
    assert_only(tmp_path, set())


def test_connection_dropped_once_is_retried(server, tmp_path):
    server.files["/a/train-labels-idx1-ubyte.gz"] = LABELS
    server.drop["/a/train-labels-idx1-ubyte.gz"] = 1
    path = download_file(remote_for(LABELS), [server.url + "/a/"], tmp_path, quiet=True,
                         backoff=0)
    assert path.read_bytes() == LABELS
    assert len(server.requests) == 2
    assert_only(tmp_path, {path.name})


def test_timeout_moves_on(server, tmp_path):
    server.files["/slow/train-labels-idx1-ubyte.gz"] = LABELS
    server.stall["/slow/train-labels-idx1-ubyte.gz"] = 5.0
    server.files["/fast/train-labels-idx1-ubyte.gz"] = LABELS
    path = download_file(remote_for(LABELS), [server.url + "/slow/", server.url + "/fast/"],
                         tmp_path, quiet=True, timeouts=Timeouts(stall=0.3), retries=1, backoff=0)
    assert path.read_bytes() == LABELS
    assert_only(tmp_path, {path.name})


def test_interrupt_mid_download_removes_the_temporary_file(tmp_path, monkeypatch):
    def interrupted_fetch(url, output, timeouts, deadline, quiet):
        output.write(LABELS[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_fetch", interrupted_fetch)
    with pytest.raises(KeyboardInterrupt):
        download_file(remote_for(LABELS), ["http://127.0.0.1:9/"], tmp_path, quiet=True)
    assert_only(tmp_path, set())


def test_existing_file_is_kept_and_untouched(server, tmp_path):
    # An existing file (e.g. a recompressed copy with another MD5) is not re-downloaded.
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"mine")
    files = [remote_for(LABELS)]
    download_dataset("mnist", tmp_path, mirrors=[server.url + "/"], files=files, quiet=True)
    assert server.requests == []
    assert (tmp_path / "train-labels-idx1-ubyte.gz").read_bytes() == b"mine"


def serve_synthetic(server: LocalServer, tmp_path: Path, prefix: str = "/mirror/") -> tuple:
    arrays = synthetic_dataset(tmp_path / "upstream")
    files = []
    for stem in IDX_STEMS:
        data = (tmp_path / "upstream" / f"{stem}.gz").read_bytes()
        server.files[f"{prefix}{stem}.gz"] = data
        files.append(remote_for(data, f"{stem}.gz"))
    return arrays, files


def test_download_dataset_then_load_through_env_mirrors(server, tmp_path, monkeypatch):
    arrays, files = serve_synthetic(server, tmp_path, prefix="/mnist/")
    monkeypatch.setenv("SCRATCHCNN_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setenv("SCRATCHCNN_MIRRORS", f"{server.url}/nothing-here/, {server.url}/{{name}}/")
    monkeypatch.setitem(sources.REMOTE_DATASETS, "mnist",
                        sources.RemoteDataset("mnist", ("http://unused.invalid/",), tuple(files)))
    dataset = load_dataset("mnist")
    assert dataset.source == str(tmp_path / "data" / "mnist")
    np.testing.assert_array_equal(dataset.train_images[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(dataset.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert_only(tmp_path / "data" / "mnist", {f"{stem}.gz" for stem in IDX_STEMS})
    # A second load finds the files and makes no further requests.
    count = len(server.requests)
    load_dataset("mnist")
    assert len(server.requests) == count


def test_failed_dataset_download_says_what_to_do(server, tmp_path):
    _, files = serve_synthetic(server, tmp_path)
    with pytest.raises(DatasetError, match="SCRATCHCNN_MIRRORS") as caught:
        download_dataset("mnist", tmp_path / "dest", mirrors=[server.url + "/wrong/"],
                         files=files, quiet=True, backoff=0)
    assert "HTTP 404" in str(caught.value)
    assert_only(tmp_path / "dest", set())


def test_failed_download_removes_the_directories_it_created(server, tmp_path):
    _, files = serve_synthetic(server, tmp_path)
    with pytest.raises(DatasetError, match="could not download"):
        download_dataset("mnist", tmp_path / "new" / "dest", mirrors=[server.url + "/wrong/"],
                         files=files, quiet=True, backoff=0)
    assert not (tmp_path / "new").exists()
    # A directory that was there before stays, even empty.
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetError, match="could not download"):
        download_dataset("mnist", tmp_path / "mine", mirrors=[server.url + "/wrong/"],
                         files=files, quiet=True, backoff=0)
    assert_only(tmp_path / "mine", set())


def test_failed_download_keeps_a_created_directory_that_holds_files(server, tmp_path):
    _, files = serve_synthetic(server, tmp_path)
    del server.files["/mirror/t10k-images-idx3-ubyte.gz"]  # the first two files arrive
    with pytest.raises(DatasetError, match="t10k-images"):
        download_dataset("mnist", tmp_path / "new", mirrors=[server.url + "/mirror/"],
                         files=files, quiet=True, backoff=0)
    assert_only(tmp_path / "new", {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"})


def test_a_directory_where_a_file_belongs_is_named_before_any_download(server, tmp_path):
    _, files = serve_synthetic(server, tmp_path)
    (tmp_path / "dest" / "t10k-images-idx3-ubyte.gz").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz is a directory"):
        download_dataset("mnist", tmp_path / "dest", mirrors=[server.url + "/mirror/"],
                         files=files, quiet=True)
    assert server.requests == []


def test_mirror_list_sources():
    assert mirrors_for("mnist", ["http://a/x", "http://b/{name}/"]) == (
        "http://a/x/", "http://b/mnist/")


def test_env_mirrors_replace_builtin(monkeypatch):
    monkeypatch.setenv("SCRATCHCNN_MIRRORS", " http://one/ ,http://two/{name}")
    assert mirrors_for("fashion-mnist") == ("http://one/", "http://two/fashion-mnist/")
    monkeypatch.delenv("SCRATCHCNN_MIRRORS")
    assert mirrors_for("fashion-mnist") == sources.REMOTE_DATASETS["fashion-mnist"].mirrors


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST not present at {SHARED_MNIST}")
def test_builtin_decompressed_checksums_match_real_mnist():
    for remote in sources.REMOTE_DATASETS["mnist"].files:
        with gzip.open(SHARED_MNIST / remote.filename) as stream:
            assert hashlib.sha256(stream.read()).hexdigest() == remote.sha256_decompressed


# ----------------------------------------------------------------- a first run on a bad network

# Small limits keep these tests fast; test_default_timeouts_meet_the_targets checks the real ones.
FAST = Timeouts(connect=0.5, stall=0.5, deadline=1.2)
# Generous room for thread scheduling on a busy machine, yet well below any limit doubling.
SLACK = 0.6
UNRESOLVABLE = "http://mirror.scratchcnn.invalid/"


class MisbehavingMirror:
    """A mirror on 127.0.0.1 that misbehaves as ``behaviour`` says: "silent" accepts connections
    and never answers; "headers" sends the response headers, then nothing; "half-body" sends the
    headers and half the body, then nothing; "slow" sends the whole body in ``pieces`` parts,
    ``gap`` seconds apart. Connections are held open until the test ends."""

    def __init__(self, behaviour: str, body: bytes = LABELS, pieces: int = 8,
                 gap: float = 0.0) -> None:
        self.behaviour, self.body, self.pieces, self.gap = behaviour, body, pieces, gap
        self.connections = 0
        self.released = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # so that the accepting thread notices the release
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> MisbehavingMirror:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.thread.join()
        self.listener.close()

    def _accept(self) -> None:
        while not self.released.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            if self.behaviour != "silent":
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(4096)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: "
                                   + str(len(self.body)).encode() + b"\r\n\r\n")
            if self.behaviour == "half-body":
                connection.sendall(self.body[: len(self.body) // 2])
            if self.behaviour == "slow":
                size = -(-len(self.body) // self.pieces)
                for start in range(0, len(self.body), size):
                    connection.sendall(self.body[start:start + size])
                    time.sleep(self.gap)
                return
            self.released.wait()


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A port on 127.0.0.1 that refuses connections: bound, so nothing else takes it, but not
    listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"


def timed_failure(mirrors: list[str], directory: Path, **options) -> tuple[float, str]:
    """Seconds until download_file gave up on ``mirrors``, and its error message."""
    start = time.monotonic()
    with pytest.raises(DatasetError) as caught:
        download_file(remote_for(LABELS), mirrors, directory, **options)
    return time.monotonic() - start, str(caught.value)


def wait_for_abandoned_workers() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("download "):
            thread.join(timeout=5)


def test_default_timeouts_meet_the_targets():
    defaults = Timeouts()
    most_mirrors = max(len(dataset.mirrors) for dataset in sources.REMOTE_DATASETS.values())
    # Refused and unknown hosts are not waited for nor retried; a DNS server that never answers
    # costs one connect timeout per mirror.
    assert most_mirrors * defaults.connect <= 10
    # Stalling mirrors: no attempt starts after the deadline, and one that received part of the
    # body by then is given up on at its next stall.
    assert defaults.deadline + defaults.stall + sources.POLL_INTERVAL <= 30
    # ...and before the deadline, each built-in mirror can stall once.
    assert defaults.deadline >= most_mirrors * defaults.stall


def test_refused_and_unknown_hosts_fall_back_at_once(refusing_url, tmp_path):
    # The default timeouts and backoff: a retry of a refused connection would cost seconds here.
    elapsed, message = timed_failure([refusing_url, UNRESOLVABLE, refusing_url], tmp_path,
                                     quiet=True)
    assert elapsed < 2, f"took {elapsed:.1f} s (target: 10 s)"
    assert message.count("Connection refused") == 2
    assert "cannot connect to mirror.scratchcnn.invalid (Name or service not known)" in message
    assert "attempt 2" not in message
    assert_only(tmp_path, set())


@pytest.mark.parametrize("behaviour", ["silent", "headers", "half-body"])
def test_stalling_mirrors_are_given_up_on_by_the_deadline(behaviour, tmp_path):
    with MisbehavingMirror(behaviour) as first, MisbehavingMirror(behaviour) as second, \
            MisbehavingMirror(behaviour) as third, MisbehavingMirror(behaviour) as fourth:
        mirrors = [first.url, second.url, third.url, fourth.url]
        elapsed, message = timed_failure(mirrors, tmp_path, quiet=True, timeouts=FAST)
        counts = [mirror.connections for mirror in (first, second, third, fourth)]
    # Two stall timeouts, then the third mirror is cut at the deadline; if it was receiving the
    # body, at its stall timeout instead. The fourth is never tried.
    assert 2 * FAST.stall <= elapsed <= FAST.deadline + FAST.stall + SLACK, f"{elapsed:.2f} s"
    assert counts == [1, 1, 1, 0]  # a stall moves on, it is not retried
    assert message.count("gave up on 127.0.0.1") == 3
    assert f"{fourth.url}train-labels-idx1-ubyte.gz: not tried" in message
    assert "SCRATCHCNN_DOWNLOAD_TIMEOUTS" in message
    wait_for_abandoned_workers()
    assert_only(tmp_path, set())  # nothing partial, even once the abandoned workers ended


def test_every_kind_of_bad_mirror_in_one_list(refusing_url, tmp_path):
    timeouts = Timeouts(connect=0.5, stall=0.5, deadline=2.0)
    with MisbehavingMirror("silent") as silent, MisbehavingMirror("headers") as headers, \
            MisbehavingMirror("half-body") as half_body:
        mirrors = [refusing_url, UNRESOLVABLE, silent.url, headers.url, half_body.url]
        elapsed, message = timed_failure(mirrors, tmp_path, quiet=True, timeouts=timeouts)
    assert 3 * timeouts.stall <= elapsed <= 3 * timeouts.stall + SLACK, f"{elapsed:.2f} s"
    assert "Connection refused" in message and "Name or service not known" in message
    assert "(connected, no answer yet) after 0.5 s" in message
    assert "(answered, no data yet) after 0.5 s" in message
    assert f"(stalled after {len(LABELS) // 2:,} bytes) after 0.5 s" in message
    assert_only(tmp_path, set())


def test_a_dns_lookup_that_hangs_is_cut_at_the_connect_timeout(tmp_path, monkeypatch):
    # Socket timeouts do not cover the lookup; the download's own clock does.
    answer = threading.Event()
    resolve = socket.getaddrinfo

    def hanging_resolver(host, *args, **kwargs):
        if host == "hanging.invalid":
            answer.wait()
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging_resolver)
    try:
        elapsed, message = timed_failure(["http://hanging.invalid/"], tmp_path, quiet=True,
                                         timeouts=FAST)
    finally:
        answer.set()
    assert FAST.connect <= elapsed <= FAST.connect + SLACK, f"{elapsed:.2f} s"
    assert "gave up on hanging.invalid (connecting) after 0.5 s" in message


def test_slow_but_steady_download_outlives_the_deadline(tmp_path):
    timeouts = Timeouts(connect=0.5, stall=0.5, deadline=0.3)
    with MisbehavingMirror("slow", pieces=5, gap=0.15) as mirror:
        start = time.monotonic()
        path = download_file(remote_for(LABELS), [mirror.url], tmp_path, quiet=True,
                             timeouts=timeouts)
        elapsed = time.monotonic() - start
    assert elapsed > timeouts.deadline  # no total cap: only the gaps between bytes count
    assert path.read_bytes() == LABELS
    assert_only(tmp_path, {path.name})


def test_timeouts_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.TIMEOUTS_VARIABLE, " connect=0.5, stall = 0.3,")
    assert Timeouts.from_environment() == Timeouts(connect=0.5, stall=0.3)
    with MisbehavingMirror("silent") as mirror:
        elapsed, _ = timed_failure([mirror.url], tmp_path, quiet=True)
    assert elapsed <= 0.3 + SLACK
    for wrong in ("connect=fast", "speed=3", "stall=-1", "deadline=inf"):
        monkeypatch.setenv(sources.TIMEOUTS_VARIABLE, wrong)
        with pytest.raises(DatasetError, match="SCRATCHCNN_DOWNLOAD_TIMEOUTS="):
            Timeouts.from_environment()


def test_a_wait_gets_one_line_in_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "WAITING_NOTICE_AFTER", 0.1)
    with MisbehavingMirror("silent") as mirror:
        timed_failure([mirror.url], tmp_path, timeouts=FAST)
    lines = capsys.readouterr().err.splitlines()
    waiting = [line for line in lines if line.startswith("waiting for")]
    assert waiting == [
        "waiting for 127.0.0.1 (connected, no answer yet, 0 s; gives up at 0.5 s)..."]
    assert lines[0] == f"Downloading {mirror.url}train-labels-idx1-ubyte.gz"


class FakeTerminal:
    """Stands in for stderr on a terminal, keeping what was written."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_a_wait_on_a_terminal_is_one_line_redrawn_then_erased(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "WAITING_NOTICE_AFTER", 0.1)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    timeouts = Timeouts(connect=0.5, stall=1.2, deadline=5)
    with MisbehavingMirror("silent") as silent, MisbehavingMirror("half-body") as half_body:
        timed_failure([silent.url, half_body.url], tmp_path, timeouts=timeouts)
    for seconds in (0, 1):  # redrawn as the seconds pass...
        assert (f"\rwaiting for 127.0.0.1 (connected, no answer yet, {seconds} s; gives up at "
                "1.2 s)...\033[K") in terminal.text
    first_attempt = terminal.text.split("Downloading ")[1]
    assert first_attempt.endswith("\r\033[K")  # ...and erased
    assert first_attempt.count("\n") == 1  # the "Downloading" line's own: no line per redraw
    # Once the body is arriving, the progress bar says it.
    assert f"waiting for 127.0.0.1 (stalled after {len(LABELS) // 2:,} bytes" in terminal.text


def test_the_mirror_that_worked_is_asked_first_for_the_other_files(server, tmp_path):
    _, files = serve_synthetic(server, tmp_path)
    with MisbehavingMirror("silent") as silent:
        download_dataset("mnist", tmp_path / "dest", mirrors=[silent.url, server.url + "/mirror/"],
                         files=files, quiet=True, timeouts=FAST)
        assert silent.connections == 1
    assert_only(tmp_path / "dest", {f"{stem}.gz" for stem in IDX_STEMS})
