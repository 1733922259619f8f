"""``scratchcnn export-torch`` and ``scratchcnn import-torch``: move weights between a scratchcnn
checkpoint and a PyTorch ``state_dict`` file (``torch.save`` of a dict of tensors, the same keys
as the PyTorch twin from ``scratchcnn.reference.torch_models``).

Import reads with ``torch.load(..., weights_only=True)``, which never runs code from the file,
and checks every key and shape against the named architecture before writing anything.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# MNIST's training-set statistics, the usual normalisation for weights trained elsewhere.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export-torch",
        help="write a checkpoint's weights as a PyTorch state_dict file",
        description="Write CHECKPOINT's model weights to OUT with torch.save (a dict of "
        "tensors that the PyTorch twin loads with load_state_dict).",
    )
    export.add_argument("checkpoint", help="a .npz checkpoint")
    export.add_argument("out", help="the .pt file to write")
    export.set_defaults(func=run_export)

    imp = subparsers.add_parser(
        "import-torch",
        help="make a checkpoint from a PyTorch state_dict file",
        description="Read a torch.save'd state_dict (weights only, never code) of architecture "
        "--model, check it, and write it as a scratchcnn checkpoint OUT (epoch 0, no optimizer "
        "state), usable by evaluate and predict.",
    )
    imp.add_argument(
        "state_dict",
        help="a .pt/.pth file holding a state_dict (alone, or under a 'state_dict', "
        "'model_state_dict' or 'model' key)",
    )
    imp.add_argument("out", help="the .npz checkpoint to write")
    imp.add_argument("--model", required=True, help="architecture the weights belong to")
    imp.add_argument("--dataset", default="mnist", help="dataset it was trained on (mnist)")
    imp.add_argument("--mean", type=float, default=MNIST_MEAN, help="normalisation mean")
    imp.add_argument("--std", type=float, default=MNIST_STD, help="normalisation std")
    imp.add_argument(
        "--dtype", choices=("float32", "float64"),
        help="default: the tensors' dtype; needed to convert others (bfloat16, float16, mixed)",
    )
    imp.set_defaults(func=run_import)


def export_torch(checkpoint_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Save the checkpoint's model state_dict as a torch file (written atomically)."""
    import torch

    from scratchcnn.atomic import atomic_write
    from scratchcnn.harness.checkpoint import load_checkpoint
    from scratchcnn.reference.torch_models import to_torch_state_dict

    check_output_path(out, checkpoint_path, "checkpoint")
    checkpoint = load_checkpoint(checkpoint_path)
    state = to_torch_state_dict(checkpoint.model_state)
    with _writing(out):
        return atomic_write(out, lambda file: torch.save(state, file))


def check_output_path(
    out: str | os.PathLike, source: str | os.PathLike, source_kind: str
) -> None:
    """Refuse, before anything is read or written, an output path that cannot receive a file:
    empty, an existing directory, or the input itself (``source``, a ``source_kind`` file)."""
    from scratchcnn.harness.checkpoint import CheckpointError

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
def _writing(out: str | os.PathLike) -> Iterator[None]:
    """Report the OS's refusal to write ``out`` (no such directory, read-only, disk full) as a
    one-line CheckpointError. The writes inside are atomic: they leave no partial file."""
    from scratchcnn.harness.checkpoint import CheckpointError
    from scratchcnn.reference.torch_files import os_reason

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
    model: str,
    dataset: str = "mnist",
    mean: float = MNIST_MEAN,
    std: float = MNIST_STD,
    dtype: str | None = None,
) -> Path:
    """Write a checkpoint holding the weights of a torch state_dict file (validated first)."""
    import torch

    from scratchcnn.harness.checkpoint import (
        CheckpointError,
        check_state_matches,
        save_checkpoint,
    )
    from scratchcnn.models import MODEL_NAMES, build_model
    from scratchcnn.reference.torch_files import (
        check_tensor_usable,
        common_float_dtype,
        load_torch_state_dict,
        stand_in,
        to_numpy,
    )

    if model not in MODEL_NAMES:
        raise CheckpointError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    if not math.isfinite(mean):
        raise CheckpointError(f"--mean must be a finite number, got {mean}")
    if not (math.isfinite(std) and std > 0):
        raise CheckpointError(f"--std must be a finite positive number, got {std}")
    if not 0 <= mean <= 1 or std > 1:
        # As data.normalize requires: 0-255 statistics would make every input about -0.4.
        raise CheckpointError(f"--mean and --std are on the [0, 1] scale of pixel / 255, got "
                              f"{mean} and {std}; divide 0-255 statistics by 255 (MNIST: "
                              "0.1307 and 0.3081)")
    if dtype not in (None, "float32", "float64"):
        raise CheckpointError(f"--dtype must be float32 or float64, got {dtype!r}")
    classes = _class_names(dataset)
    check_output_path(out, state_path, "state_dict file")
    tensors = load_torch_state_dict(state_path)
    for key, tensor in tensors.items():
        check_tensor_usable(state_path, key, tensor)
    dtype = dtype or common_float_dtype(state_path, tensors)
    reference = build_model(model, dtype=dtype, rng=np.random.default_rng(0)).state_dict()
    for key, value in reference.items():
        # As PyTorch does for state_dicts saved before BatchNorm counted its steps.
        if key.endswith(".num_batches_tracked") and key not in tensors:
            tensors[key] = torch.from_numpy(np.zeros_like(value))
    # Keys, shapes and kinds first, on stand-ins without memory: a sparse tensor is only made
    # dense once its shape is known to be the architecture's.
    check_state_matches(
        reference,
        {key: stand_in(tensor, reference.get(key)) for key, tensor in tensors.items()},
        str(state_path),
        model,
    )
    state = {
        key: to_numpy(state_path, key, tensor, reference[key].dtype)
        for key, tensor in tensors.items()
    }
    metadata: dict[str, Any] = {
        "architecture": model,
        "dataset": dataset,
        "classes": list(classes),
        "normalization": {"mean": mean, "std": std},
        "dtype": dtype,
        "epoch": 0,
        "framework": "torch",
        "imported_from": str(state_path),
    }
    with _writing(out):
        return save_checkpoint(out, state, metadata)


def _class_names(dataset: str) -> tuple[str, ...]:
    from scratchcnn.data.datasets import CLASS_NAMES

    if dataset not in CLASS_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES[dataset]


def run_export(args: argparse.Namespace) -> int:
    from scratchcnn.cli import require

    require("torch", "export-torch")
    path = export_torch(args.checkpoint, args.out)
    print(f"wrote {path} (PyTorch state_dict of {args.checkpoint})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from scratchcnn.cli import require

    require("torch", "import-torch")
    path = import_torch(
        args.state_dict, args.out, model=args.model, dataset=args.dataset,
        mean=args.mean, std=args.std, dtype=args.dtype,
    )
    print(f"wrote {path} ({args.model} checkpoint from {args.state_dict})")
    return 0
