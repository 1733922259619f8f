"""``scratchcnn serve [CHECKPOINT]``: a local web page where you draw a digit.

The page shows, while you draw, the NumPy model's prediction with every class's probability,
the PyTorch twin's answer beside it (when PyTorch is installed), the time each took and the
feature maps of each convolution; a second view shows a compare report's tables and plots.

Without CHECKPOINT it uses the newest checkpoint under runs/ (a best.npz beside it preferred);
without --report, the newest runs/compare*/report.json. It listens on 127.0.0.1 only, unless
--host says otherwise. Needs the serve extra: pip install 'scratchcnn[serve]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import socket
import sys
from pathlib import Path

SERVE_PACKAGES = ("starlette", "uvicorn", "PIL")
INSTALL = "pip install 'scratchcnn[serve]'"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="a local page to draw digits and see both models' predictions",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", nargs="?",
                        help="a .npz checkpoint (default: the newest under runs/)")
    parser.add_argument("--report", metavar="DIR",
                        help="a compare --out directory to show (default: the newest "
                             "runs/compare*/report.json)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_port, default=8000,
                        help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--runs", default="runs", metavar="DIR",
                        help="where to look for checkpoints and reports (default runs/)")
    parser.add_argument("--no-torch", action="store_true",
                        help="do not load the PyTorch twin even if PyTorch is installed")
    parser.set_defaults(func=run)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_packages() -> None:
    from scratchcnn.cli import CommandError

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join("Pillow" if name == "PIL" else name for name in missing)
        raise CommandError(f"serve needs {names}, which is not installed; install it with "
                           f"{INSTALL}")


def resolve_checkpoint(given: str | None, runs: Path) -> Path:
    """The checkpoint to serve: the one given, else the newest under ``runs``; CommandError with
    the one command that makes one when there is none."""
    from scratchcnn.cli import CommandError
    from scratchcnn.serve.locate import TRAIN_HINT, newest_checkpoint

    if given is not None:
        return Path(given)
    found = newest_checkpoint(runs)
    if found is None:
        command = TRAIN_HINT.format(runs=runs)
        raise CommandError(f"no checkpoint given and none under {runs}/; make one with "
                           f"`{command}` (about a minute; add --dataset mnist-sample when "
                           "offline), then run scratchcnn serve again")
    return found


def resolve_report(given: str | None, runs: Path):
    """(the Report or None, the hint shown in its place when None)."""
    from scratchcnn.cli import CommandError
    from scratchcnn.serve.locate import COMPARE_HINT, newest_compare_report
    from scratchcnn.serve.report import ReportError, load_report

    directory = Path(given) if given is not None else newest_compare_report(runs)
    if directory is None:
        command = COMPARE_HINT.format(runs=runs)
        return None, (f"No compare report under {runs}/. Make one with `{command}`, or "
                      "start the server with --report DIR (e.g. --report "
                      "benchmarks/results/compare in a checkout).")
    try:
        return load_report(directory), ""
    except ReportError as error:
        raise CommandError(str(error)) from None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; CommandError in one line if that fails."""
    from scratchcnn.cli import CommandError

    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise CommandError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        hint = "; choose another with --port" if port else ""
        raise CommandError(f"cannot listen on {host}:{port} ({error.strerror}){hint}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run(args: argparse.Namespace) -> int:
    from scratchcnn.cli import CommandError

    check_packages()
    runs = Path(args.runs)
    checkpoint_path = resolve_checkpoint(args.checkpoint, runs)
    report, hint = resolve_report(args.report, runs)
    if not args.no_torch and importlib.util.find_spec("torch") is None:
        print("scratchcnn serve: PyTorch is not installed: the page shows the NumPy model only",
              file=sys.stderr)

    import uvicorn

    from scratchcnn.formats.checkpoint import load_checkpoint
    from scratchcnn.serve.app import LOOPBACK_HOSTS, create_app
    from scratchcnn.serve.inference import Predictor

    predictor = Predictor(load_checkpoint(checkpoint_path), torch=not args.no_torch)
    local = is_loopback(args.host)
    app = create_app(predictor, report, report_hint=hint,
                     allowed_hosts=dict.fromkeys((*LOOPBACK_HOSTS, args.host.lower()))
                     if local else None)
    sock = bind(args.host, args.port)
    if not local:  # once the address is known to work
        print(f"scratchcnn serve: warning: listening on {args.host}, not 127.0.0.1: anyone who "
              "can reach this machine on that address can use the page (no login, no HTTPS)",
              file=sys.stderr)
    print(f"scratchcnn serve: {url_of(sock)} (checkpoint {checkpoint_path}, "
          f"report {report.directory if report else 'none'}); Ctrl+C stops", flush=True)
    # A request body that stops arriving is cut off by the app (serve.app.BODY_TIMEOUT, 408).
    # Headers that stop arriving are not: uvicorn has no deadline for them (timeout_keep_alive
    # starts only after a response, h11_max_incomplete_event_size bounds their size, not their
    # time), so 64 connections that never finish their headers hold every slot and the rest get
    # 503 until they close. Acceptable for the default 127.0.0.1; off loopback, put the page
    # behind a proxy that times headers out (e.g. nginx's client_header_timeout).
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            limit_concurrency=64)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except OSError as error:
        raise CommandError(f"the server stopped: {error}") from None
    finally:
        sock.close()
    return 0
