"""``scratchcnn predict CHECKPOINT IMAGE...``: classify PNG/JPEG images of single digits.

Each image is made MNIST-like (see ``scratchcnn.harness.images``: grayscale, inverted when dark
on light, cropped, fitted into 20 x 20 and centred by mass in 28 x 28), normalised with the
checkpoint's mean and std, and printed as ``path: class (probability)``.
"""

from __future__ import annotations

import argparse

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify image files with a checkpoint", description=__doc__
    )
    parser.add_argument("checkpoint", help="a .npz checkpoint written by scratchcnn train")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    parser.set_defaults(func=run)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_files(checkpoint, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class index per image, its probability) for image files."""
    from scratchcnn.data import normalize
    from scratchcnn.harness.images import load_digits
    from scratchcnn.nn import no_grad

    pixels = load_digits(paths)  # reads every file first: a bad one fails before any output
    images = normalize(pixels, checkpoint.mean, checkpoint.std, dtype=checkpoint.dtype)
    model = checkpoint.build_model()
    model.eval()
    with no_grad():
        probabilities = softmax(np.asarray(model(images), dtype=np.float64))
    classes = probabilities.argmax(axis=1)
    return classes, probabilities[np.arange(len(classes)), classes]


def run(args: argparse.Namespace) -> int:
    from scratchcnn.cli import require
    from scratchcnn.formats.checkpoint import load_checkpoint

    require("PIL", "predict (it reads PNG and JPEG images)")
    checkpoint = load_checkpoint(args.checkpoint)
    classes, probabilities = predict_files(checkpoint, args.images)
    for path, index, probability in zip(args.images, classes, probabilities, strict=True):
        print(f"{path}: {checkpoint.classes[index]} ({probability:.3f})")
    return 0
