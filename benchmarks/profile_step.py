"""Quick A/B timing of the NumPy engine against PyTorch: training steps and inference.

Both sides are built from the same weights and run through ``scratchcnn.harness.training`` (the
loop ``scratchcnn compare`` uses), alternating sides round by round so machine noise hits both
alike; the medians and their ratio (NumPy / PyTorch) are printed. ``--breakdown`` adds a per-layer
timing of one training step, NumPy beside PyTorch (module hooks), to see where each spends its
time; at ``--threads 1`` it compares the frameworks core for core.

    python benchmarks/profile_step.py --batch 64 --steps 100 --rounds 5
    python benchmarks/profile_step.py --model lenet5 --breakdown --threads 1 --batch 32
    python benchmarks/profile_step.py --no-train --inference-breakdown --threads 1

Inference also times ONNX Runtime (the model exported by ``to_onnx``, same threads) when it is
installed. ``--inference-breakdown`` splits NumPy's no_grad inference of 10,000 images into the
steps the Sequential runs (a Conv2d fused with its MaxPool2d and ReLU is one step) and the kernels
inside them, against the matrix products alone (the floor of an im2col engine).
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
    """(model, optimizer, twin, twin's optimizer): Adam lr 1e-3 on both sides, made by the
    harness's ``make_optimizer`` so the NumPy side takes the flat-vector path training takes."""
    from scratchcnn.harness.training import make_optimizer
    from scratchcnn.models import build_model
    from scratchcnn.reference.torch_models import torch_twin

    model = build_model(model_name, rng=np.random.default_rng(seed))
    twin = torch_twin(model, model_name)
    return (model, make_optimizer("numpy", model.parameters(), "adam", 1e-3),
            twin, make_optimizer("torch", twin.parameters(), "adam", 1e-3))


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


def time_inference(args, threads: int) -> None:
    from scratchcnn.harness import bench, training

    images, labels = load_images(10_000, np.random.default_rng(1))
    model, _, twin, _ = build_pair(args.model)
    sides = {"numpy": ("numpy", model), "torch": ("torch", twin)}
    if bench.onnxruntime_problem(np.dtype(np.float32)) is None:
        # evaluate's NumPy path calls it like a NumPy model (see bench.OnnxRuntimeModel).
        sides["onnxruntime"] = ("numpy", bench.onnxruntime_model(model, threads))
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(args.rounds + 1):
        for name, (framework, net) in sides.items():
            result = training.evaluate(framework, net, images, labels)
            if round_index:
                times[name].append(result.seconds)
    report(f"predict {args.model} 10k images", times, 1)
    if "onnxruntime" in times:
        ratios = [a / b for a, b in zip(times["numpy"], times["onnxruntime"], strict=True)]
        print(f"  onnxruntime {statistics.median(times['onnxruntime']) * 1e3:.2f} ms; numpy / "
              f"onnxruntime median {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}..{max(ratios):.3f}]", flush=True)


def report(title: str, times: dict[str, list[float]], per: int) -> None:
    numpy_s, torch_s = (statistics.median(times[k]) for k in ("numpy", "torch"))
    ratios = [a / b for a, b in zip(times["numpy"], times["torch"], strict=True)]
    print(f"{title}: numpy {numpy_s / per * 1e3:.2f} ms, torch {torch_s / per * 1e3:.2f} ms "
          f"(per step/pass); ratio median {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}..{max(ratios):.3f}]", flush=True)


def inference_breakdown(args) -> None:
    """Where NumPy's no_grad inference of 10,000 images (batches of 1000) goes: seconds per step
    as the Sequential runs them and per kernel inside them (timers wrapped around
    nn.functional's kernels), and the share of the matrix products (convolutions' and Linear
    layers'): the floor of an im2col engine at this BLAS's speed."""
    from scratchcnn import nn
    from scratchcnn.nn import functional as F
    from scratchcnn.nn import module

    images, _ = load_images(10_000, np.random.default_rng(1))
    model = build_pair(args.model)[0].eval()
    kernels: dict[str, float] = {}
    steps: dict[str, float] = {}

    def timed(table: dict[str, float], key: str, function):
        def wrapper(*arguments, **keywords):
            start = time.perf_counter()
            try:
                return function(*arguments, **keywords)
            finally:
                table[key] = table.get(key, 0.0) + time.perf_counter() - start
        return wrapper

    for name in ("pad_nhwc", "pooled_im2col", "matmul_rows", "add_to_rows"):
        setattr(F, name, timed(kernels, name, getattr(F, name)))
    fuse = module._fused
    step_list: list = []

    def fused_once(order):  # the same step objects every batch, each wrapped by a timer
        if not step_list:
            for index, step in enumerate(fuse(order)):
                label = f"{index}: {type(step).__name__}"
                if isinstance(step, nn.Linear):
                    label += " (its product is the step)"
                step.forward = timed(steps, label, step.forward)
                step_list.append(step)
        return step_list

    module._fused = fused_once
    rounds = max(args.rounds, 1)
    try:
        with nn.no_grad():
            for round_index in range(rounds + 1):
                if round_index == 1:
                    kernels.clear()
                    steps.clear()
                    start = time.perf_counter()
                for begin in range(0, len(images), 1000):
                    model(images[begin:begin + 1000])
        total = (time.perf_counter() - start) / rounds
    finally:
        module._fused = fuse
    print(f"no_grad inference of 10,000 images, {args.model}: {total:.3f} s per pass")
    for label, seconds in steps.items():
        print(f"  step {label:40s} {seconds / rounds:.4f} s")
    for label, seconds in kernels.items():
        print(f"  kernel {label:38s} {seconds / rounds:.4f} s")
    print(f"  outside the steps (pieces, concatenation)    "
          f"{total - sum(steps.values()) / rounds:.4f} s")
    products = kernels["matmul_rows"] + sum(seconds for label, seconds in steps.items()
                                            if "Linear" in label)
    print(f"  matrix products alone: {products / rounds:.4f} s "
          f"({100 * products / rounds / total:.0f}% of the pass)")


def breakdown(args) -> None:
    """Per-layer forward/backward time of one training step on one core, NumPy beside PyTorch:
    where each framework spends its time, layer by layer (run with ``--threads 1``; the NumPy
    side in one process, as each MPI rank runs its part of a batch)."""
    images, labels = load_images(args.batch, np.random.default_rng(2))
    model, opt, twin, twin_opt = build_pair(args.model)
    steps, numpy_times, numpy_other = numpy_step_times(model, opt, images, labels, args.steps)
    torch_times, torch_other, torch_plain = torch_layer_times(twin, twin_opt, images, labels,
                                                              args.steps)
    print(f"ms per training step, batch {args.batch}, threads {args.threads or 'all'} "
          "(forward / backward; NumPy runs each ReLU -> MaxPool2d pair pool-first, and a "
          "first Conv2d with its pool and ReLU as one step):")
    print(f"  {'layer':44s} {'NumPy':>15s} {'PyTorch':>15s}")
    for (label, covered), (fwd, bwd) in zip(steps, numpy_times, strict=True):
        torch_fwd, torch_bwd = torch_times[covered].sum(axis=0)
        print(f"  {label[:44]:44s} {fwd:7.2f} {bwd:7.2f} {torch_fwd:7.2f} {torch_bwd:7.2f}")
    numpy_total = numpy_times.sum() + numpy_other
    torch_total = torch_times.sum() + torch_other
    print(f"  {'loss + optimizer':44s} {numpy_other:15.2f} {torch_other:15.2f}")
    print(f"  {'total':44s} {numpy_total:15.2f} {torch_total:15.2f}")
    print(f"  PyTorch without the timing hooks: {torch_plain:.2f} ms per step (the hooks' cost is "
          "in its per-layer figures)")


def numpy_step_times(model, opt, images: np.ndarray, labels: np.ndarray, steps: int
                     ) -> tuple[list[tuple[str, list[int]]], np.ndarray, float]:
    """The steps a training forward runs, each as (label, the model's layer indices it
    covers), in the model's order; ((steps, 2) ms forward/backward per training step, ms loss +
    optimizer), timed step by step."""
    from scratchcnn import nn
    from scratchcnn.nn.fused import ConvPoolReLU, fuse_first_for_training

    criterion = nn.CrossEntropyLoss()
    # The order Sequential runs them in (pool before ReLU, the first conv and pool fused).
    position = {id(layer): index for index, layer in enumerate(model)}
    names = [name for name, _ in model.named_children()]
    layers = fuse_first_for_training(model.execution_order())
    covered = [sorted(position[id(inner)] for inner in layer.children())
               if isinstance(layer, ConvPoolReLU) else [position[id(layer)]] for layer in layers]
    totals = np.zeros((len(layers), 2))
    other = 0.0
    for step in range(steps + 1):  # step 0 warms up
        x = images
        times = np.zeros_like(totals)
        for index, layer in enumerate(layers):
            start = time.perf_counter()
            x = layer(x)
            times[index, 0] = time.perf_counter() - start
        start = time.perf_counter()
        criterion(x, labels)
        grad = criterion.backward()
        opt.zero_grad()
        step_other = time.perf_counter() - start
        for index in reversed(range(len(layers))):
            start = time.perf_counter()
            # The first layer computes no input gradient, as in Sequential.backward.
            grad = (layers[index].backward(grad, input_grad=False) if index == 0
                    else layers[index].backward(grad))
            times[index, 1] = time.perf_counter() - start
        start = time.perf_counter()
        opt.step()
        step_other += time.perf_counter() - start
        if step:
            totals += times
            other += step_other
    order = np.argsort([indices[0] for indices in covered])  # the model's order
    labels_out = []
    for index in order:
        layer, indices = layers[index], covered[index]
        label = (f"{indices[0]}: {layer.describe()}" if len(indices) == 1 else
                 f"{'+'.join(names[i] for i in indices)}: fused " +
                 "+".join(type(inner).__name__ for inner in layer.children()))
        labels_out.append((label, indices))
    return labels_out, totals[order] * 1e3 / steps, other * 1e3 / steps


def torch_layer_times(twin, opt, images: np.ndarray, labels: np.ndarray,
                      steps: int) -> tuple[np.ndarray, float, float]:
    """PyTorch's twin timed per layer with module hooks: ((layers, 2) ms forward/backward per
    step, ms loss + optimizer, ms per whole step without hooks). The first layer
    computes no input gradient, so its full-backward hook fires before its weight gradient: its
    backward is the rest of ``loss.backward()`` after every other layer's."""
    import warnings

    import torch

    criterion = torch.nn.CrossEntropyLoss()
    x_t, y_t = torch.from_numpy(images), torch.from_numpy(labels)
    children = list(twin.children())

    def plain_step() -> None:
        opt.zero_grad()
        criterion(twin(x_t), y_t).backward()
        opt.step()

    plain_step()
    start = time.perf_counter()
    for _ in range(steps):
        plain_step()
    plain = (time.perf_counter() - start) * 1e3 / steps
    started: dict[tuple[int, str], float] = {}
    spent = np.zeros((len(children), 2))

    def hooks(index: int) -> None:
        def begin(kind: str):
            return lambda *_: started.__setitem__((index, kind), time.perf_counter())

        def end(kind: int):
            def hook(*_):
                spent[index, kind] += time.perf_counter() - started[(index, "fb"[kind])]
            return hook

        layer = children[index]
        layer.register_forward_pre_hook(begin("f"))
        layer.register_forward_hook(end(0))
        layer.register_full_backward_pre_hook(begin("b"))
        layer.register_full_backward_hook(end(1))

    for index in range(len(children)):
        hooks(index)
    other, backward_total = 0.0, 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for step in range(steps + 1):  # step 0 warms up
            if step == 1:
                spent[:] = 0
            logits = twin(x_t)
            start = time.perf_counter()
            loss = criterion(logits, y_t)
            opt.zero_grad()
            step_other = time.perf_counter() - start
            start = time.perf_counter()
            loss.backward()
            step_backward = time.perf_counter() - start
            start = time.perf_counter()
            opt.step()
            step_other += time.perf_counter() - start
            if step:
                other += step_other
                backward_total += step_backward
    spent[0, 1] = backward_total - spent[1:, 1].sum()
    return spent * 1e3 / steps, other * 1e3 / steps, plain


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
    parser.add_argument("--inference-breakdown", action="store_true")
    args = parser.parse_args()

    from scratchcnn.harness.threads import apply_threads

    threads = apply_threads(args.threads)
    print(f"threads: {threads}")
    if args.breakdown:
        breakdown(args)
    if not args.no_train:
        time_training(args)
    if not args.no_infer:
        time_inference(args, threads)
    if args.inference_breakdown:
        inference_breakdown(args)


if __name__ == "__main__":
    main()
