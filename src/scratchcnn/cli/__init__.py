"""The ``scratchcnn`` command line. Each subcommand lives in its own module of this package and
exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a function taking the
parsed arguments and returning an exit code. Heavy imports (torch, matplotlib) stay inside those
functions, so ``scratchcnn --help`` is instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import scratchcnn

# Order of appearance in --help.
SUBCOMMAND_MODULES = (
    "compare", "train", "evaluate", "predict", "convert", "bench", "accuracy", "datasets"
)


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchcnn",
        description="A CNN written from scratch in NumPy, compared side by side with PyTorch.",
    )
    parser.add_argument(
        "--version", action="version", version=f"scratchcnn {scratchcnn.__version__}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"scratchcnn.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"scratchcnn.cli.{name}":
                raise
            continue  # subcommand not written yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError) as error:
        # CommandError, DatasetError, CheckpointError, bad shapes: messages written for users.
        # SCRATCHCNN_DEBUG=1 shows the traceback too.
        if os.environ.get("SCRATCHCNN_DEBUG"):
            raise
        print(f"scratchcnn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scratchcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `scratchcnn evaluate ... | head`): stop quietly, and point
        # stdout at devnull so the interpreter's final flush doesn't fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
