"""Accuracy targets of issue 6, one documented command each (see benchmarks/README.md):

    python benchmarks/accuracy.py mnist-simple-b64 --seeds 0,1,2 --data-dir ../shared/datasets/mnist
    python benchmarks/accuracy.py --table runs/accuracy/*.json

A thin wrapper around ``scratchcnn accuracy`` (same options; ``--help`` lists them)."""

from __future__ import annotations

import sys

from scratchcnn.cli import main

if __name__ == "__main__":
    sys.exit(main(["accuracy", *sys.argv[1:]]))
