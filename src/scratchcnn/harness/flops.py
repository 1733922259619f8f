"""Analytic floating-point operation counts of the architectures, and this machine's measured
single-precision matmul peak, so a timing can be stated as GFLOP/s and as a fraction of peak.

Only multiply-adds count (2 FLOPs each): Conv2d ``2*C*KH*KW*O*OH*OW`` (per group), Linear
``2*in*out``. Bias additions, ReLU, pooling, BatchNorm and the loss are a few percent at most and
are left out, as is usual for such counts. A training step costs about three forward passes
(forward, gradient of the input, gradient of the weights).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scratchcnn.models import LayerSpec, architecture

TRAINING_FACTOR = 3  # forward + backward to the input + backward to the weights
MNIST_INPUT = (1, 28, 28)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))


def _window_output(size: tuple[int, int], kwargs: Mapping[str, Any],
                   default_stride: Any) -> tuple[int, int]:
    kernel = _pair(kwargs["kernel_size"])
    stride = _pair(kwargs.get("stride") or default_stride)
    padding = _pair(kwargs.get("padding", 0))
    dilation = _pair(kwargs.get("dilation", 1))
    return tuple(  # type: ignore[return-value]
        (size[axis] + 2 * padding[axis] - dilation[axis] * (kernel[axis] - 1) - 1)
        // stride[axis] + 1
        for axis in range(2)
    )


def layer_flops(name: str | Sequence[LayerSpec],
                input_shape: tuple[int, ...] = MNIST_INPUT) -> list[dict[str, Any]]:
    """Per layer of architecture ``name`` (or a layer list in ``models.ARCHITECTURES`` form) for
    one image of ``input_shape`` (C, H, W): its type, output shape and forward FLOPs."""
    layers = architecture(name) if isinstance(name, str) else name
    shape: tuple[int, ...] = tuple(input_shape)
    rows = []
    for index, (layer, kwargs) in enumerate(layers):
        flops = 0
        if layer == "Conv2d":
            kernel = _pair(kwargs["kernel_size"])
            out_h, out_w = _window_output(shape[1:], kwargs, 1)
            channels, out_channels = kwargs["in_channels"], kwargs["out_channels"]
            groups = kwargs.get("groups", 1)
            flops = 2 * (channels // groups) * kernel[0] * kernel[1] * out_channels * out_h * out_w
            shape = (out_channels, out_h, out_w)
        elif layer in ("MaxPool2d", "AvgPool2d"):
            shape = (shape[0], *_window_output(shape[1:], kwargs, kwargs["kernel_size"]))
        elif layer == "Flatten":
            shape = (int(np.prod(shape)),)
        elif layer == "Linear":
            flops = 2 * kwargs["in_features"] * kwargs["out_features"]
            shape = (kwargs["out_features"],)
        rows.append({"index": index, "layer": layer, "output_shape": list(shape), "flops": flops})
    return rows


def forward_flops(name: str | Sequence[LayerSpec],
                  input_shape: tuple[int, ...] = MNIST_INPUT) -> int:
    """Forward FLOPs of architecture ``name`` for one image."""
    return sum(row["flops"] for row in layer_flops(name, input_shape))


def module_flops(model: Any, input_shape: tuple[int, ...] = MNIST_INPUT) -> int:
    """Forward FLOPs of a built NumPy model for one sample of ``input_shape`` (C, H, W), counted
    as ``layer_flops`` counts them, from the shapes zero samples take through its layers. They
    run in eval mode under ``no_grad`` (no running statistics updated, no dropout mask drawn), two
    of them so that a BatchNorm without running statistics has more than one value per channel
    even after global pooling; every layer's flags are restored afterwards."""
    from scratchcnn.nn import Conv2d, Linear, Sequential, no_grad

    total = 0

    def run(module: Any, x: np.ndarray) -> np.ndarray:
        nonlocal total
        if isinstance(module, Sequential):
            for child in module.children():
                x = run(child, x)
            return x
        out = module(x)
        if isinstance(module, Conv2d):  # weight.size = C * KH * KW * O (groups=1)
            total += 2 * module.weight.data.size * out.shape[2] * out.shape[3]
        elif isinstance(module, Linear):
            total += 2 * module.weight.data.size
        return out

    dtype = next((param.data.dtype for param in model.parameters()), np.dtype(np.float32))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with no_grad():
            run(model, np.zeros((2, *input_shape), dtype=dtype))
    finally:
        for module, training in modes:
            module.train(training)
    return total


def gflops_per_second(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9 if seconds > 0 else float("nan")


def matmul_peak_gflops(*, size: int = 2048, repeats: int = 5,
                       dtype: Any = np.float32) -> dict[str, Any]:
    """This machine's practical peak: the best of ``repeats`` ``size``-square matmuls in NumPy
    with the BLAS threads currently applied (call ``apply_threads`` first)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    out = np.empty((size, size), dtype=dtype)
    np.matmul(a, b, out=out)  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return {"gflops": gflops_per_second(2.0 * size**3, best), "size": size, "repeats": repeats,
            "dtype": str(np.dtype(dtype)), "best_seconds": best}


def best_peak(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """The best of several ``matmul_peak_gflops`` results (taken at the start and end of a run:
    a busy machine at one moment would otherwise understate the peak), listing them all."""
    return {**max(measurements, key=lambda peak: peak["gflops"]),
            "measurements_gflops": [peak["gflops"] for peak in measurements]}
