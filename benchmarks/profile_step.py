"""Quick A/B timing of the NumPy engine against PyTorch: training steps and inference.

Both sides are built from the same weights and run through ``scratchcnn.harness.training`` (the
loop ``scratchcnn compare`` uses), alternating sides round by round so machine noise hits both
alike; the medians and their ratio (NumPy / PyTorch) are printed. ``--breakdown`` adds a per-layer
timing of one NumPy training step.

    python benchmarks/profile_step.py --batch 64 --steps 100 --rounds 5
    python benchmarks/profile_step.py --model lenet5 --breakdown
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def load_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` normalised float32 (n, 1, 28, 28) images with a real dataset's flat background when
    one is installed (ties in max-pooling matter for speed), else noise on a zero background."""
    if FASHION_MNIST.exists():
        from scratchcnn.data.idx import read_idx

        raw = read_idx(FASHION_MNIST)[:n].astype(np.float32) / 255
    else:
        raw = rng.random((n, 28, 28), dtype=np.float32) * (rng.random((n, 28, 28)) < 0.2)
    images = ((raw - 0.2860) / 0.3530)[:, None].astype(np.float32)
    return np.ascontiguousarray(images), rng.integers(0, 10, n)


def build_pair(model_name: str, seed: int = 0):
    import torch

    from scratchcnn import optim
    from scratchcnn.models import build_model
    from scratchcnn.reference.torch_models import torch_twin

    model = build_model(model_name, rng=np.random.default_rng(seed))
    twin = torch_twin(model, model_name)
    return (model, optim.Adam(model.parameters(), lr=1e-3),
            twin, torch.optim.Adam(twin.parameters(), lr=1e-3))


def time_training(args) -> None:
    from scratchcnn.harness import training

    rng = np.random.default_rng(0)
    images, labels = load_images(args.batch * args.steps, rng)
    batches = list(np.arange(len(labels)).reshape(args.steps, args.batch))
    model, opt, twin, twin_opt = build_pair(args.model)
    sides = {"numpy": (model, opt), "torch": (twin, twin_opt)}
    times: dict[str, list[float]] = {"numpy": [], "torch": []}
    for round_index in range(args.rounds + 1):  # round 0 warms up caches and thread pools
        for name, (net, optimizer) in sides.items():
            start = time.perf_counter()
            training.train_epoch(name, net, optimizer, images, labels, batches, epoch=1)
            if round_index:
                times[name].append(time.perf_counter() - start)
    report(f"train {args.model} batch {args.batch}, {args.steps} steps", times, args.steps)


def time_inference(args) -> None:
    from scratchcnn.harness import training

    images, labels = load_images(10_000, np.random.default_rng(1))
    model, _, twin, _ = build_pair(args.model)
    times: dict[str, list[float]] = {"numpy": [], "torch": []}
    for round_index in range(args.rounds + 1):
        for name, net in (("numpy", model), ("torch", twin)):
            result = training.evaluate(name, net, images, labels)
            if round_index:
                times[name].append(result.seconds)
    report(f"predict {args.model} 10k images", times, 1)


def report(title: str, times: dict[str, list[float]], per: int) -> None:
    numpy_s, torch_s = (statistics.median(times[k]) for k in ("numpy", "torch"))
    ratios = [a / b for a, b in zip(times["numpy"], times["torch"], strict=True)]
    print(f"{title}: numpy {numpy_s / per * 1e3:.2f} ms, torch {torch_s / per * 1e3:.2f} ms "
          f"(per step/pass); ratio median {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}..{max(ratios):.3f}]", flush=True)


def breakdown(args) -> None:
    """Per-layer forward/backward time of NumPy training steps (single shard, no threads)."""
    from scratchcnn import nn
    from scratchcnn.nn.pooling import pool_before_relu

    images, labels = load_images(args.batch, np.random.default_rng(2))
    model, opt, _, _ = build_pair(args.model)
    criterion = nn.CrossEntropyLoss()
    layers = list(pool_before_relu(model))  # the order training runs them in
    layers[0].needs_input_grad = False  # as in training (see harness/training.py)
    totals = np.zeros((len(layers), 2))
    other = 0.0
    for _ in range(args.steps):
        x = images
        for index, layer in enumerate(layers):
            start = time.perf_counter()
            x = layer(x)
            totals[index, 0] += time.perf_counter() - start
        start = time.perf_counter()
        criterion(x, labels)
        grad = criterion.backward()
        opt.zero_grad()
        other -= start - time.perf_counter()
        for index in reversed(range(len(layers))):
            start = time.perf_counter()
            grad = layers[index].backward(grad)
            totals[index, 1] += time.perf_counter() - start
        start = time.perf_counter()
        opt.step()
        other -= start - time.perf_counter()
    per_step = 1e3 / args.steps
    print(f"per-layer ms per step, batch {args.batch} (forward, backward):")
    for layer, (fwd, bwd) in zip(layers, totals * per_step, strict=True):
        print(f"  {layer.describe():60s} {fwd:7.2f} {bwd:7.2f}")
    print(f"  loss + optimizer: {other * per_step:.2f}; total "
          f"{totals.sum() * per_step + other * per_step:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="simple-cnn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-infer", action="store_true")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--max-shard-size", type=int, default=None,
                        help="override training.MAX_SHARD_SIZE (0: no limit)")
    parser.add_argument("--min-shard-size", type=int, default=None,
                        help="override training.MIN_SHARD_SIZE")
    args = parser.parse_args()
    if args.max_shard_size is not None:
        from scratchcnn.harness import training

        training.MAX_SHARD_SIZE = args.max_shard_size or None
    if args.min_shard_size is not None:
        from scratchcnn.harness import training

        training.MIN_SHARD_SIZE = args.min_shard_size

    from scratchcnn.harness.threads import apply_threads

    print(f"threads: {apply_threads(args.threads)}")
    if args.breakdown:
        breakdown(args)
    if not args.no_train:
        time_training(args)
    if not args.no_infer:
        time_inference(args)


if __name__ == "__main__":
    main()
