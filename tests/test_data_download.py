"""Downloads against a real HTTP server on 127.0.0.1: after every outcome the destination holds
either the complete, verified file or nothing at all (no partial or temporary files)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from scratchcnn.data import DatasetError, download_dataset, load_dataset, sources, write_idx
from scratchcnn.data.sources import IDX_STEMS, RemoteFile, download_file, mirrors_for

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


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
                         tmp_path, quiet=True, timeout=0.3, retries=1, backoff=0)
    assert path.read_bytes() == LABELS
    assert_only(tmp_path, {path.name})


def test_interrupt_mid_download_removes_the_temporary_file(tmp_path, monkeypatch):
    def interrupted_fetch(url, temporary, timeout, quiet):
        temporary.write_bytes(LABELS[:10])
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
