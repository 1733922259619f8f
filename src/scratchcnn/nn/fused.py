"""Inference steps fused across layers: what a Sequential runs under ``no_grad()``.

A ``Conv2d`` directly followed (in execution order, see ``Sequential``) by a ``MaxPool2d`` whose
windows tile its output (when ``phase_order_pays``) and/or a ``ReLU`` runs as one ``ConvPoolReLU``
step: one pass of ``F.conv2d_inference`` over cache-sized pieces of the batch, where the pool is
a maximum of contiguous blocks of the product and the bias and ReLU touch only the pooled values.
Nothing changes with gradients on (backward needs each layer's cache), and the values are the
layers' own: the same products, the bias added after the pool (exact, see
``F.conv2d_inference``).

Only the exact layer types fuse, and not a layer whose ``forward`` was replaced on the instance
(a hook, a probe in a test): that layer runs as itself.
"""

from __future__ import annotations

import numpy as np

from scratchcnn.nn.activation import ReLU
from scratchcnn.nn.conv import Conv2d
from scratchcnn.nn.module import Module, check_input
from scratchcnn.nn.pooling import MaxPool2d


class ConvPoolReLU(Module):
    """Inference only: ``relu(pool(conv(x)))`` with the pool and the ReLU optional, as one step.
    The layers are its children (their parameters, no copies); it has no backward."""

    splits_exactly = True  # per sample, like the layers it stands for

    def __init__(self, conv: Conv2d, pool: MaxPool2d | None, relu: ReLU | None) -> None:
        super().__init__()
        self.conv = conv
        if pool is not None:
            self.pool = pool
        if relu is not None:
            self.relu = relu

    def forward(self, x: np.ndarray) -> np.ndarray:
        conv = self.conv
        pool: MaxPool2d | None = self._modules.get("pool")  # type: ignore[assignment]
        x = check_input(conv, x, 4, f"(N, {conv.in_channels}, H, W)", dim=1,
                        size=conv.in_channels)
        window = (1, 1) if pool is None else pool._kernel
        out_h, out_w = conv.output_size(x)
        if out_h < window[0] or out_w < window[1]:
            # The pool's input would be too small: its own message says so.
            return self._layer_by_layer(x)
        # Drop what a training forward cached, as each layer does under no_grad.
        conv._clear_cache()
        if pool is not None:
            pool._argmax = None
        relu: ReLU | None = self._modules.get("relu")  # type: ignore[assignment]
        if relu is not None:
            relu._output = None
        return conv.inference_forward(x, window, relu=relu is not None)

    def _layer_by_layer(self, x: np.ndarray) -> np.ndarray:
        for module in self._modules.values():
            x = module(x)
        return x


def tiles(pool: MaxPool2d) -> bool:
    """Whether ``pool``'s windows tile its input: stride = kernel, no padding or dilation, and
    (ceil_mode off) the remainder dropped, so each input element is read by at most one window."""
    return (pool._stride == pool._kernel and pool._padding == (0, 0)
            and pool._dilation == (1, 1) and not pool.ceil_mode)


def phase_order_pays(conv: Conv2d) -> bool:
    """Whether to pool inside the convolution (im2col rows in pool-phase order). With one input
    channel, ordering the rows by phase turns each tap's copy into a copy of single elements:
    for 3x3 kernels it still paid (simple-cnn's first layer and pool, 64 samples per piece:
    0.082 s per 10,000 images against 0.092 s for the standard order and a separate pool), for
    LeNet's 5x5 it did not (0.18 s against 0.13 s), so the pool then runs as its own layer."""
    kh, kw = conv.kernel_size
    return conv.in_channels > 1 or kh * kw <= 9


def _plain(module: Module, kind: type) -> bool:
    return type(module) is kind and "forward" not in vars(module)


def fuse_for_inference(order: list[Module]) -> list[Module]:
    """``order`` (a Sequential's execution order) with each Conv2d, tiling MaxPool2d, ReLU run
    (the pool and the ReLU each optional, at least one present) as one ``ConvPoolReLU``."""
    steps: list[Module] = []
    index = 0
    while index < len(order):
        module = order[index]
        index += 1
        if not _plain(module, Conv2d):
            steps.append(module)
            continue
        pool = relu = None
        if index < len(order) and _plain(order[index], MaxPool2d) and tiles(order[index]):
            if not phase_order_pays(module):
                steps.append(module)  # the convolution alone; the pool and ReLU as themselves
                continue
            pool = order[index]
            index += 1
        if index < len(order) and _plain(order[index], ReLU):
            relu = order[index]
            index += 1
        steps.append(ConvPoolReLU(module, pool, relu) if pool or relu else module)
    return steps
