"""``scratchcnn export-onnx`` and ``scratchcnn import-onnx``: move a model between a scratchcnn
checkpoint and an ONNX file (see ``scratchcnn.formats.onnx`` for what the graph holds).

Export writes the checkpoint's model as a graph that ONNX Runtime and other runtimes can run, with
the checkpoint's normalisation, dataset and classes as metadata (the graph takes normalised
images, as the NumPy model does). Import reads such a graph, or one ``torch.onnx.export`` made
of the PyTorch twin, finds which architecture it is and writes a checkpoint (epoch 0, no
optimizer state) that evaluate and predict use. Reading parses protobuf only, never runs code,
and never opens external data files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from scratchcnn.cli.convert import (
    add_settings_options,
    check_output_path,
    check_settings,
    class_names,
    writing_atomically,
)
from scratchcnn.data.preprocessing import MNIST_MEAN, MNIST_STD


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export-onnx",
        help="write a checkpoint's model as an ONNX file",
        description="Write CHECKPOINT's model to OUT as an ONNX graph (eval mode, dynamic batch "
        "size, the checkpoint's dtype). The graph takes normalised images, as the NumPy model "
        "does; the checkpoint's mean and std, dataset and classes are in its metadata_props.",
    )
    export.add_argument("checkpoint", help="a .npz checkpoint")
    export.add_argument("out", help="the .onnx file to write")
    export.set_defaults(func=run_export)

    imp = subparsers.add_parser(
        "import-onnx",
        help="make a checkpoint from an ONNX file",
        description="Read an ONNX model made by export-onnx or by torch.onnx.export of the "
        "PyTorch twin (one chain of Conv, BatchNormalization, Relu, MaxPool, AveragePool, "
        "Flatten, Gemm), find the architecture it is, and write it as a scratchcnn checkpoint "
        "OUT (epoch 0, no optimizer state), usable by evaluate and predict.",
    )
    imp.add_argument("model", help="a self-contained .onnx file (no external data)")
    imp.add_argument("out", help="the .npz checkpoint to write")
    add_settings_options(imp, "the file's metadata")
    imp.add_argument("--dtype", choices=("float32", "float64"),
                     help="default: the graph's dtype; needed to convert others")
    imp.set_defaults(func=run_import)


def export_onnx(checkpoint_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the checkpoint's model as an ONNX file (atomically) and return its path."""
    from scratchcnn.atomic import atomic_write_bytes
    from scratchcnn.formats import onnx as onnx_format
    from scratchcnn.formats.checkpoint import load_checkpoint

    check_output_path(out, checkpoint_path, "checkpoint")
    checkpoint = load_checkpoint(checkpoint_path)
    proto = onnx_format.to_onnx(
        checkpoint.build_model(), mean=checkpoint.mean, std=checkpoint.std,
        metadata={
            onnx_format.ARCHITECTURE_KEY: checkpoint.architecture,
            onnx_format.DATASET_KEY: checkpoint.metadata["dataset"],
            onnx_format.CLASSES_KEY: json.dumps(list(checkpoint.classes)),
        },
    )
    with writing_atomically(out):
        return atomic_write_bytes(out, proto.SerializeToString())


def import_onnx(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    mean: float | None = None,
    std: float | None = None,
    dtype: str | None = None,
) -> Path:
    """Write a checkpoint holding the model of an ONNX file (validated first). ``dataset``,
    ``mean`` and ``std`` default to the file's metadata, else MNIST's."""
    from scratchcnn.formats.checkpoint import save_checkpoint
    from scratchcnn.formats.onnx import from_onnx

    check_settings(None, mean, std, dtype)  # as given, before the file is read
    if dataset is not None:
        class_names(dataset)
    check_output_path(out, onnx_path, "ONNX file")
    imported = from_onnx(onnx_path, dtype=dtype)
    recorded = imported.metadata
    dataset = dataset or recorded.get("dataset", "mnist")
    mean = recorded.get("mean", MNIST_MEAN) if mean is None else mean
    std = recorded.get("std", MNIST_STD) if std is None else std
    check_settings(None, mean, std, dtype)  # those the file gave too
    metadata: dict[str, Any] = {
        "architecture": imported.architecture,
        "dataset": dataset,
        "classes": list(class_names(dataset)),
        "normalization": {"mean": mean, "std": std},
        "dtype": recorded["dtype"],
        "epoch": 0,
        "imported_from": str(onnx_path),
        "imported_format": f"onnx (opset {recorded['opset']}, {recorded['producer'] or 'unknown'})",
    }
    with writing_atomically(out):
        return save_checkpoint(out, imported.state_dict, metadata)


def _require_onnx(command: str) -> None:
    """CommandError before any work if the onnx package is missing."""
    from scratchcnn.cli import CommandError

    if importlib.util.find_spec("onnx") is None:
        raise CommandError(f"onnx is not installed, and {command} needs it; install it with "
                           "pip install 'scratchcnn[onnx]'")


def run_export(args: argparse.Namespace) -> int:
    _require_onnx("export-onnx")
    path = export_onnx(args.checkpoint, args.out)
    print(f"wrote {path} (ONNX model of {args.checkpoint})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    _require_onnx("import-onnx")
    from scratchcnn.formats.checkpoint import load_checkpoint

    path = import_onnx(args.model, args.out, dataset=args.dataset, mean=args.mean,
                       std=args.std, dtype=args.dtype)
    architecture = load_checkpoint(path, check_model=False).architecture
    print(f"wrote {path} ({architecture} checkpoint from {args.model})")
    return 0
