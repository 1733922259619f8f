"""``scratchcnn export-torch`` and ``scratchcnn import-torch``: move weights between a scratchcnn
checkpoint and a PyTorch ``state_dict`` file (``torch.save`` of a dict of tensors, the same keys
as the PyTorch twin from ``scratchcnn.reference.torch_models``).

Import reads with ``torch.load(..., weights_only=True)``, which never runs code from the file,
and checks every key and shape against the named architecture before writing anything.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
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
    imp.add_argument("state_dict", help="a .pt/.pth file holding a state_dict")
    imp.add_argument("out", help="the .npz checkpoint to write")
    imp.add_argument("--model", required=True, help="architecture the weights belong to")
    imp.add_argument("--dataset", default="mnist", help="dataset it was trained on (mnist)")
    imp.add_argument("--mean", type=float, default=MNIST_MEAN, help="normalisation mean")
    imp.add_argument("--std", type=float, default=MNIST_STD, help="normalisation std")
    imp.add_argument(
        "--dtype", choices=("float32", "float64"), help="default: the tensors' dtype"
    )
    imp.set_defaults(func=run_import)


def export_torch(checkpoint_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Save the checkpoint's model state_dict as a torch file (written atomically)."""
    import torch

    from scratchcnn.atomic import atomic_write
    from scratchcnn.harness.checkpoint import load_checkpoint
    from scratchcnn.reference.torch_models import to_torch_state_dict

    checkpoint = load_checkpoint(checkpoint_path)
    state = to_torch_state_dict(checkpoint.model_state)
    return atomic_write(out, lambda file: torch.save(state, file))


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch state_dict file as NumPy arrays; CheckpointError for anything else."""
    import pickle

    import torch

    from scratchcnn.harness.checkpoint import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{path}: not a loadable PyTorch weights file ({type(error).__name__}: "
            f"{first_line}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and len(loaded) <= 3:
        loaded = loaded["state_dict"]  # a common wrapper: {"state_dict": ..., "epoch": ...}
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise CheckpointError(
            f"{path}: expected a state_dict (a dict of parameter names to tensors), got "
            f"{type(loaded).__name__}"
        )
    return {key: value.detach().cpu().numpy().copy() for key, value in loaded.items()}


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
    from scratchcnn.harness.checkpoint import (
        CheckpointError,
        check_state_matches,
        save_checkpoint,
    )
    from scratchcnn.models import MODEL_NAMES, build_model

    if model not in MODEL_NAMES:
        raise CheckpointError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    if not std > 0:
        raise CheckpointError(f"--std must be positive, got {std}")
    state = read_torch_state_dict(state_path)
    # The NumPy BatchNorm has no step counter; PyTorch's is not needed for inference.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    float_dtypes = {str(v.dtype) for v in state.values() if v.dtype.kind == "f"}
    if dtype is None:
        if len(float_dtypes) != 1 or not float_dtypes <= {"float32", "float64"}:
            raise CheckpointError(
                f"{state_path}: tensors have dtypes {sorted(float_dtypes)}; pass --dtype"
            )
        dtype = float_dtypes.pop()
    reference = build_model(model, dtype=dtype, rng=np.random.default_rng(0)).state_dict()
    check_state_matches(reference, state, str(state_path), model)
    for key, value in state.items():
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"{state_path}: {key!r} contains NaN or infinite values")
    state = {key: value.astype(reference[key].dtype) for key, value in state.items()}
    metadata: dict[str, Any] = {
        "architecture": model,
        "dataset": dataset,
        "classes": list(_class_names(dataset)),
        "normalization": {"mean": mean, "std": std},
        "dtype": dtype,
        "epoch": 0,
        "framework": "torch",
        "imported_from": str(state_path),
    }
    return save_checkpoint(out, state, metadata)


def _class_names(dataset: str) -> tuple[str, ...]:
    from scratchcnn.data.datasets import CLASS_NAMES

    if dataset not in CLASS_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES[dataset]


def run_export(args: argparse.Namespace) -> int:
    path = export_torch(args.checkpoint, args.out)
    print(f"wrote {path} (PyTorch state_dict of {args.checkpoint})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    path = import_torch(
        args.state_dict, args.out, model=args.model, dataset=args.dataset,
        mean=args.mean, std=args.std, dtype=args.dtype,
    )
    print(f"wrote {path} ({args.model} checkpoint from {args.state_dict})")
    return 0
