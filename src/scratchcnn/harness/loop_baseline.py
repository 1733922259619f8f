"""The textbook baseline for ``bench``: a model whose convolutions and max-pools run through the
loop-based ``scratchcnn.nn.reference_loops`` (Python loops over samples, channels and pixels, as
the notebooks this project answers did), timed on a few images and extrapolated.

The other layers (ReLU, Flatten, Linear, ...) use the engine's modules: they were already matrix
operations in the notebooks, so only the layers that were loops there are loops here.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from scratchcnn import nn
from scratchcnn.nn import reference_loops


class _LoopSequential:
    """Forward/backward through a built NumPy model, with Conv2d and MaxPool2d replaced by the
    loop functions (which share no code with the vectorised layers)."""

    def __init__(self, model: nn.Sequential) -> None:
        self.layers = list(model._modules.values())
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d) and (
                    isinstance(layer.padding, str) or layer.dilation != (1, 1)):
                raise ValueError("loop baseline: Conv2d with string padding or dilation has no "
                                 "loop version; use --skip-reference")
        self._inputs: list[np.ndarray | None] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._inputs = []
        for layer in self.layers:
            self._inputs.append(x)
            if isinstance(layer, nn.Conv2d):
                bias = None if layer.bias is None else layer.bias.data
                x = reference_loops.conv2d_forward(x, layer.weight.data, bias,
                                                   layer.stride, layer.padding)
            elif isinstance(layer, nn.MaxPool2d):
                x = reference_loops.maxpool2d_forward(x, layer.kernel_size, layer.stride,
                                                      layer.padding)
            else:
                x = layer(x)
        return x

    def backward(self, grad: np.ndarray) -> np.ndarray:
        for layer, x in zip(reversed(self.layers), reversed(self._inputs), strict=True):
            if isinstance(layer, nn.Conv2d):
                grad, grad_weight, grad_bias = reference_loops.conv2d_backward(
                    grad, x, layer.weight.data, layer.stride, layer.padding)
                layer.weight.accumulate_grad(grad_weight.astype(layer.weight.dtype))
                if layer.bias is not None:
                    layer.bias.accumulate_grad(grad_bias.astype(layer.bias.dtype))
            elif isinstance(layer, nn.MaxPool2d):
                grad = reference_loops.maxpool2d_backward(grad, x, layer.kernel_size,
                                                          layer.stride, layer.padding)
            else:
                grad = layer.backward(grad)
        return grad


def time_loop_baseline(model: nn.Sequential, optimizer: Any, images: np.ndarray,
                       labels: np.ndarray, *, train: bool = True) -> dict[str, Any]:
    """Seconds per image of a loop-based forward pass (eval mode, no grad) and, when ``train``,
    of a loop-based training step (forward, loss, backward, ``optimizer.step()``) on
    ``images``. ``model`` is modified by the training step."""
    loops = _LoopSequential(model)
    n = len(images)
    model.eval()
    with nn.no_grad():
        start = time.perf_counter()
        loops.forward(images)
        forward_seconds = time.perf_counter() - start
    result: dict[str, Any] = {"images": n, "forward_seconds_per_image": forward_seconds / n,
                              "train_seconds_per_image": None}
    if train:
        criterion = nn.CrossEntropyLoss()
        model.train()
        start = time.perf_counter()
        criterion(loops.forward(images), labels)
        optimizer.zero_grad()
        loops.backward(criterion.backward())
        optimizer.step()
        result["train_seconds_per_image"] = (time.perf_counter() - start) / n
    return result
