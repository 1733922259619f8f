"""The Starlette application behind ``scratchcnn serve``.

Routes (everything else: 404 with a JSON error):

    GET  /                          the page (static/index.html)
    GET  /static/{name}             app.js, style.css: looked up in a dictionary read at start
    GET  /api/info                  the checkpoint: architecture, classes, layers, torch or not
    POST /api/predict               {"image": "data:image/png;base64,..."} -> predictions
    GET  /api/report                the compare report as blocks (see report.py)
    GET  /api/report/plots/{name}   one of the report's PNG plots, by whitelisted name

Every error is a 4xx (or 500) response with a JSON body ``{"error": "one line"}``. Request
bodies are limited to ``max_body`` bytes, refused by their Content-Length before anything is
read and, when the length is not announced, while they stream in; a body that has not arrived
``body_timeout`` seconds after its headers gets 408, so that a client which announces more than
it sends cannot hold one of the server's connections for ever. ``/api/predict`` takes only
``application/json``, so another web site cannot post to it from a visitor's browser without a
CORS preflight, which this server never approves. When it listens on a loopback address it also
answers only requests whose Host header names one (a defence against DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scratchcnn.serve.inference import InputError, Predictor, decode_image, mnist_like
from scratchcnn.serve.report import Report

MAX_BODY = 1024 * 1024  # a 280 x 280 canvas as a PNG data URL is 5-30 KB
DISCARD_LIMIT = 32 * 1024 * 1024  # see read_body
# A canvas's 5-30 KB arrive in well under a second, even from a phone on a slow network.
BODY_TIMEOUT = 10.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")

_STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class ApiError(Exception):
    """A request the server refuses: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, close: bool = False) -> JSONResponse:
    headers = {"connection": "close"} if close else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def load_static() -> dict[str, bytes]:
    """The page's files, read once from the package."""
    folder = resources.files("scratchcnn.serve") / "static"
    return {name: (folder / name).read_bytes() for name in _STATIC_TYPES}


async def read_body(request: Request, limit: int, timeout: float = BODY_TIMEOUT) -> bytes:
    """The request body, at most ``limit`` bytes; 413 when it is known to be longer, from its
    Content-Length before anything is kept, or as soon as a streamed body passes the limit;
    408 when it has not all arrived ``timeout`` seconds after this call.

    Before answering 413 the rest of a body up to ``DISCARD_LIMIT`` is read and thrown away (a
    "lingering close", as nginx does): a client that sends its whole body before it reads the
    answer (most do, e.g. Python's http.client) would otherwise have its connection reset under
    it and never see the 413. A longer body is not read at all, nor what is still missing when
    the deadline passes (the 413 goes out then)."""
    deadline = asyncio.get_running_loop().time() + timeout
    announced = request.headers.get("content-length")
    if announced is not None:
        if not announced.isdigit():
            raise ApiError(400, f"Content-Length {announced!r} is not a number of bytes")
        if int(announced) > limit:
            if int(announced) <= DISCARD_LIMIT:
                await _discard(request.stream(), DISCARD_LIMIT, deadline)
            raise ApiError(413, f"the request body is {int(announced):,} bytes; the limit is "
                                f"{limit:,}")
    stream = request.stream()
    try:
        body = await _before(deadline, _read_past(stream, limit))
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not all arrive within {timeout:g} s (is it "
                            "shorter than its Content-Length?); send the whole body at once"
                       ) from None
    if len(body) > limit:
        await _discard(stream, DISCARD_LIMIT - len(body), deadline)
        raise ApiError(413, f"the request body is over the limit of {limit:,} bytes")
    return body


async def _before(deadline: float, work: Any) -> Any:
    # wait_for rather than asyncio.timeout: the project supports Python 3.10.
    return await asyncio.wait_for(work, max(0.0, deadline - asyncio.get_running_loop().time()))


async def _read_past(stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The stream's bytes, stopping as soon as there are more than ``limit``."""
    body = bytearray()
    async for chunk in stream:
        body += chunk
        if len(body) > limit:
            break
    return bytes(body)


async def _discard(stream: AsyncIterator[bytes], budget: int, deadline: float) -> None:
    async def drain() -> None:
        left = budget
        async for chunk in stream:
            left -= len(chunk)
            if left < 0:
                return

    with contextlib.suppress(asyncio.TimeoutError):
        await _before(deadline, drain())


def create_app(
    predictor: Predictor,
    report: Report | None,
    *,
    report_hint: str = "",
    max_body: int = MAX_BODY,
    body_timeout: float = BODY_TIMEOUT,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
) -> Any:
    """The ASGI application. ``report`` None: the report view shows ``report_hint`` instead.
    ``allowed_hosts``: the Host header names answered (any port), None for any.
    ``body_timeout``: seconds a request body may take to arrive (see read_body)."""
    static = load_static()
    plots = dict(report.plots) if report is not None else {}

    async def page(request: Request) -> Response:
        return Response(static["index.html"], media_type=_STATIC_TYPES["index.html"])

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static or name == "index.html":
            raise ApiError(404, f"no static file {name!r}")
        return Response(static[name], media_type=_STATIC_TYPES[name])

    async def info(request: Request) -> Response:
        return JSONResponse(predictor.info())

    async def predict(request: Request) -> Response:
        # First: every refusal reads the body.
        body = await read_body(request, max_body, body_timeout)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, 'send JSON (Content-Type: application/json): {"image": '
                                '"data:image/png;base64,..."}')
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON ({error})") from None
        except RecursionError:
            # json's parser recurses once per nested [ or {: a few thousand exhaust the stack.
            raise ApiError(400, 'the body\'s JSON is nested too deeply; send {"image": '
                                '"data:image/png;base64,..."}') from None
        if not isinstance(payload, dict) or "image" not in payload:
            raise ApiError(422, 'expected a JSON object {"image": "data:image/png;base64,..."}')
        try:
            result = await run_in_threadpool(_predict_image, predictor, payload["image"])
        except InputError as error:
            raise ApiError(422, str(error)) from None
        return JSONResponse(result)

    async def report_view(request: Request) -> Response:
        if report is None:
            return JSONResponse({"available": False, "hint": report_hint})
        return JSONResponse(report.summary())

    async def plot(request: Request) -> Response:
        content = plots.get(request.path_params["name"])  # a dictionary, never a path
        if content is None:
            raise ApiError(404, "no such plot in the report")
        return Response(content, media_type="image/png")

    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        # After 408 or 413 the rest of the body may still be on its way: the connection cannot
        # carry another request.
        return error_response(error.status, error.message, close=error.status in (408, 413))

    async def client_gone(request: Request, error: Exception) -> Response:
        # A closed tab or a dropped network, not a server fault: a handler here keeps it from
        # reaching server_error, whose exception the server would log with a traceback. Nobody
        # reads the answer (the server drops it).
        return error_response(400, "the client closed the connection before sending its whole "
                                   "request body", close=True)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        messages = {404: f"no such page: {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(error.status_code, messages.get(error.status_code, error.detail))

    async def server_error(request: Request, error: Exception) -> Response:
        return error_response(500, f"internal error ({type(error).__name__}); see the "
                                   "server's log")

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/static/{name}", static_file),
            Route("/api/info", info),
            Route("/api/predict", predict, methods=["POST"]),
            Route("/api/report", report_view),
            Route("/api/report/plots/{name}", plot),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error,
                            ClientDisconnect: client_gone, Exception: server_error},
    )
    return _Guard(app, None if allowed_hosts is None else tuple(allowed_hosts))


def _predict_image(predictor: Predictor, image: Any) -> dict[str, Any]:
    return predictor.predict(mnist_like(decode_image(image)))


class _Guard:
    """ASGI middleware: refuses unexpected Host headers, adds the security headers."""

    def __init__(self, app: Any, allowed_hosts: tuple[str, ...] | None) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *_SECURITY_HEADERS]}
            await send(message)

        if self.allowed_hosts is not None:
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in self.allowed_hosts:
                response = error_response(
                    400, f"this server answers only to {', '.join(self.allowed_hosts)}, not "
                         f"Host {host!r}", close=True)
                await response(scope, receive, send_with_headers)
                return
        await self.app(scope, receive, send_with_headers)
