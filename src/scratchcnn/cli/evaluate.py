"""``scratchcnn evaluate CHECKPOINT``: test accuracy, loss, per-class accuracy and time.

The test set is the checkpoint's dataset unless ``--dataset`` names another one with the same
image size and number of classes; images are normalised with the checkpoint's mean and std.
Only the test files are read (or downloaded); without ``--data-dir`` they come from the data
directory recorded in the checkpoint while it still holds them, else from the usual places.
"""

from __future__ import annotations

import argparse

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint on a test set", description=__doc__
    )
    parser.add_argument("checkpoint", help="a .npz checkpoint written by scratchcnn train")
    parser.add_argument("--dataset", help="dataset name (default: the checkpoint's)")
    parser.add_argument(
        "--data-dir",
        help="directory holding the test IDX files (default: the one recorded in the checkpoint "
        "if it still holds them, else the usual search path)",
    )
    parser.add_argument("--limit-test", type=int, help="use only the first N test images")
    parser.add_argument(
        "--framework", choices=("numpy", "torch"), default="numpy",
        help="run the checkpoint's weights in scratchcnn (default) or in its PyTorch twin",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="default 1000")
    parser.set_defaults(func=run)


def per_class_accuracy(
    predictions: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy per class, with NaN for a class absent from ``labels``; count per class)."""
    counts = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels[predictions == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return correct / counts, counts


def run(args: argparse.Namespace) -> int:
    from scratchcnn.cli import CommandError, require
    from scratchcnn.data import load_dataset, normalize
    from scratchcnn.formats.checkpoint import load_checkpoint
    from scratchcnn.harness.training import evaluate
    from scratchcnn.harness.training_run import recorded_data_dir

    if args.limit_test is not None and args.limit_test < 1:
        raise CommandError(f"--limit-test must be at least 1, got {args.limit_test}")
    if args.framework == "torch":
        require("torch", "--framework torch", "use --framework numpy")
    checkpoint = load_checkpoint(args.checkpoint)
    dataset = args.dataset or checkpoint.metadata["dataset"]
    data_dir = args.data_dir
    recorded = (None if data_dir is not None
                else recorded_data_dir(checkpoint.metadata, dataset, test_only=True))
    # Only the test split is read: evaluating must not need (or download) the training files.
    data = load_dataset(dataset, data_dir or recorded, test_only=True).limit(test=args.limit_test)
    if len(data.classes) != len(checkpoint.classes):
        raise CommandError(
            f"{dataset} has {len(data.classes)} classes but {args.checkpoint} was trained on "
            f"{len(checkpoint.classes)}"
        )
    model = checkpoint.build_model()
    if args.framework == "torch":
        from scratchcnn.reference.torch_models import torch_twin

        model = torch_twin(model, checkpoint.architecture)
    images = normalize(data.test_images, checkpoint.mean, checkpoint.std, dtype=checkpoint.dtype)
    result = evaluate(
        args.framework, model, images, data.test_labels, batch_size=args.batch_size
    )
    accuracies, counts = per_class_accuracy(
        result.predictions, data.test_labels, len(checkpoint.classes)
    )
    print(
        f"{args.checkpoint}: {checkpoint.architecture} ({checkpoint.dtype}, epoch "
        f"{checkpoint.epoch}) on {dataset} test set, {len(images)} images, {args.framework}"
    )
    print(f"accuracy {100 * result.accuracy:.2f}%  loss {result.loss:.4f}  "
          f"time {result.seconds:.2f} s ({len(images) / max(result.seconds, 1e-9):.0f} images/s)")
    if dataset != checkpoint.metadata["dataset"]:
        print(f"note: the checkpoint was trained on {checkpoint.metadata['dataset']}")
    if recorded is not None:
        print(f"note: test set read from {recorded}, the data directory recorded in the "
              "checkpoint (--data-dir chooses another)")
    width = max(len(name) for name in data.classes)
    for name, accuracy, count in zip(data.classes, accuracies, counts, strict=True):
        shown = "   n/a" if count == 0 else f"{100 * accuracy:6.2f}%"
        print(f"  {name:<{width}}  {shown}  ({count} images)")
    return 0
