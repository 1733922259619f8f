"""``scratchcnn train``: train one framework, writing a checkpoint after every epoch.

``OUT/last.npz`` is rewritten (atomically) after each epoch and ``OUT/best.npz`` whenever the
test accuracy improves. ``--resume CHECKPOINT`` continues that run to ``--epochs`` total epochs:
model, optimizer, epoch counter and random state are restored, and batch order is a pure function
of (seed, epoch), so stopping and resuming gives the same weights as one uninterrupted run.
A NaN or infinite loss stops the run (exit status 3) naming the epoch and step; the checkpoint of
the last completed epoch is kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

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
    add("--seed", type=int, help="seed for initialisation, batch order and dropout (default 0)")
    add("--limit-train", type=int, help="use only the first N training images")
    add("--limit-test", type=int, help="use only the first N test images")
    add("--dtype", choices=("float32", "float64"), help="default float32")
    add("--framework", choices=("numpy", "torch"), help="default numpy")
    add("--out", help="directory for last.npz and best.npz (default: runs/<model>-<framework>, "
        "or the resumed checkpoint's directory)")
    add("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    add("--threads", type=int, help="limit BLAS / torch threads")
    add("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


# -- configuration --------------------------------------------------------------------------


def resolve_config(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The run settings: the command line over the defaults, or the checkpoint's on --resume
    (where an option that contradicts the checkpoint is an error rather than silently ignored)."""
    from scratchcnn.cli import CommandError

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
    # A schedule is laid out over the epochs of the first invocation (cosine reaches 0 there);
    # resuming towards a larger --epochs continues that schedule rather than re-planning it.
    config.setdefault("schedule_epochs", args.epochs)
    return config


def optimizer_options(config: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"weight_decay": config["weight_decay"]}
    if config["optimizer"] == "sgd":
        options["momentum"] = config["momentum"]
    elif config["momentum"]:
        from scratchcnn.cli import CommandError

        raise CommandError("--momentum applies to --optimizer sgd only")
    return options


def load_data(
    dataset: str, data_dir: str | None, limit_train: int | None, limit_test: int | None
):
    from scratchcnn.data import load_dataset

    return load_dataset(dataset, data_dir).limit(train=limit_train, test=limit_test)


# -- framework specifics --------------------------------------------------------------------


class Run:
    """The model, optimizer and random state of one framework, with save/restore of all three."""

    def __init__(self, config: dict[str, Any]) -> None:
        from scratchcnn.harness.training import make_optimizer
        from scratchcnn.models import build_model

        self.config = config
        self.framework = config["framework"]
        self.rng = np.random.default_rng(config["seed"])
        # Both frameworks start from the same NumPy initialisation.
        numpy_model = build_model(config["model"], dtype=config["dtype"], rng=self.rng)
        if self.framework == "torch":
            import torch

            from scratchcnn.reference.torch_models import torch_twin

            torch.manual_seed(config["seed"])
            self.model = torch_twin(numpy_model, config["model"])
        else:
            self.model = numpy_model
        self.optimizer = make_optimizer(
            self.framework,
            self.model.parameters(),
            config["optimizer"],
            config["lr"],
            **optimizer_options(config),
        )
        from scratchcnn.harness.compare import make_lr_schedulers

        self.schedulers = make_lr_schedulers(
            self.framework, self.optimizer, config["lr_schedule"], config["schedule_epochs"],
            config["warmup_epochs"], config["lr_step_size"],
        )

    def model_state(self) -> dict[str, np.ndarray]:
        if self.framework == "torch":
            from scratchcnn.reference.torch_models import from_torch_state_dict

            # The NumPy BatchNorm keeps no step counter; neither does the checkpoint.
            state = from_torch_state_dict(self.model.state_dict())
            return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        return dict(self.model.state_dict())

    def random_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"numpy": self.rng.bit_generator.state}
        if self.framework == "torch":
            import torch

            state["torch"] = torch.get_rng_state().numpy().copy()
        return state

    def restore(self, checkpoint) -> None:
        if self.framework == "torch":
            import torch

            from scratchcnn.reference.torch_models import to_torch_state_dict

            self.model.load_state_dict(to_torch_state_dict(checkpoint.model_state), strict=False)
            torch.set_rng_state(torch.from_numpy(np.asarray(checkpoint.metadata["rng"]["torch"])))
        else:
            self.model.load_state_dict(checkpoint.model_state)
        # After the schedulers' construction (which writes the lr), as torch recommends.
        self.optimizer.load_state_dict(checkpoint.metadata["optimizer"]["state"])
        saved = checkpoint.metadata.get("lr_schedulers", [])
        if len(saved) != len(self.schedulers):
            raise ValueError(
                f"checkpoint has {len(saved)} lr scheduler state(s) but its settings need "
                f"{len(self.schedulers)}; it was not written by this version of scratchcnn train"
            )
        for scheduler, state in zip(self.schedulers, saved, strict=True):
            scheduler.load_state_dict(state)
        self.rng.bit_generator.state = checkpoint.metadata["rng"]["numpy"]


def tensor_hook_for(framework: str):
    if framework != "torch":
        return None
    import torch

    return lambda array: torch.from_numpy(np.array(array, copy=True))


# -- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from scratchcnn.cli import CommandError
    from scratchcnn.data import BatchSampler, compute_mean_std, normalize
    from scratchcnn.harness.checkpoint import load_checkpoint, save_checkpoint
    from scratchcnn.harness.compare import augmented_training_images
    from scratchcnn.harness.training import NonFiniteLossError, evaluate, train_epoch

    checkpoint = None
    if args.resume:
        framework = args.framework or _peek_framework(args.resume)
        checkpoint = load_checkpoint(args.resume, tensor_hook=tensor_hook_for(framework))
        if "config" not in checkpoint.metadata or "optimizer" not in checkpoint.metadata:
            raise CommandError(f"{args.resume}: has no training state to resume from")
    config = resolve_config(args, checkpoint.metadata["config"] if checkpoint else None)
    if args.epochs < 1:
        raise CommandError(f"--epochs must be at least 1, got {args.epochs}")
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

    # The data directory is where this machine keeps the files, not a setting of the run, but
    # resuming without repeating it is friendlier.
    data_dir = args.data_dir or (checkpoint.metadata.get("data_dir") if checkpoint else None)
    data = load_data(config["dataset"], data_dir, config["limit_train"], config["limit_test"])
    if checkpoint is not None:
        mean, std = checkpoint.mean, checkpoint.std
    else:
        mean, std = compute_mean_std(data.train_images)
    dtype = np.dtype(config["dtype"])
    train_x = normalize(data.train_images, mean, std, dtype=dtype)
    test_x = normalize(data.test_images, mean, std, dtype=dtype)
    sampler = BatchSampler(len(train_x), config["batch_size"], shuffle=True, seed=config["seed"])

    if args.threads is not None:
        from scratchcnn.harness.threads import apply_threads

        apply_threads(args.threads, torch=config["framework"] == "torch")
    state = Run(config)
    if checkpoint is not None:
        state.restore(checkpoint)
    history = list(checkpoint.metadata.get("history", [])) if checkpoint else []
    best = checkpoint.metadata.get("best_accuracy", -1.0) if checkpoint else -1.0
    print(
        f"training {config['model']} ({config['framework']}, {config['dtype']}) on "
        f"{config['dataset']}: {len(train_x)} train / {len(test_x)} test images, "
        f"{config['optimizer']} lr={config['lr']} ({_recipe(config)}), "
        f"batch {config['batch_size']}, "
        f"epochs {start_epoch + 1}..{args.epochs} -> {out}"
    )
    last_path = out / "last.npz"
    last_saved = Path(args.resume) if checkpoint is not None else None
    for epoch in range(start_epoch + 1, args.epochs + 1):
        batches = sampler.epoch(epoch)
        epoch_x = train_x
        if config["augment"] != "none":
            epoch_x = augmented_training_images(data.train_images, config["augment"],
                                                config["seed"], epoch, mean, std, dtype)
        started = time.perf_counter()
        try:
            # A diverging run overflows on its way to NaN; the loop reports that clearly.
            with _progress(args, epoch, args.epochs, len(batches)) as progress, \
                    np.errstate(over="ignore", invalid="ignore"):
                train_loss = train_epoch(
                    config["framework"], state.model, state.optimizer,
                    epoch_x, data.train_labels, batches, epoch=epoch, progress=progress,
                )
        except NonFiniteLossError as error:
            kept = (
                f"the last good checkpoint {last_saved} (epoch {epoch - 1}) is kept."
                if last_saved is not None
                else "No checkpoint was written."
            )
            print(f"scratchcnn train: error: {error} {kept}", file=sys.stderr)
            return EXIT_NON_FINITE
        train_seconds = time.perf_counter() - started
        lr = state.optimizer.param_groups[0]["lr"]
        for scheduler in state.schedulers:
            scheduler.step()
        result = evaluate(config["framework"], state.model, test_x, data.test_labels)
        record = {
            "epoch": epoch,
            "train_loss": _finite_or_none(train_loss),
            "test_loss": _finite_or_none(result.loss),
            "test_accuracy": result.accuracy,
            "train_seconds": train_seconds,
            "lr": lr,
        }
        history.append(record)
        improved = result.accuracy > best
        best = max(best, result.accuracy)
        metadata = {
            "architecture": config["model"],
            "dataset": config["dataset"],
            "classes": list(data.classes),
            "normalization": {"mean": float(mean), "std": float(std)},
            "dtype": config["dtype"],
            "epoch": epoch,
            "framework": config["framework"],
            "optimizer": {
                "name": config["optimizer"],
                "hyperparameters": {"lr": config["lr"], **optimizer_options(config)},
                "state": state.optimizer.state_dict(),
            },
            "lr_schedulers": [scheduler.state_dict() for scheduler in state.schedulers],
            "rng": state.random_state(),
            "config": config,
            "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
            "history": history,
            "best_accuracy": best,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        model_state = state.model_state()
        last_saved = save_checkpoint(last_path, model_state, metadata)
        if improved:
            save_checkpoint(out / "best.npz", model_state, metadata)
        print(
            f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f}, test loss "
            f"{result.loss:.4f}, test accuracy {100 * result.accuracy:.2f}%, "
            f"{train_seconds:.1f} s{' (best)' if improved else ''}"
        )
    print(f"checkpoints: {last_path} (last), {out / 'best.npz'} (best test accuracy)")
    return 0


def _recipe(config: dict[str, Any]) -> str:
    parts = [f"{config['lr_schedule']} schedule"]
    if config["warmup_epochs"]:
        parts.append(f"{config['warmup_epochs']} warm-up epoch(s)")
    parts.append(f"augment {config['augment']}")
    return ", ".join(parts)


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN; an infinite test loss of a still-finite training run is recorded as null.
    return value if np.isfinite(value) else None


def _peek_framework(path: str) -> str:
    """The framework a checkpoint was trained with, read without converting its arrays."""
    from scratchcnn.harness.checkpoint import load_checkpoint

    return load_checkpoint(path, check_model=False).metadata.get("framework", "numpy")


class _progress:
    """A tqdm bar over one epoch's steps showing the live loss (nothing with --no-progress or
    when stderr is not a terminal)."""

    def __init__(self, args: argparse.Namespace, epoch: int, epochs: int, steps: int) -> None:
        self.enabled = not args.no_progress and sys.stderr.isatty()
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
