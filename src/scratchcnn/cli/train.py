"""``scratchcnn train``: train one framework, writing a checkpoint after every epoch.

``OUT/last.npz`` is rewritten (atomically) after each epoch and ``OUT/best.npz`` whenever the
test accuracy improves. ``--resume CHECKPOINT`` continues that run to ``--epochs`` total epochs:
model, optimizer, epoch counter and random state are restored, and batch order is a pure function
of (seed, epoch), so stopping and resuming gives the same weights as one uninterrupted run.
A NaN or infinite loss stops the run (exit status 3) naming the epoch and step; the checkpoint of
the last completed epoch is kept.

The NumPy side runs as N MPI ranks, N = --threads (default: all cores), each on its part of
every batch with one BLAS thread (DistributedDataParallel; BatchNorm synchronised), as
`mpiexec -n N scratchcnn train ...` would run it; --threads 1 is one plain process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from scratchcnn.cli import seed, start_ranks, thread_count

EXIT_NON_FINITE = 3

# Run settings recorded in the checkpoint; on --resume they come from it.
DEFAULTS: dict[str, Any] = {
    "model": "simple-cnn",
    "dataset": "mnist",
    "batch_size": 64,
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "seed": 0,
    "limit_train": None,
    "limit_test": None,
    "dtype": "float32",
    "framework": "numpy",
    "augment": "none",
    "lr_schedule": "constant",
    "warmup_epochs": 0,
    "lr_step_size": None,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one framework and save checkpoints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", help=f"architecture (default {DEFAULTS['model']})")
    add("--dataset", help=f"mnist, fashion-mnist or mnist-sample (default {DEFAULTS['dataset']})")
    add("--data-dir", help="directory holding the IDX files (default: search the usual places)")
    add("--epochs", type=int, default=1, help="total number of epochs to reach (default 1)")
    add("--batch-size", type=int, help=f"default {DEFAULTS['batch_size']}")
    add("--optimizer", choices=("sgd", "adam", "adamw"), help="default sgd")
    add("--lr", type=float, help=f"learning rate (default {DEFAULTS['lr']})")
    add("--momentum", type=float, help="SGD momentum (default 0)")
    add("--weight-decay", type=float, help="default 0")
    from scratchcnn.cli.compare import add_training_recipe_options

    add_training_recipe_options(parser, defaults=False)
    add("--seed", type=seed,
        help="seed for initialisation, batch order and dropout, 0 to 2**64 - 1 (default 0)")
    add("--limit-train", type=int, help="use only the first N training images")
    add("--limit-test", type=int, help="use only the first N test images")
    add("--dtype", choices=("float32", "float64"), help="default float32")
    add("--framework", choices=("numpy", "torch"), help="default numpy")
    add("--out", help="directory for last.npz and best.npz (default: runs/<model>-<framework>, "
        "or the resumed checkpoint's directory)")
    add("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    add("--threads", type=thread_count,
        help="NumPy: run as this many MPI ranks of one BLAS thread each (1: one plain process); "
        "torch: its threads. At most the available cores (default: all of them)")
    add("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


# -- configuration --------------------------------------------------------------------------


def resolve_config(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The run settings: the command line over the defaults, or the checkpoint's on --resume
    (where an option that contradicts the checkpoint is an error rather than silently ignored)."""
    from scratchcnn.cli import CommandError
    from scratchcnn.harness.training import hyperparameter_problem

    given = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None}
    if saved is None:
        config = {**DEFAULTS, **given}
    else:
        config = {**DEFAULTS, **saved}
        clashes = [
            f"--{key.replace('_', '-')} {value} (checkpoint: {config[key]})"
            for key, value in given.items()
            if value != config[key]
        ]
        if clashes:
            raise CommandError(
                f"resuming keeps the checkpoint's settings, but {', '.join(clashes)} was given; "
                "drop these options or start a new run"
            )
    for key in ("batch_size", "limit_train", "limit_test", "lr_step_size"):
        if config[key] is not None and config[key] < 1:
            raise CommandError(f"--{key.replace('_', '-')} must be at least 1, got {config[key]}")
    if config["warmup_epochs"] < 0:
        raise CommandError(f"--warmup-epochs must be at least 0, got {config['warmup_epochs']}")
    # Checked here, before the data loads (which may mean a download), not by the optimizer.
    for key in ("lr", "momentum", "weight_decay"):
        problem = hyperparameter_problem(key, config[key])
        if problem:
            raise CommandError(f"--{key.replace('_', '-')} {problem}")
    # A schedule is laid out over the epochs of the first invocation (cosine reaches 0 there);
    # resuming towards a larger --epochs continues that schedule rather than re-planning it.
    config.setdefault("schedule_epochs", args.epochs)
    return config


# -- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from scratchcnn.cli import CommandError, check_output_dir, require
    from scratchcnn.harness.training import NonFiniteLossError
    from scratchcnn.harness.training_run import TrainingRun, load_resumable

    checkpoint = load_resumable(args.resume, args.framework) if args.resume else None
    config = resolve_config(args, checkpoint.metadata["config"] if checkpoint else None)
    if args.epochs < 1:
        raise CommandError(f"--epochs must be at least 1, got {args.epochs}")
    if config["framework"] == "torch":
        require("torch", "--framework torch", "use --framework numpy")
    if args.out:
        out = Path(args.out)
    elif checkpoint is not None:
        out = Path(args.resume).parent
    else:
        out = Path("runs") / f"{config['model']}-{config['framework']}"
    start_epoch = checkpoint.epoch if checkpoint else 0
    if start_epoch >= args.epochs:
        print(f"{args.resume} has already completed {start_epoch} epoch(s); "
              f"nothing to do for --epochs {args.epochs}")
        return 0
    check_output_dir(out)
    if config["framework"] == "numpy":
        code = start_ranks(args, args.threads)
        if code is not None:
            return code  # the ranks ran the command
    from scratchcnn.harness import ranks

    training_run = TrainingRun(
        config, out, data_dir=args.data_dir, checkpoint=checkpoint, threads=args.threads
    )
    say = print if ranks.is_main() else _silent
    resumed = training_run.resumed_ranks
    if resumed is not None and resumed != training_run.ranks:
        say(f"note: {args.resume} was trained as {resumed} rank(s), this run uses "
            f"{training_run.ranks}: it continues, but not bit-identically to an uninterrupted "
            "run")
    say(
        f"training {config['model']} ({config['framework']}, {config['dtype']}) on "
        f"{config['dataset']}: {len(training_run.train_x)} train / "
        f"{len(training_run.test_x)} test images, "
        f"{config['optimizer']} lr={config['lr']} ({_recipe(config)}), "
        f"batch {config['batch_size']}, "
        f"epochs {start_epoch + 1}..{args.epochs} -> {out}"
    )

    def progress(epoch: int, steps: int) -> _progress:
        return _progress(args, epoch, args.epochs, steps, ranks.is_main())

    try:
        for result in training_run.train(args.epochs, progress):
            say(
                f"epoch {result.epoch}/{args.epochs}: train loss {result.train_loss:.4f}, "
                f"test loss {result.test_loss:.4f}, test accuracy "
                f"{100 * result.test_accuracy:.2f}%, "
                f"{result.train_seconds:.1f} s{' (best)' if result.improved else ''}"
            )
    except NonFiniteLossError as error:
        last_saved = training_run.last_saved
        kept = (
            f"the last good checkpoint {last_saved} (epoch {training_run.completed_epochs}) "
            "is kept."
            if last_saved is not None
            else "No checkpoint was written."
        )
        if ranks.is_main():
            print(f"scratchcnn train: error: {error} {kept}", file=sys.stderr)
        return EXIT_NON_FINITE
    say(f"checkpoints: {training_run.last_path} (last), {training_run.best_path} "
          "(best test accuracy)")
    return 0


def _silent(*_: object, **__: object) -> None:
    """``print`` on the ranks other than 0."""


def _recipe(config: dict[str, Any]) -> str:
    parts = [f"{config['lr_schedule']} schedule"]
    if config["warmup_epochs"]:
        parts.append(f"{config['warmup_epochs']} warm-up epoch(s)")
    parts.append(f"augment {config['augment']}")
    return ", ".join(parts)


class _progress:
    """A tqdm bar over one epoch's steps showing the live loss (nothing with --no-progress or
    when stderr is not a terminal)."""

    def __init__(self, args: argparse.Namespace, epoch: int, epochs: int, steps: int,
                 main_rank: bool = True) -> None:
        self.enabled = main_rank and not args.no_progress and sys.stderr.isatty()
        self.description = f"epoch {epoch}/{epochs}"
        self.steps = steps
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=self.steps, desc=self.description, leave=False, file=sys.stderr)

        def advance(loss: float) -> None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
