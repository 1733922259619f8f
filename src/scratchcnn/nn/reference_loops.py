"""Convolution and pooling the textbook way: explicit Python loops over every sample, channel and
output pixel, in NCHW.

Deliberately slow (thousands of times slower than ``Conv2d``/``MaxPool2d``) and only for teaching
and tests: each function reads like the formula it implements, and the test suite uses them as an
oracle that shares no code with the vectorised layers (padding here is ``np.pad``, windows are
plain slices). Stride and padding are ints or (height, width) pairs; no dilation, floor mode only.
"""

from __future__ import annotations

import numpy as np


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _pad(x: np.ndarray, padding: tuple[int, int], fill: float) -> np.ndarray:
    ph, pw = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)


def _output_size(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int]) -> tuple[int, int]:
    h, w = x.shape[2:]
    return ((h + 2 * padding[0] - kernel[0]) // stride[0] + 1,
            (w + 2 * padding[1] - kernel[1]) // stride[1] + 1)


def conv2d_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                   stride: int | tuple[int, int] = 1,
                   padding: int | tuple[int, int] = 0) -> np.ndarray:
    """x (N, C, H, W), weight (O, C, KH, KW), bias (O,) or None -> (N, O, OH, OW):
    out[n, o, i, j] = bias[o] + sum_{c, kh, kw} weight[o, c, kh, kw] * x_pad[n, c, i*sh + kh,
    j*sw + kw]."""
    stride, padding = _pair(stride), _pair(padding)
    n_samples = x.shape[0]
    out_channels, _, kh, kw = weight.shape
    out_h, out_w = _output_size(x, (kh, kw), stride, padding)
    x_pad = _pad(x, padding, 0.0)
    out = np.zeros((n_samples, out_channels, out_h, out_w), dtype=x.dtype)
    for n in range(n_samples):
        for o in range(out_channels):
            for i in range(out_h):
                for j in range(out_w):
                    top, left = i * stride[0], j * stride[1]
                    window = x_pad[n, :, top:top + kh, left:left + kw]
                    out[n, o, i, j] = np.sum(window * weight[o])
                    if bias is not None:
                        out[n, o, i, j] += bias[o]
    return out


def conv2d_backward(grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray,
                    stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """grad_out (N, O, OH, OW) -> (grad_x (N, C, H, W), grad_weight (O, C, KH, KW),
    grad_bias (O,)). Each output pixel sends grad_out * weight[o] back to the window it read,
    and grad_out * window to weight[o]."""
    stride, padding = _pair(stride), _pair(padding)
    n_samples, out_channels, out_h, out_w = grad_out.shape
    kh, kw = weight.shape[2:]
    x_pad = _pad(x, padding, 0.0)
    grad_x_pad = np.zeros_like(x_pad)
    grad_weight = np.zeros_like(weight)
    grad_bias = np.zeros(out_channels, dtype=grad_out.dtype)
    for n in range(n_samples):
        for o in range(out_channels):
            for i in range(out_h):
                for j in range(out_w):
                    g = grad_out[n, o, i, j]
                    top, left = i * stride[0], j * stride[1]
                    grad_x_pad[n, :, top:top + kh, left:left + kw] += g * weight[o]
                    grad_weight[o] += g * x_pad[n, :, top:top + kh, left:left + kw]
                    grad_bias[o] += g
    h, w = x.shape[2:]
    grad_x = grad_x_pad[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w]
    return grad_x, grad_weight, grad_bias


def maxpool2d_forward(x: np.ndarray, kernel_size: int | tuple[int, int],
                      stride: int | tuple[int, int] | None = None,
                      padding: int | tuple[int, int] = 0) -> np.ndarray:
    """(N, C, H, W) -> (N, C, OH, OW): the maximum of each window, padding with -inf."""
    kernel = _pair(kernel_size)
    stride, padding = _pair(kernel if stride is None else stride), _pair(padding)
    n_samples, channels = x.shape[:2]
    out_h, out_w = _output_size(x, kernel, stride, padding)
    x_pad = _pad(x, padding, -np.inf)
    out = np.zeros((n_samples, channels, out_h, out_w), dtype=x.dtype)
    for n in range(n_samples):
        for c in range(channels):
            for i in range(out_h):
                for j in range(out_w):
                    top, left = i * stride[0], j * stride[1]
                    out[n, c, i, j] = x_pad[n, c, top:top + kernel[0], left:left + kernel[1]].max()
    return out


def maxpool2d_backward(grad_out: np.ndarray, x: np.ndarray, kernel_size: int | tuple[int, int],
                       stride: int | tuple[int, int] | None = None,
                       padding: int | tuple[int, int] = 0) -> np.ndarray:
    """grad_out (N, C, OH, OW) -> grad_x (N, C, H, W). Each window's gradient goes to its
    maximum; on a tie, to the first maximum in row-major order (what PyTorch's CPU kernel does).
    Overlapping windows add up."""
    kernel = _pair(kernel_size)
    stride, padding = _pair(kernel if stride is None else stride), _pair(padding)
    n_samples, channels, out_h, out_w = grad_out.shape
    x_pad = _pad(x, padding, -np.inf)
    grad_x_pad = np.zeros_like(x_pad)
    for n in range(n_samples):
        for c in range(channels):
            for i in range(out_h):
                for j in range(out_w):
                    top, left = i * stride[0], j * stride[1]
                    window = x_pad[n, c, top:top + kernel[0], left:left + kernel[1]]
                    # np.argmax on the flattened window returns the first maximum, row-major.
                    di, dj = divmod(int(np.argmax(window)), kernel[1])
                    grad_x_pad[n, c, top + di, left + dj] += grad_out[n, c, i, j]
    h, w = x.shape[2:]
    return grad_x_pad[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w]


def avgpool2d_forward(x: np.ndarray, kernel_size: int | tuple[int, int],
                      stride: int | tuple[int, int] | None = None,
                      padding: int | tuple[int, int] = 0) -> np.ndarray:
    """(N, C, H, W) -> (N, C, OH, OW): the mean of each KH*KW window, zero padding counted
    (PyTorch's default count_include_pad=True)."""
    kernel = _pair(kernel_size)
    stride, padding = _pair(kernel if stride is None else stride), _pair(padding)
    n_samples, channels = x.shape[:2]
    out_h, out_w = _output_size(x, kernel, stride, padding)
    x_pad = _pad(x, padding, 0.0)
    out = np.zeros((n_samples, channels, out_h, out_w), dtype=x.dtype)
    for n in range(n_samples):
        for c in range(channels):
            for i in range(out_h):
                for j in range(out_w):
                    top, left = i * stride[0], j * stride[1]
                    window = x_pad[n, c, top:top + kernel[0], left:left + kernel[1]]
                    out[n, c, i, j] = window.sum() / (kernel[0] * kernel[1])
    return out


def avgpool2d_backward(grad_out: np.ndarray, x: np.ndarray, kernel_size: int | tuple[int, int],
                       stride: int | tuple[int, int] | None = None,
                       padding: int | tuple[int, int] = 0) -> np.ndarray:
    """grad_out (N, C, OH, OW) -> grad_x (N, C, H, W): every element of a window gets
    grad_out / (KH*KW)."""
    kernel = _pair(kernel_size)
    stride, padding = _pair(kernel if stride is None else stride), _pair(padding)
    n_samples, channels, out_h, out_w = grad_out.shape
    grad_x_pad = np.zeros_like(_pad(x, padding, 0.0))
    for n in range(n_samples):
        for c in range(channels):
            for i in range(out_h):
                for j in range(out_w):
                    top, left = i * stride[0], j * stride[1]
                    share = grad_out[n, c, i, j] / (kernel[0] * kernel[1])
                    grad_x_pad[n, c, top:top + kernel[0], left:left + kernel[1]] += share
    h, w = x.shape[2:]
    return grad_x_pad[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w]
