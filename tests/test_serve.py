"""``scratchcnn serve`` without a browser: the API through Starlette's TestClient, the report
reader, where the checkpoint and report are found, and the command's checks.
(tests/test_serve_browser.py drives the page in Chromium.)"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("starlette", reason="serve needs the serve extra (starlette)")
pytest.importorskip("uvicorn", reason="serve needs the serve extra (uvicorn)")
if importlib.util.find_spec("httpx2") is None and importlib.util.find_spec("httpx") is None:
    pytest.skip("Starlette's TestClient needs httpx2 (or httpx)", allow_module_level=True)
PIL = pytest.importorskip("PIL", reason="serve needs Pillow")

from PIL import Image, ImageDraw  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from blas_rounding import assert_same_products  # noqa: E402
from scratchcnn import nn  # noqa: E402
from scratchcnn.cli import CommandError  # noqa: E402
from scratchcnn.cli import serve as serve_command  # noqa: E402
from scratchcnn.data import normalize  # noqa: E402
from scratchcnn.formats.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from scratchcnn.models import build_model  # noqa: E402
from scratchcnn.serve.app import MAX_BODY, create_app  # noqa: E402
from scratchcnn.serve.inference import Predictor, decode_image, mnist_like  # noqa: E402
from scratchcnn.serve.locate import newest_checkpoint, newest_compare_report  # noqa: E402
from scratchcnn.serve.report import load_report, parse_markdown  # noqa: E402

CLASSES = [str(i) for i in range(10)]


# -- helpers shared with test_serve_browser.py ----------------------------------------------------


def make_checkpoint(path, model_name: str = "simple-cnn", seed: int = 0):
    """A freshly initialised model saved with the checkpoint API (no training needed)."""
    model = build_model(model_name, rng=seed)
    metadata = {"architecture": model_name, "dataset": "mnist", "classes": CLASSES,
                "normalization": {"mean": 0.1307, "std": 0.3081}, "dtype": "float32",
                "epoch": 1}
    return save_checkpoint(path, model.state_dict(), metadata)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_report(directory):
    """A small fake compare report: report.json, report.md with a table and a list, one plot
    (plus a file that is not a PNG, which must not be served)."""
    directory.mkdir(parents=True, exist_ok=True)
    plot = Image.new("RGB", (60, 40), (30, 90, 200))
    ImageDraw.Draw(plot).line([(0, 0), (59, 39)], fill=(255, 255, 255), width=3)
    (directory / "curves.png").write_bytes(png_bytes(plot))
    (directory / "notes.png").write_text("not a PNG at all")
    (directory / "report.json").write_text(json.dumps(
        {"plots": {"curves": "curves.png", "notes": "notes.png", "escape": "../secret.png"}}))
    (directory / "report.md").write_text(
        "# scratchcnn compare: simple-cnn on mnist\n\n"
        "- Command: `scratchcnn compare --epochs 1`\n"
        "- a wrapped\n  list item\n\n"
        "## Summary\n\n"
        "| Metric | numpy | torch |\n|---|---|---|\n| Test accuracy | 98.97% | 98.96% |\n"
        "| a \\| pipe | [link](x.md) | **bold** |\n\n"
        "## Plots\n\n![curves](curves.png)\n![missing](missing.png)\n\n"
        "Some closing text\nover two lines.\n")
    return directory


def digit_png(size: int = 280) -> bytes:
    """A dark '7' drawn on white paper, as the page's canvas would send it."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    scale = size / 280
    draw.line([(70 * scale, 60 * scale), (210 * scale, 60 * scale), (120 * scale, 230 * scale)],
              fill="black", width=round(20 * scale), joint="curve")
    return png_bytes(image)


def data_url(content: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(content).decode()


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    checkpoint = load_checkpoint(make_checkpoint(root / "runs" / "t" / "last.npz"))
    report = load_report(make_report(root / "report"))
    predictor = Predictor(checkpoint, torch=True)
    return checkpoint, predictor, report


@pytest.fixture(scope="module")
def client(served):
    _, predictor, report = served
    app = create_app(predictor, report)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


# -- the prediction endpoint ----------------------------------------------------------------------


def test_prediction_equals_running_the_model_directly(served, client):
    checkpoint, predictor, _ = served
    content = digit_png()
    response = client.post("/api/predict", json={"image": data_url(content)})
    assert response.status_code == 200, response.text
    result = response.json()

    # The same steps done by hand: decode, make MNIST-like, normalise, model(x), softmax.
    gray = np.asarray(Image.open(io.BytesIO(content)).convert("L"))
    pixels = mnist_like(gray)
    x = normalize(pixels[None, None], checkpoint.mean, checkpoint.std, dtype=checkpoint.dtype)
    model = checkpoint.build_model()
    model.eval()
    with nn.no_grad():
        logits = np.asarray(model(x), dtype=np.float64)[0]
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()

    # The page runs the layers one by one to show their feature maps; model(x) runs fused steps.
    assert_same_products(np.array(result["numpy"]["probabilities"]), expected,
                         computed_in=checkpoint.dtype)
    assert result["numpy"]["index"] == int(expected.argmax())
    assert result["numpy"]["label"] == CLASSES[int(expected.argmax())]
    assert abs(sum(result["numpy"]["probabilities"]) - 1) <= 1e-12
    assert result["numpy"]["milliseconds"] > 0
    seen = np.frombuffer(base64.b64decode(result["input"]["data"]), dtype=np.uint8)
    np.testing.assert_array_equal(seen.reshape(28, 28), pixels)

    # One feature map per Conv2d: simple-cnn's 16 x 28 x 28 and 32 x 14 x 14.
    shapes = [(m["layer"], m["channels"], m["height"], m["width"])
              for m in result["feature_maps"]]
    assert shapes == [("0", 16, 28, 28), ("3", 32, 14, 14)]
    first = np.frombuffer(base64.b64decode(result["feature_maps"][0]["data"]), dtype=np.uint8)
    with nn.no_grad():
        conv = np.asarray(dict(model.named_children())["0"](x))[0]
    channel = conv[0].astype(np.float64)
    stretched = np.rint((channel - channel.min()) / (channel.max() - channel.min()) * 255)
    np.testing.assert_array_equal(first.reshape(16, 28, 28)[0], stretched.astype(np.uint8))

    if predictor.twin is None:
        assert result["torch"] is None
    else:
        np.testing.assert_allclose(result["torch"]["probabilities"], expected, atol=1e-5)
        assert result["torch"]["index"] == result["numpy"]["index"]


def test_a_jpeg_and_a_transparent_png_are_read_like_predict_reads_files(served, client):
    image = Image.open(io.BytesIO(digit_png())).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    response = client.post("/api/predict", json={"image": base64.b64encode(buffer.getvalue())
                                                 .decode()})
    assert response.status_code == 200
    # Black ink on a transparent canvas: transparent counts as white paper.
    ink = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    ImageDraw.Draw(ink).line([(50, 10), (50, 90)], fill=(0, 0, 0, 255), width=8)
    decoded = decode_image(data_url(png_bytes(ink)))
    assert decoded[0, 0] == 255 and decoded[50, 50] == 0


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height 8-bit gray pixels, with one row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1001)) + chunk(b"IEND", b""))


def _too_large_stream():
    for _ in range(40):
        yield b"x" * 100_000


BAD_REQUESTS = {
    "not an image": (dict(json={"image": base64.b64encode(b"GIF89a? no, text").decode()}),
                     422, "not a PNG or JPEG"),
    "not base64": (dict(json={"image": "data:image/png;base64,***"}), 422, "base64"),
    "a data URL without base64": (dict(json={"image": "data:image/png,abc"}), 422, "base64"),
    "image not a string": (dict(json={"image": [1, 2, 3]}), 422, "must be a string"),
    "too small": (dict(json={"image": data_url(png_bytes(Image.new("L", (5, 5))))}),
                  422, "5 x 5 pixels"),
    "too large": (dict(json={"image": data_url(png_bytes(Image.new("1", (4000, 30))))}),
                  422, "4000 x 30 pixels"),
    "declared 100000 x 100000": (dict(json={"image": data_url(png_declaring(100_000, 100_000))}),
                                 422, "the image is 100000 x 100000 pixels"),
    "deeply nested JSON": (dict(content=b'{"image":' + b"[" * 100_000,
                                headers={"content-type": "application/json"}),
                           400, "nested too deeply"),
    "invalid JSON": (dict(content=b'{"image": ', headers={"content-type": "application/json"}),
                     400, "not valid JSON"),
    "not UTF-8": (dict(content=b'\xff\xfe{', headers={"content-type": "application/json"}),
                  400, "not valid JSON"),
    "JSON without image": (dict(json={"picture": "x"}), 422, "expected a JSON object"),
    "JSON list": (dict(json=[1, 2]), 422, "expected a JSON object"),
    "not JSON content type": (dict(content=b"{}", headers={"content-type": "text/plain"}),
                              415, "Content-Type: application/json"),
    "10 MB body": (dict(content=b"x" * (10 * 2**20), headers={"content-type": "application/json"}),
                   413, "the limit is"),
    "streamed body over the limit": (
        dict(content=_too_large_stream, headers={"content-type": "application/json"}),
        413, "over the limit"),
    "bad Content-Length": (dict(content=b"{}", headers={"content-type": "application/json",
                                                        "content-length": "-2"}),
                           400, "Content-Length"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(case, client):
    kwargs, status, message = BAD_REQUESTS[case]
    kwargs = dict(kwargs)
    if callable(kwargs.get("content")):
        kwargs["content"] = kwargs["content"]()
    response = client.post("/api/predict", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and message in body["error"]
    assert "\n" not in body["error"]
    good = client.post("/api/predict", json={"image": data_url(digit_png())})
    assert good.status_code == 200


def test_a_jpeg_declaring_a_huge_size_is_too_large_not_unreadable():
    buffer = io.BytesIO()
    Image.new("L", (40, 30), 255).save(buffer, "JPEG")
    jpeg = bytearray(buffer.getvalue())
    frame = jpeg.index(b"\xff\xc0")  # SOF0: length, precision, height, width
    jpeg[frame + 5: frame + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(ValueError, match="the image is too large; each side must be between"):
        decode_image(data_url(bytes(jpeg)))


def test_a_16_bit_png_is_read_like_its_8_bit_twin(client):
    # Gray paper (233) and ink (12): clipping 16-bit values instead of scaling made both white.
    light = np.asarray(Image.open(io.BytesIO(digit_png())).convert("L")) // 255 * 221 + 12
    wide = Image.fromarray((light.astype(np.uint16) * 257).astype(np.uint16))
    np.testing.assert_array_equal(decode_image(data_url(png_bytes(wide))), light)


def test_unknown_paths_and_methods_are_json_errors(client):
    for path, status in [("/nope", 404), ("/static/index.html", 404),
                         ("/static/..%2f__init__.py", 404), ("/api/report/plots/notes.png", 404),
                         ("/api/report/plots/..%2Fsecret.png", 404)]:
        response = client.get(path)
        assert response.status_code == status, path
        assert "error" in response.json()
    response = client.get("/api/predict")
    assert response.status_code == 405 and "GET is not allowed" in response.json()["error"]


def test_page_and_assets_are_served_locally_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    text = page.text + client.get("/static/app.js").text + client.get("/static/style.css").text
    assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_a_foreign_host_header_is_refused(served):
    _, predictor, report = served
    with TestClient(create_app(predictor, report), base_url="http://evil.example") as client:
        response = client.get("/api/info")
    assert response.status_code == 400 and "answers only to" in response.json()["error"]
    with TestClient(create_app(predictor, report, allowed_hosts=None),
                    base_url="http://evil.example") as client:
        assert client.get("/api/info").status_code == 200


def test_info_and_report_endpoints(client):
    info = client.get("/api/info").json()
    assert info["architecture"] == "simple-cnn" and info["classes"] == CLASSES
    report = client.get("/api/report").json()
    assert report["available"] and report["plots"] == ["curves.png"]
    image = client.get("/api/report/plots/curves.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG")


def test_no_report_shows_how_to_make_one(served):
    _, predictor, _ = served
    app = create_app(predictor, None, report_hint="make one with scratchcnn compare")
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get("/api/report").json() == {
            "available": False, "hint": "make one with scratchcnn compare"}
        assert client.get("/api/report/plots/curves.png").status_code == 404


def test_max_body_is_enforced_at_the_given_size(served):
    _, predictor, report = served
    app = create_app(predictor, report, max_body=100)
    with TestClient(app, base_url="http://localhost") as client:
        response = client.post("/api/predict", json={"image": data_url(digit_png())})
    assert response.status_code == 413
    assert MAX_BODY >= 64 * 1024  # room for a real canvas


# -- the report reader ----------------------------------------------------------------------------


def test_report_blocks_and_plot_whitelist(tmp_path):
    directory = make_report(tmp_path / "r")
    (tmp_path / "secret.png").write_bytes(png_bytes(Image.new("L", (30, 30))))
    (directory / "link.png").symlink_to(tmp_path / "secret.png")
    data = json.loads((directory / "report.json").read_text())
    data["plots"]["link"] = "link.png"
    (directory / "report.json").write_text(json.dumps(data))

    report = load_report(directory)
    assert sorted(report.plots) == ["curves.png"]  # not the text, the escape or the symlink
    types = [block["type"] for block in report.blocks]
    assert types == ["heading", "list", "heading", "table", "heading", "image", "paragraph",
                     "paragraph"]
    table = report.blocks[3]
    assert table["header"] == ["Metric", "numpy", "torch"]
    assert table["rows"] == [["Test accuracy", "98.97%", "98.96%"],
                             ["a | pipe", "link", "**bold**"]]
    assert report.blocks[1]["items"][1] == "a wrapped list item"
    assert report.blocks[6]["text"] == "(plot missing.png is not available)"
    assert report.blocks[7]["text"] == "Some closing text over two lines."


def test_the_real_compare_report_parses():
    directory = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "compare")
    if not os.path.isfile(os.path.join(directory, "report.json")):
        pytest.skip("benchmarks/results/compare is not in this checkout")
    report = load_report(directory)
    assert {"curves.png", "timing.png", "confusion.png"} <= set(report.plots)
    tables = [block for block in report.blocks if block["type"] == "table"]
    assert tables and tables[0]["header"] == ["Metric", "numpy", "torch"]


def test_parse_markdown_never_returns_html_only_text():
    blocks = parse_markdown("<script>alert(1)</script>\n\n| <b> |\n|---|\n| x |\n")
    assert blocks[0] == {"type": "paragraph", "text": "<script>alert(1)</script>"}
    assert blocks[1]["header"] == ["<b>"]  # the page puts it in a text node


def test_report_errors_are_one_line(tmp_path):
    from scratchcnn.serve.report import ReportError

    with pytest.raises(ReportError, match="no such directory"):
        load_report(tmp_path / "absent")
    with pytest.raises(ReportError, match=r"no report\.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{oops")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_report(tmp_path)


# -- where things are found, and the command ------------------------------------------------------


def test_newest_checkpoint_prefers_best_beside_the_newest(tmp_path):
    runs = tmp_path / "runs"
    assert newest_checkpoint(runs) is None
    old = make_checkpoint(runs / "old" / "last.npz")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert newest_checkpoint(runs) == old
    make_checkpoint(runs / "new" / "best.npz")
    last = make_checkpoint(runs / "new" / "last.npz")
    os.utime(last, (time.time() + 10, time.time() + 10))
    assert newest_checkpoint(runs) == runs / "new" / "best.npz"


def test_newest_compare_report(tmp_path):
    runs = tmp_path / "runs"
    assert newest_compare_report(runs) is None
    make_report(runs / "compare")
    newer = make_report(runs / "compare-2")
    os.utime(newer / "report.json", (time.time() + 10, time.time() + 10))
    make_report(runs / "other")  # not a compare* directory
    assert newest_compare_report(runs) == newer


def parse(argv):
    parser = argparse.ArgumentParser(prog="scratchcnn")
    serve_command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_no_checkpoint_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CommandError) as error:
        serve_command.run(parse([]))
    message = str(error.value)
    assert "none under runs/" in message and "\n" not in message
    assert "make one with `scratchcnn train --epochs 1 --out runs/train`" in message
    with pytest.raises(CommandError, match="--out elsewhere/train"):
        serve_command.run(parse(["--runs", "elsewhere"]))


def test_bad_report_dir_and_bad_port_are_refused(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "c.npz")
    with pytest.raises(CommandError, match=r"no report\.json"):
        serve_command.run(parse([str(checkpoint), "--report", str(tmp_path)]))
    with pytest.raises(SystemExit):
        parse(["--port", "70000"])
    assert "between 0 and 65535" in capsys.readouterr().err


def test_run_warns_off_loopback_and_serves_until_stopped(tmp_path, capsys, monkeypatch):
    import uvicorn

    served_with = {}

    def fake_run(self, sockets=None):
        served_with["app"] = self.config.app
        served_with["address"] = sockets[0].getsockname()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    make_checkpoint(tmp_path / "runs" / "a" / "last.npz")
    make_report(tmp_path / "runs" / "compare")
    args = parse(["--runs", str(tmp_path / "runs"), "--host", "0.0.0.0", "--port", "0",
                  "--no-torch"])
    assert serve_command.run(args) == 0
    out, err = capsys.readouterr()
    assert "warning: listening on 0.0.0.0" in err
    assert "last.npz" in out and str(tmp_path / "runs" / "compare") in out
    assert served_with["address"][0] == "0.0.0.0"
    assert served_with["app"].allowed_hosts is None

    assert serve_command.run(parse(["--runs", str(tmp_path / "runs"), "--port", "0",
                                    "--no-torch"])) == 0
    assert "warning" not in capsys.readouterr().err
    assert "127.0.0.1" in served_with["app"].allowed_hosts


def test_port_in_use_is_one_line(tmp_path):
    sock = serve_command.bind("127.0.0.1", 0)
    try:
        with pytest.raises(CommandError, match="choose another with --port"):
            serve_command.bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


def test_is_loopback():
    assert serve_command.is_loopback("127.0.0.1") and serve_command.is_loopback("localhost")
    assert serve_command.is_loopback("::1") and serve_command.is_loopback("[::1]")
    assert not serve_command.is_loopback("0.0.0.0") and not serve_command.is_loopback("10.1.2.3")


def test_an_internal_error_is_a_json_500_and_the_server_goes_on(served, monkeypatch):
    _, predictor, report = served
    app = create_app(predictor, report)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        with monkeypatch.context() as patch:
            patch.setattr(predictor, "predict", lambda pixels: 1 / 0)
            response = client.post("/api/predict", json={"image": data_url(digit_png())})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error (ZeroDivisionError); see the "
                                            "server's log"}
        assert client.post("/api/predict", json={"image": data_url(digit_png())}).status_code \
            == 200


# -- a real server: what only shows over a socket -------------------------------------------------


class LiveServer:
    """``app`` served by uvicorn on 127.0.0.1 in a thread, as ``scratchcnn serve`` serves it.
    ``raised``: the exceptions the app let out, each of which uvicorn logs with a traceback;
    ``answered``: released once per request the app has finished with."""

    def __init__(self, app) -> None:
        import uvicorn

        self.raised: list[BaseException] = []
        self.answered = threading.Semaphore(0)

        async def watched(scope, receive, send):
            try:
                await app(scope, receive, send)
            except BaseException as error:
                self.raised.append(error)
                raise
            finally:
                self.answered.release()

        self.sock = serve_command.bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(
            watched, log_config=None, log_level="critical", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def exchange(self, data: bytes) -> bytes:
        """Sends ``data`` and reads the answer until the server closes the connection."""
        with self.connect() as connection:
            connection.sendall(data)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        return answer


PREDICT_HEAD = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n")


def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_closes(served):
    _, predictor, report = served
    with LiveServer(create_app(predictor, report, body_timeout=0.3)) as live:
        start = time.monotonic()
        # 9 bytes of the 1000 announced; before the deadline this was held open for ever.
        answer = live.exchange(PREDICT_HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"image":')
        assert time.monotonic() - start < 4
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert b"connection: close" in head.lower()
        message = json.loads(body)["error"]
        assert "did not all arrive within 0.3 s" in message and "\n" not in message
        good = json.dumps({"image": data_url(digit_png())}).encode()
        answer = live.exchange(PREDICT_HEAD + b"Connection: close\r\nContent-Length: %d\r\n\r\n"
                               % len(good) + good)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert live.raised == []


def test_a_client_that_leaves_mid_body_is_not_a_server_error(served):
    _, predictor, report = served
    with LiveServer(create_app(predictor, report)) as live:
        with live.connect() as connection:
            connection.sendall(PREDICT_HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"image":')
            time.sleep(0.2)  # the app is waiting for the rest of the body
        assert live.answered.acquire(timeout=5), "the app did not finish the request"
        assert live.raised == []  # uvicorn logged each as "Exception in ASGI application"
        answer = live.exchange(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")


def test_the_scratchcnn_command_runs_serve_once_registered(tmp_path, capsys):
    from scratchcnn.cli import SUBCOMMAND_MODULES, main

    if "serve" not in SUBCOMMAND_MODULES:
        pytest.skip("cli/__init__.py does not list serve in SUBCOMMAND_MODULES yet")
    assert main(["serve", "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scratchcnn serve: error: no checkpoint given")
    assert err.count("\n") == 1
