"""Steps fused across layers: what a Sequential runs in place of a Conv2d and the layers after it.

A ``Conv2d`` directly followed (in execution order, see ``Sequential``) by a ``MaxPool2d`` whose
windows tile its output (when ``phase_order_pays``) and/or a ``ReLU`` runs as one
``ConvPoolReLU`` step, whose im2col rows are in pool-phase order (``F.pooled_im2col``): the pool
is then a maximum of contiguous blocks of the product rather than of strided slices.

* Under ``no_grad()`` every such run fuses: one pass of ``F.conv2d_inference`` over cache-sized
  pieces of the batch, the bias and ReLU on the pooled values only.
* With gradients, only a Sequential's first step (``fuse_first_for_training``), with its pool:
  the input gradient there is not wanted by default (see module.py), and the pool's forward and
  backward run over contiguous blocks. A later convolution needs its input gradient, which
  wants the rows back in layout order first, so it runs as its layers.

The values are the layers' own: the same products and bias adds, the pool's winners with its
ties. Only the training step's weight gradient sums its rows in another order (float32 bits
differ from the layers', ~1e-7 relative; float64 agrees to ~1e-16).

Only the exact layer types fuse, and not a layer whose ``forward`` was replaced on the instance
(a hook, a probe in a test): that layer runs as itself.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from scratchcnn.nn import functional as F
from scratchcnn.nn.activation import ReLU
from scratchcnn.nn.conv import Conv2d
from scratchcnn.nn.module import Module, check_grad_output, check_input, is_grad_enabled
from scratchcnn.nn.pooling import MaxPool2d


class _TrainingCache(NamedTuple):
    cols: np.ndarray  # the im2col matrix, rows in pool-phase order
    weight_matrix: np.ndarray
    winner: np.ndarray  # (M, O) winning phase per output; ``phases`` where the ReLU was 0
    padded_shape: tuple[int, ...]
    input_hw: tuple[int, int]
    conv_size: tuple[int, int]  # (OH, OW) of the convolution
    output_shape: tuple[int, ...]  # (N, O, OH // PH, OW // PW)


class ConvPoolReLU(Module):
    """``relu(pool(conv(x)))`` with the pool and the ReLU optional, as one step. The layers are
    its children (their parameters, no copies); shapes as the layers': (N, C, H, W) ->
    (N, O, OH // PH, OW // PW).

    Training (needs the pool): the rows of cols are in phase order, so the product is PH*PW
    blocks of (M, O), M = N * OH//PH * OW//PW; forward adds the bias, pools the blocks with
    ``F.first_max_and_argmax`` (the winning phase of each output, first on ties) and applies
    the ReLU. Backward, with g = dL/d(out) as (M, O):
        dL/d(conv out), phase order = g in the winner's block, 0 elsewhere and where the ReLU
                                      gave 0 (``F.unpool_phases``)
        dL/dW = cols^T dL/d(conv out),  dL/db = its column sums,
        dL/dx = the Conv2d's input gradient of dL/d(conv out) in layout order (only if asked).
    """

    splits_exactly = True  # per sample, like the layers it stands for

    def __init__(self, conv: Conv2d, pool: MaxPool2d | None, relu: ReLU | None) -> None:
        super().__init__()
        self.conv = conv
        if pool is not None:
            self.pool = pool
        if relu is not None:
            self.relu = relu
        self._cache: _TrainingCache | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        conv = self.conv
        pool: MaxPool2d | None = self._modules.get("pool")  # type: ignore[assignment]
        relu: ReLU | None = self._modules.get("relu")  # type: ignore[assignment]
        x = check_input(conv, x, 4, f"(N, {conv.in_channels}, H, W)", dim=1,
                        size=conv.in_channels)
        window = (1, 1) if pool is None else pool._kernel
        out_h, out_w = conv.output_size(x)
        self._cache = None
        if out_h < window[0] or out_w < window[1]:
            # The pool's input would be too small: the layers raise with its own message.
            return self._layer_by_layer(x)
        # Drop what an earlier forward cached, so the layers' own backward cannot use it.
        conv._clear_cache()
        if pool is not None:
            pool._argmax = None
        if relu is not None:
            relu._output = None
        if not is_grad_enabled():
            return conv.inference_forward(x, window, relu=relu is not None)
        if pool is None:
            raise RuntimeError("ConvPoolReLU: training needs the pool (fuse_first_for_training)")
        return self._training_forward(x, window, relu is not None, (out_h, out_w))

    def _training_forward(self, x: np.ndarray, window: tuple[int, int], relu: bool,
                          conv_size: tuple[int, int]) -> np.ndarray:
        conv, o, phases = self.conv, self.conv.out_channels, window[0] * window[1]
        pooled = (conv_size[0] // window[0], conv_size[1] // window[1])
        padded = conv.padded_input(x)
        cols = F.pooled_im2col(padded, conv.kernel_size, conv.stride, conv.dilation, window,
                               pooled, scratch_name=None)
        weight_matrix = conv.weight_matrix()
        product = F.matmul_rows(cols, weight_matrix)
        if conv.bias is not None:
            F.add_to_rows(product, conv.bias.data)  # before the pool: the layers' ties
        best, winner = F.first_max_and_argmax(list(product.reshape(phases, -1, o)))
        if relu:
            passed = best > 0  # False for NaN too: ReLU's gradient there is 0
            F.bias_then_relu(best, None, relu=True)
            winner = F.no_winner_where(winner, ~passed, phases)
        self._cache = _TrainingCache(cols, weight_matrix, winner, padded.shape,
                                     (x.shape[2], x.shape[3]), conv_size,
                                     (x.shape[0], o, *pooled))
        return F.to_nchw(best.reshape(x.shape[0], *pooled, o))

    def backward(self, grad_output: np.ndarray, *, input_grad: bool = True) -> np.ndarray | None:
        """(N, O, OH // PH, OW // PW) -> (N, C, H, W), or None when ``input_grad`` (or the
        Conv2d's ``needs_input_grad``) is False; adds dL/dW and dL/db into ``.grad``."""
        cache, conv = self._cache, self.conv
        if cache is None:
            raise RuntimeError(f"{self.describe()}: backward called without a preceding forward "
                               "with gradients on; call forward first")
        grad_output = check_grad_output(self, grad_output, cache.output_shape,
                                        cache.weight_matrix.dtype)
        o = conv.out_channels
        window = self._modules["pool"]._kernel  # type: ignore[attr-defined]
        grad_pooled = F.to_nhwc(grad_output).reshape(-1, o)  # free if channels-last
        grad_conv = F.unpool_phases(grad_pooled, cache.winner, window[0] * window[1])
        conv.accumulate_grads(cache.cols.T @ grad_conv, grad_conv)
        if not (input_grad and conv.needs_input_grad):
            return None
        grad_nhwc = F.phase_rows_to_nhwc(grad_conv, cache.output_shape[0], window,
                                         cache.output_shape[2:], cache.conv_size)
        return conv.grad_of_input(grad_nhwc.reshape(-1, o), cache.weight_matrix,
                                  cache.padded_shape, cache.input_hw, cache.conv_size)

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


def fuse_first_for_training(order: list[Module]) -> list[Module]:
    """``order`` with its first Conv2d, a tiling MaxPool2d right after it and the ReLU after
    that (optional) as one ``ConvPoolReLU``, when ``phase_order_pays``; else ``order``."""
    if not (len(order) >= 2 and _plain(order[0], Conv2d) and _plain(order[1], MaxPool2d)
            and tiles(order[1]) and phase_order_pays(order[0])):  # type: ignore[arg-type]
        return order
    relu = order[2] if len(order) > 2 and _plain(order[2], ReLU) else None
    step = ConvPoolReLU(order[0], order[1], relu)  # type: ignore[arg-type]
    return [step, *order[3 if relu is not None else 2:]]
