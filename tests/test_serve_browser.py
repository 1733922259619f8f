"""The draw-a-digit page in a real browser: Playwright driving Debian's Chromium against the
server (uvicorn, in a thread) on a free port of 127.0.0.1, then bad requests from a plain HTTP
client against the same live server. Skips when playwright or /usr/bin/chromium is missing."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytest.importorskip("starlette", reason="serve needs the serve extra (starlette)")
uvicorn = pytest.importorskip("uvicorn", reason="serve needs the serve extra (uvicorn)")
pytest.importorskip("PIL", reason="serve needs Pillow")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

from PIL import Image  # noqa: E402

from scratchcnn.formats.checkpoint import load_checkpoint  # noqa: E402
from scratchcnn.serve.app import create_app  # noqa: E402
from scratchcnn.serve.inference import Predictor  # noqa: E402
from scratchcnn.serve.report import load_report  # noqa: E402
from test_serve import data_url, digit_png, make_checkpoint, make_report, png_bytes  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(host, port) of a live server; stopped at the end of the module."""
    root = tmp_path_factory.mktemp("serve-browser")
    predictor = Predictor(load_checkpoint(make_checkpoint(root / "runs" / "t" / "last.npz")))
    report = load_report(make_report(root / "runs" / "compare"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from now on: no race with other tests
    sock.listen(64)
    config = uvicorn.Config(create_app(predictor, report), log_level="warning",
                            access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield sock.getsockname()[:2]
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def poll(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def post(server, body: bytes, content_type: str = "application/json", chunks=None):
    """(status, JSON body) of a POST /api/predict with a plain HTTP client."""
    connection = http.client.HTTPConnection(*server, timeout=20)
    try:
        headers = {"Content-Type": content_type}
        if chunks is not None:  # no Content-Length: the limit must hold while streaming
            connection.request("POST", "/api/predict", body=chunks, headers=headers,
                               encode_chunked=True)
        else:
            connection.request("POST", "/api/predict", body=body, headers=headers)
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_drawing_shows_predictions_and_the_report_shows_its_plots(server, browser):
    base = f"http://{server[0]}:{server[1]}"
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(base + "/")
    # Playwright's wait_for_function evaluates strings, which the page's CSP forbids (as it
    # should): waits go through locators and polling instead.
    sync_api.expect(page.locator("#model-info")).to_contain_text("simple-cnn")

    # Draw a '7' and a bar across it with the mouse.
    box = page.locator("#pad").bounding_box()

    def stroke(points):
        page.mouse.move(box["x"] + points[0][0] * box["width"],
                        box["y"] + points[0][1] * box["height"])
        page.mouse.down()
        for x, y in points[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=8)
        page.mouse.up()

    stroke([(0.25, 0.2), (0.75, 0.2), (0.4, 0.85)])
    stroke([(0.35, 0.5), (0.65, 0.5)])
    page.locator("#numpy-bars [data-probability]").first.wait_for(timeout=15000)
    page.wait_for_timeout(400)  # let the debounced last prediction land too

    for side in ("numpy", "torch"):
        probabilities = [float(value) for value in page.locator(
            f"#{side}-bars [data-probability]").evaluate_all(
            "nodes => nodes.map(n => n.dataset.probability)")]
        if side == "torch" and not probabilities:
            continue  # PyTorch not installed: the column is greyed out
        assert len(probabilities) == 10
        assert abs(sum(probabilities) - 1) <= 1e-6
        label = page.locator(f"#{side}-prediction").text_content()
        assert label == str(max(range(10), key=probabilities.__getitem__))
        assert page.locator(f"#{side}-time").text_content().endswith(" ms")
    assert page.locator("#feature-maps .layer").count() == 2
    assert page.locator("#feature-maps canvas").count() == 16 + 32
    assert page.locator("#status").text_content() == ""

    page.click("#tab-report")
    page.wait_for_selector("#report img[data-plot='curves.png']")
    poll(lambda: page.locator("#report img").evaluate_all(
        "images => images.every(i => i.complete && i.naturalWidth > 0)"))
    assert page.locator("#report img").evaluate("i => i.naturalWidth") == 60
    assert page.locator("#report table td").first.text_content() == "Test accuracy"
    assert "98.97%" in page.locator("#report table").text_content()

    page.click("#tab-draw")
    page.click("#clear")
    assert page.locator("#numpy-prediction").text_content() == "?"
    assert errors == []
    assert requested and all(url.startswith(base + "/") or url.startswith("data:")
                             for url in requested), requested
    page.close()


def test_drawing_with_a_finger(server, browser):
    """Real touch events (through the DevTools protocol) draw and predict as the mouse does."""
    base = f"http://{server[0]}:{server[1]}"
    context = browser.new_context(has_touch=True, viewport={"width": 800, "height": 900})
    page = context.new_page()
    page.goto(base + "/")
    sync_api.expect(page.locator("#model-info")).to_contain_text("simple-cnn")
    box = page.locator("#pad").bounding_box()
    devtools = context.new_cdp_session(page)
    points = [(0.5, 0.15 + 0.05 * i) for i in range(15)]
    for index, (x, y) in enumerate(points):
        kind = "touchStart" if index == 0 else "touchMove"
        devtools.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [
            {"x": box["x"] + x * box["width"], "y": box["y"] + y * box["height"]}]})
    devtools.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    page.locator("#numpy-bars [data-probability]").first.wait_for(timeout=15000)
    probabilities = page.locator("#numpy-bars [data-probability]").evaluate_all(
        "nodes => nodes.map(n => Number(n.dataset.probability))")
    assert abs(sum(probabilities) - 1) <= 1e-6
    context.close()


def test_bad_requests_to_the_live_server_and_it_goes_on(server):
    good = json.dumps({"image": data_url(digit_png())}).encode()
    cases = [
        ("not an image", json.dumps({"image": data_url(b"plain text, no picture")}).encode(),
         422),
        ("a wrong size", json.dumps({"image": data_url(png_bytes(Image.new("L", (8, 8))))})
         .encode(), 422),
        ("10 MB body", b"{" + b" " * (10 * 2**20) + b"}", 413),
        ("invalid JSON", b'{"image": "data:image/png;base64,', 400),
    ]
    for name, body, status in cases:
        got, answer = post(server, body)
        assert got == status, (name, answer)
        assert isinstance(answer.get("error"), str) and answer["error"], name
        assert post(server, good)[0] == 200, f"no answer after {name}"
    streamed = (b" " * 65536 for _ in range(40))  # 2.5 MB in chunks, no Content-Length
    got, answer = post(server, b"", chunks=streamed)
    assert got == 413 and "over the limit" in answer["error"]
    status, answer = post(server, good)
    assert status == 200 and abs(sum(answer["numpy"]["probabilities"]) - 1) <= 1e-6
