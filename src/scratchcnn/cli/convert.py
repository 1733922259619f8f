"""``scratchcnn export-torch`` and ``scratchcnn import-torch``: move weights between a scratchcnn
checkpoint and a PyTorch ``state_dict`` file, with the same keys as the PyTorch twin from
``scratchcnn.reference.torch_models``. The file's suffix says its format: ``.safetensors``
(``scratchcnn.formats.safetensors``; torch is not needed) or anything else, a ``torch.save`` of a
dict of tensors (``scratchcnn.reference.torch_files``).

Import never runs code from the file (``torch.load(..., weights_only=True)``; safetensors holds
no code) and checks every key and shape against the named architecture before writing anything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scratchcnn.data.preprocessing import MNIST_MEAN, MNIST_STD


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export-torch",
        help="write a checkpoint's weights as a PyTorch state_dict file (.pt or .safetensors)",
        description="Write CHECKPOINT's model weights to OUT under the PyTorch twin's names, so "
        "that the twin loads them with load_state_dict. OUT's suffix chooses the format: "
        ".safetensors (with the architecture, dataset, classes and normalisation as metadata; "
        "needs the safetensors package, not PyTorch), anything else torch.save of a dict of "
        "tensors.",
    )
    export.add_argument("checkpoint", help="a .npz checkpoint")
    export.add_argument("out", help="the file to write: .pt (torch.save) or .safetensors")
    export.set_defaults(func=run_export)

    imp = subparsers.add_parser(
        "import-torch",
        help="make a checkpoint from a PyTorch state_dict file (.pt or .safetensors)",
        description="Read a state_dict of architecture --model, a .safetensors file or a "
        "torch.save'd .pt file (weights only, never code), check it, and write it as a "
        "scratchcnn checkpoint OUT (epoch 0, no optimizer state), usable by evaluate and "
        "predict. A .safetensors file written by export-torch names its architecture, dataset "
        "and normalisation, which then need no option.",
    )
    imp.add_argument(
        "state_dict",
        help="a .safetensors file, or a .pt/.pth file holding a state_dict (alone, or under a "
        "'state_dict', 'model_state_dict' or 'model' key)",
    )
    imp.add_argument("out", help="the .npz checkpoint to write")
    imp.add_argument(
        "--model",
        help="architecture the weights belong to (required unless the .safetensors file names it)",
    )
    add_settings_options(imp, "a .safetensors file's metadata")
    imp.add_argument(
        "--dtype", choices=("float32", "float64"),
        help="default: the tensors' dtype; needed to convert others (bfloat16, float16, mixed)",
    )
    imp.set_defaults(func=run_import)


def add_settings_options(parser: argparse.ArgumentParser, recorded: str) -> None:
    """An import command's --dataset, --mean and --std, by default what ``recorded`` (e.g. "the
    file's metadata") gives, else MNIST's."""
    parser.add_argument("--dataset", help=f"dataset it was trained on (default: {recorded}, "
                                          "else mnist)")
    parser.add_argument("--mean", type=float, help=f"normalisation mean (default: {recorded}, "
                                                   f"else MNIST's {MNIST_MEAN})")
    parser.add_argument("--std", type=float, help=f"normalisation std (default: {recorded}, "
                                                  f"else MNIST's {MNIST_STD})")


def export_torch(checkpoint_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Save the checkpoint's model state_dict as a torch file, or a safetensors file if ``out``
    ends in .safetensors (written atomically)."""
    from scratchcnn.atomic import atomic_write
    from scratchcnn.formats import safetensors
    from scratchcnn.formats.checkpoint import load_checkpoint

    check_output_path(out, checkpoint_path, "checkpoint")
    checkpoint = load_checkpoint(checkpoint_path)
    if safetensors.is_safetensors_path(out):
        metadata = safetensors.checkpoint_metadata(checkpoint)
        with writing_atomically(out):
            return safetensors.save_state_dict(checkpoint.model_state, out, metadata)
    import torch

    from scratchcnn.reference.torch_models import to_torch_state_dict

    state = to_torch_state_dict(checkpoint.model_state)
    with writing_atomically(out):
        return atomic_write(out, lambda file: torch.save(state, file))


def check_output_path(
    out: str | os.PathLike, source: str | os.PathLike, source_kind: str
) -> None:
    """Refuse, before anything is read or written, an output path that cannot receive a file:
    empty, an existing directory, or the input itself (``source``, a ``source_kind`` file)."""
    from scratchcnn.formats.checkpoint import CheckpointError

    if not os.fspath(out):
        raise CheckpointError("the output path is empty; give the name of the file to write")
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(
            f"{out} is a directory; give the path of the file to write inside it"
        )
    # Writing renames a new file over the path: a device such as /dev/null would be replaced.
    if out.exists() and not out.is_file():
        raise CheckpointError(f"{out} exists and is not a regular file; choose another path")
    # The output replaces an existing file: were it the input, the input would be lost.
    with contextlib.suppress(OSError):
        if out.exists() and os.path.samefile(out, source):
            raise CheckpointError(
                f"{out} is the input {source_kind} itself; writing there would replace it, "
                "so choose another output path"
            )


@contextlib.contextmanager
def writing_atomically(out: str | os.PathLike) -> Iterator[None]:
    """Report the OS's refusal to write ``out`` (no such directory, read-only, disk full) as a
    one-line CheckpointError. The writes inside are atomic: they leave no partial file."""
    from scratchcnn.formats.checkpoint import CheckpointError
    from scratchcnn.formats.weights import os_reason

    try:
        yield
    except OSError as error:
        raise CheckpointError(
            f"cannot write {out} ({os_reason(error)}); choose an output path in a directory "
            "you can write to"
        ) from None


def import_torch(
    state_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    dataset: str | None = None,
    mean: float | None = None,
    std: float | None = None,
    dtype: str | None = None,
) -> Path:
    """Write a checkpoint holding the weights of a torch or safetensors state_dict file
    (validated first). Settings not given come from a .safetensors file's metadata, else
    MNIST's; ``model`` must be given or found there."""
    from scratchcnn.formats import safetensors
    from scratchcnn.formats.checkpoint import CheckpointError, save_checkpoint
    from scratchcnn.reference import torch_files

    check_settings(model, mean, std, dtype)  # as given, before any file is read
    check_output_path(out, state_path, "state_dict file")
    if safetensors.is_safetensors_path(state_path):
        model, dataset, mean, std = safetensors.import_settings(
            state_path, architecture=model, dataset=dataset, mean=mean, std=std)
        if model is None:
            raise CheckpointError(f"{state_path}: its metadata does not name the architecture "
                                  "of its weights; pass --model")
        load_checked = safetensors.load_checked
    elif model is None:
        raise CheckpointError("--model is required: a torch.save file does not record the "
                              "architecture of its weights")
    else:
        load_checked = torch_files.load_checked
    dataset = dataset or "mnist"
    classes = class_names(dataset)
    state, dtype = load_checked(state_path, model, dtype)
    metadata: dict[str, Any] = {
        "architecture": model,
        "dataset": dataset,
        "classes": list(classes),
        "normalization": {"mean": MNIST_MEAN if mean is None else mean,
                          "std": MNIST_STD if std is None else std},
        "dtype": dtype,
        "epoch": 0,
        "framework": "torch",
        "imported_from": str(state_path),
    }
    with writing_atomically(out):
        return save_checkpoint(out, state, metadata)


def check_settings(
    model: str | None, mean: float | None, std: float | None, dtype: str | None
) -> None:
    """CheckpointError for an import option that cannot be right, whatever the file holds."""
    from scratchcnn.formats.checkpoint import CheckpointError
    from scratchcnn.models import MODEL_NAMES

    if model is not None and model not in MODEL_NAMES:
        raise CheckpointError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    if mean is not None and not math.isfinite(mean):
        raise CheckpointError(f"--mean must be a finite number, got {mean}")
    if std is not None and not (math.isfinite(std) and std > 0):
        raise CheckpointError(f"--std must be a finite positive number, got {std}")
    if (mean is not None and not 0 <= mean <= 1) or (std is not None and std > 1):
        # As data.normalize requires: 0-255 statistics would make every input about -0.4.
        raise CheckpointError(f"--mean and --std are on the [0, 1] scale of pixel / 255, got "
                              f"{mean} and {std}; divide 0-255 statistics by 255 (MNIST: "
                              f"{MNIST_MEAN} and {MNIST_STD})")
    if dtype not in (None, "float32", "float64"):
        raise CheckpointError(f"--dtype must be float32 or float64, got {dtype!r}")


def class_names(dataset: str) -> tuple[str, ...]:
    from scratchcnn.data.datasets import CLASS_NAMES

    if dataset not in CLASS_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES[dataset]


def run_export(args: argparse.Namespace) -> int:
    _require_packages(args.out, "export-torch")
    path = export_torch(args.checkpoint, args.out)
    print(f"wrote {path} (PyTorch state_dict of {args.checkpoint})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from scratchcnn.formats.checkpoint import load_checkpoint

    _require_packages(args.state_dict, "import-torch")
    path = import_torch(
        args.state_dict, args.out, model=args.model, dataset=args.dataset,
        mean=args.mean, std=args.std, dtype=args.dtype,
    )
    architecture = load_checkpoint(path, check_model=False).architecture
    print(f"wrote {path} ({architecture} checkpoint from {args.state_dict})")
    return 0


def _require_packages(weights: str, command: str) -> None:
    """CommandError, before any work, unless the package that reads or writes ``weights`` is
    installed: safetensors for a .safetensors file, PyTorch for any other."""
    from scratchcnn.cli import CommandError, require
    from scratchcnn.formats.safetensors import SAFETENSORS_INSTALL, is_safetensors_path

    if not is_safetensors_path(weights):
        require("torch", command)
    elif importlib.util.find_spec("safetensors") is None:
        raise CommandError(f"safetensors is not installed, and {command} needs it for "
                           f"{weights}; install it with {SAFETENSORS_INSTALL}")
