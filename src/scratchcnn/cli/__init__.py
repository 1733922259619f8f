"""The ``scratchcnn`` command line. Each subcommand lives in its own module of this package and
exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a function taking the
parsed arguments and returning an exit code. Heavy imports (torch, matplotlib) stay inside those
functions, so ``scratchcnn --help`` is instant."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import scratchcnn

# Order of appearance in --help.
SUBCOMMAND_MODULES = (
    "compare", "train", "evaluate", "predict", "convert", "onnx", "bench", "accuracy", "datasets",
    "serve",
)


# torch.manual_seed takes any unsigned 64-bit seed and NumPy's generators any non-negative int;
# both sides, resumed checkpoints and reports work up to 2**64 - 1 (tested end to end).
SEED_LIMIT = 2**64

# Seconds a rank other than 0 waits before saying an error (see _say_once): ample for mpiexec
# to end the job once rank 0 exits, short beside the job itself.
RANK_ERROR_DELAY = 2.0


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


# -- option types shared by the subcommands -------------------------------------------------


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type of counts (--epochs, --rounds, --limit-train, ...): an integer >= 1."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed(text: str) -> int:
    """argparse type of --seed: an integer with 0 <= seed < SEED_LIMIT, refused at parse time
    (rather than by NumPy or torch after the data has loaded)."""
    value = _whole_number(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be between 0 and 2**64 - 1 ({SEED_LIMIT - 1}), got {value}")
    return value


def seed_list(text: str) -> list[int]:
    """argparse type of --seeds: distinct seeds (see ``seed``) separated by commas."""
    parts = [part for part in text.split(",") if part.strip()]
    seeds = [seed(part) for part in parts]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"expected distinct non-negative integers separated by commas, got {text!r}")
    return seeds


def thread_count(text: str) -> int:
    """argparse type of --threads: from 1 to the available CPU cores (see
    ``harness.threads.threads_problem``), refused before any data loads or training starts."""
    from scratchcnn.harness.threads import threads_problem

    value = _whole_number(text)
    problem = threads_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


# -- optional packages, checked before the slow work that needs them ------------------------

# What a plain `pip install scratchcnn` lacks: import name -> (its name, how to install it).
OPTIONAL_PACKAGES = {
    "torch": ("PyTorch", "pip install 'torch==2.13.0' (the CPU build; an unpinned torch pulls "
                         "several GB of CUDA packages)"),
    "matplotlib": ("matplotlib", "pip install 'scratchcnn[plots]'"),
    "PIL": ("Pillow", "pip install 'scratchcnn[plots]'"),
}


def require(module: str, purpose: str, alternative: str = "") -> None:
    """CommandError, before any data loads, if the optional package ``module`` is not installed:
    ``purpose`` ("--framework torch") needs it; ``alternative`` is what to do instead."""
    if importlib.util.find_spec(module) is not None:
        return
    name, install = OPTIONAL_PACKAGES[module]
    raise CommandError(f"{name} is not installed, and {purpose} needs it; install it with "
                       f"{install}{f', or {alternative}' if alternative else ''}")


# -- output paths, checked before the slow work that fills them -----------------------------

# Directories check_output_dir/check_output_file created during this command: a command that
# fails before writing into them removes them again (``main``), so no empty --out is left.
_created_directories: list[Path] = []


def check_output_dir(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """The directory ``path``, created if missing (the command would create it anyway) and
    checked to be writable; CommandError naming ``option`` if it cannot be. Commands call it
    before loading data or training, so a bad path costs nothing."""
    if not os.fspath(path):  # Path("") is ".": the files would land where the user stands
        raise CommandError(f"{option} is empty; give a directory")
    path = Path(path)
    _usable_directory(path, f"{option} {path}", option, own=True)
    return path


def check_output_file(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """The file path ``path``, checked as ``check_output_dir`` checks a directory: it is not a
    directory and its parent directory exists (created if missing) and is writable."""
    path = Path(path)
    where = f"{option} {path}"
    if path.is_dir():
        raise CommandError(f"{where}: is a directory; give a file name, "
                           f"e.g. {option} {path / 'results.json'}")
    _usable_directory(path.parent, where, option, own=False)
    return path


def _usable_directory(directory: Path, where: str, option: str, own: bool) -> None:
    """Make ``directory`` exist and check it is writable; ``where`` starts every message and
    ``own`` says it names ``directory`` itself (else the messages name it)."""
    subject, label = ("", "the directory") if own else (f"{directory} ",
                                                        f"the directory {directory}")
    advice = f"choose another {option}"
    if directory.exists() and not directory.is_dir():
        kind = "a file, not a directory" if directory.is_file() else "not a directory"
        raise CommandError(f"{where}: {subject}exists and is {kind}; {advice}")
    missing = [path for path in (directory, *directory.parents) if not path.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _created_directories.extend(missing)  # innermost first, the order to remove them in
    except OSError as error:
        # A file further up the path makes mkdir fail with ENOTDIR or EEXIST: name it.
        blocker = next((parent for parent in directory.parents
                        if parent.exists() and not parent.is_dir()), None)
        if blocker is not None:
            raise CommandError(f"{where}: {blocker} is a file, not a directory; {advice}") \
                from None
        raise CommandError(f"{where}: cannot create {label} ({error.strerror or error}); "
                           f"{advice}") from None
    try:
        # What the atomic writes will do (a named temporary file, then a rename), minus the
        # rename; it leaves nothing behind.
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".scratchcnn-write-check-"):
            pass
    except OSError as error:
        raise CommandError(f"{where}: {label} is not writable ({error.strerror or error}); "
                           f"{advice}") from None


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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.argv = argv  # what a command re-run as MPI ranks passes on (``start_ranks``)
    _created_directories.clear()
    code = 1  # an exception that escapes the handlers below is a failure too
    try:
        code = _run_command(args)
    finally:
        if code != 0:
            _remove_empty_created_directories()
    from scratchcnn.harness import ranks

    if ranks.world_size() > 1:
        if code != 0:
            # The other ranks may be waiting for this one in a collective step: leave without
            # the group's orderly goodbye (which would wait for them), and mpiexec ends the job.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        ranks.stop_group()
    return code


def start_ranks(args: argparse.Namespace, threads: int | None) -> int | None:
    """Run the NumPy side of this command as N MPI ranks, N = ``threads`` (the threads PyTorch
    gets; None: all cores): outside an MPI job with N > 1, re-run the whole command under
    mpiexec and return its exit code; otherwise (one thread, already a rank, or MPI missing
    while N was only the default, which one line says) join the group if there is one and
    return None: the caller carries on in this process."""
    from scratchcnn.harness import ranks
    from scratchcnn.harness.threads import available_cores

    wanted = available_cores() if threads is None else threads
    try:
        code = ranks.relaunch(args.command, args.argv, wanted, explicit=threads is not None)
        if code is None:
            ranks.start(threads)
    except ValueError as error:
        raise CommandError(str(error)) from None
    return code


def _remove_empty_created_directories() -> None:
    """Remove the output directories this command created and left empty, innermost first."""
    for directory in _created_directories:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if empty: whatever the command did write stays
    _created_directories.clear()


def _run_command(args: argparse.Namespace) -> int:
    """``args.func(args)``'s exit code, with the errors users can act on as one-line messages."""
    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError) as error:
        # CommandError, DatasetError, CheckpointError, bad shapes: messages written for users.
        # SCRATCHCNN_DEBUG=1 shows the traceback too.
        if os.environ.get("SCRATCHCNN_DEBUG"):
            raise
        _say_once(f"scratchcnn {args.command}: error: {error}")
        return 2
    except KeyboardInterrupt:
        print(f"scratchcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as error:
        # Sizes the options allow but the machine cannot hold (bench --batch-sizes 10**9).
        if os.environ.get("SCRATCHCNN_DEBUG"):
            raise
        detail = f" ({error})" if str(error) else ""
        _say_once(f"scratchcnn {args.command}: error: out of memory{detail}; use smaller "
                  "sizes (batch size, images, --limit-train / --limit-test)")
        return 2
    except BrokenPipeError:
        # The reader went away (e.g. `scratchcnn evaluate ... | head`): stop quietly, and point
        # stdout at devnull so the interpreter's final flush doesn't fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as error:
        # A safety net behind the commands' own checks (a disk that fills up or a directory
        # removed mid-run): the system's one-line reason and the file, not a traceback.
        if os.environ.get("SCRATCHCNN_DEBUG"):
            raise
        _say_once(f"scratchcnn {args.command}: error: {describe_os_error(error)}")
        return 2


def _say_once(message: str) -> None:
    """``message`` on stderr once, when the command runs as MPI ranks too.

    Rank 0 says it at once. Another rank first waits a moment: an error every rank meets (a bad
    option) has by then ended the job through rank 0, which said it; an error only this rank
    meets is still said, naming the rank."""
    from scratchcnn.harness import ranks

    if ranks.is_main():
        print(message, file=sys.stderr, flush=True)
        return
    time.sleep(RANK_ERROR_DELAY)
    print(f"[rank {ranks.rank()}] {message}", file=sys.stderr, flush=True)


def describe_os_error(error: OSError) -> str:
    """``strerror: filename`` (``-> filename2`` for a rename), else the error's own text."""
    if not error.strerror:
        return str(error)
    text = error.strerror
    if error.filename is not None:
        text += f": {os.fsdecode(error.filename)}"
        if error.filename2 is not None:
            text += f" -> {os.fsdecode(error.filename2)}"
    return text
