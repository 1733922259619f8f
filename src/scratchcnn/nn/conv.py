"""Conv2d: 2-D convolution (cross-correlation, as in PyTorch) by im2col and one matrix product."""

from __future__ import annotations

from typing import Any

import numpy as np

from scratchcnn.nn import functional as F
from scratchcnn.nn.init import default_layer_init_
from scratchcnn.nn.module import (
    Module,
    Parameter,
    as_float_dtype,
    check_grad_output,
    check_input,
    is_grad_enabled,
)


class Conv2d(Module):
    """``torch.nn.Conv2d`` with ``groups=1`` and zero padding.

    Shapes: input (N, C, H, W) -> output (N, O, OH, OW), with
    OH = floor((H + pad_top + pad_bottom - dilation*(KH-1) - 1) / stride) + 1 (same for OW);
    weight (O, C, KH, KW), bias (O,).

    Forward: out[n, o, i, j] = bias[o] + sum_{c,kh,kw} weight[o, c, kh, kw]
                                                     * x_pad[n, c, i*s + kh*d, j*s + kw*d].
    Computed channels-last: the padded input is unfolded into cols (N*OH*OW, KH*KW*C) and
    multiplied once by the weight as a (KH*KW*C, O) matrix. When cols would exceed
    ``F.MAX_COLS_BYTES`` (bn-cnn's 32-channel 28x28 layers: 58 MB at batch 64), it is built and
    multiplied a few samples at a time instead, never whole, and rebuilt the same way for dL/dW.

    Backward, with g = dL/d(out) as (N*OH*OW, O):
    dL/dW = cols^T g, dL/db = sum of g over N, OH, OW, and dL/dx = col2im(g W^T): each kernel
    tap's slice of g W^T is added back onto the input positions that tap read. With stride 1
    that sum is itself a convolution, computed as one: g, zero-padded by d*(K-1) - p, correlated
    with the kernel turned 180 degrees and its channel axes swapped (``F.conv2d_input_grad``).
    A model's first layer skips dL/dx (``input_grad=False``, see module.py).

    Under ``no_grad()`` forward keeps no cache and runs ``inference_forward``
    (``F.conv2d_inference``: cache-sized pieces, reused buffers); a Sequential also hands it the
    tiling MaxPool2d and the ReLU that follow, to run in the same pass (nn/fused.py).

    ``padding`` may be an int, a pair, ``"valid"`` (no padding) or ``"same"`` (output size = input
    size, stride 1 only; an odd total goes one extra row/column at the bottom/right, like PyTorch).
    The output is an NCHW-shaped view of channels-last memory (see module.py).
    """

    splits_exactly = True  # its products go in pieces of rows whose sums do not depend on N

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, dtype: Any = None,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        owner = "Conv2d"
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
        if groups != 1:
            raise ValueError(f"{owner}: only groups=1 is supported, got groups={groups!r}")
        if padding_mode != "zeros":
            raise ValueError(f"{owner}: only padding_mode='zeros' is supported, "
                             f"got {padding_mode!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = F.check_positive(F.pair(kernel_size, "kernel_size", owner),
                                            "kernel_size", owner)
        self.stride = F.check_positive(F.pair(stride, "stride", owner), "stride", owner)
        self.dilation = F.check_positive(F.pair(dilation, "dilation", owner), "dilation", owner)
        self.groups = 1
        self.padding_mode = padding_mode
        self.padding: tuple[int, int] | str
        self._pad: tuple[int, int, int, int]  # (top, bottom, left, right)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"{owner}: invalid padding string {padding!r}, "
                                 "should be one of {'valid', 'same'}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"{owner}: padding='same' is not supported for strided "
                                 f"convolutions (stride={self.stride}); use an int padding")
            self.padding = padding
            total_h, total_w = (0, 0) if padding == "valid" else (
                self.dilation[0] * (self.kernel_size[0] - 1),
                self.dilation[1] * (self.kernel_size[1] - 1))
            self._pad = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        else:
            self.padding = F.check_positive(F.pair(padding, "padding", owner), "padding", owner,
                                            minimum=0)
            self._pad = (self.padding[0], self.padding[0], self.padding[1], self.padding[1])

        dtype = as_float_dtype(dtype)
        kh, kw = self.kernel_size
        self.weight = Parameter(np.empty((self.out_channels, self.in_channels, kh, kw), dtype))
        self.bias = Parameter(np.empty(self.out_channels, dtype)) if bias else None
        default_layer_init_(self.weight, self.bias, rng)
        self._clear_cache()

    def _clear_cache(self) -> None:
        self._cols: np.ndarray | None = None  # im2col matrix (N*OH*OW, KH*KW*C) of the last input
        self._padded: np.ndarray | None = None  # or, if that is too large, the padded input
        self._samples_per_piece = 0  # and how many samples' cols to build at a time
        self._weight_matrix: np.ndarray | None = None  # weight as (KH*KW*C, O), used by forward
        self._padded_shape: tuple[int, ...] = ()
        self._input_hw: tuple[int, int] = (0, 0)
        self._output_shape: tuple[int, ...] = ()

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, O, OH, OW); caches the im2col matrix for ``backward``."""
        x = check_input(self, x, 4, f"(N, {self.in_channels}, H, W)", dim=1,
                        size=self.in_channels)
        if not is_grad_enabled():
            self._clear_cache()
            return self.inference_forward(x)
        n, _, h, w = x.shape
        out_h, out_w = self.output_size(x)
        # The last forward's cols are rewritten in place (F.recycled), so its cache goes first:
        # an error below leaves no cache rather than a half-rewritten one.
        previous_cols = self._cols
        self._clear_cache()
        padded = self.padded_input(x)
        weight_matrix = self.weight_matrix()
        per_piece = F.cols_piece_samples(padded, weight_matrix.shape[0], (out_h, out_w))
        if per_piece == 0:
            # The one im2col copy: rows are output pixels, columns are (kh, kw, c) taps, so the
            # reduction over taps is one BLAS matrix product (run in pieces of rows that BLAS
            # multiplies without repacking, see F.matmul_rows).
            cols = F.im2col(padded, self.kernel_size, (out_h, out_w), self.stride, self.dilation,
                            reuse=previous_cols)
            out = F.matmul_rows(cols, weight_matrix)
        else:
            cols = None
            out = F.im2col_matmul(padded, weight_matrix, per_piece, self.kernel_size,
                                  (out_h, out_w), self.stride, self.dilation)
        if self.bias is not None:
            F.add_to_rows(out, self.bias.data)

        self._cols, self._weight_matrix = cols, weight_matrix
        self._padded = padded if cols is None else None
        self._samples_per_piece = per_piece
        self._padded_shape, self._input_hw = padded.shape, (h, w)
        self._output_shape = (n, self.out_channels, out_h, out_w)
        return F.to_nchw(out.reshape(n, out_h, out_w, self.out_channels))

    def backward(self, grad_output: np.ndarray, *, input_grad: bool = True) -> np.ndarray | None:
        """(N, O, OH, OW) -> (N, C, H, W), or None when ``input_grad`` (or the layer's
        ``needs_input_grad``) is False; adds dL/dW and dL/db into the parameters' ``.grad``."""
        if (self._cols is None and self._padded is None) or self._weight_matrix is None:
            raise RuntimeError(f"{self.describe()}: backward called without a preceding forward "
                               "(or after a forward under no_grad()); call forward first")
        cols, weight_matrix = self._cols, self._weight_matrix
        grad_output = check_grad_output(self, grad_output, self._output_shape,
                                        weight_matrix.dtype)
        _, o, out_h, out_w = self._output_shape
        grad_2d = F.to_nhwc(grad_output).reshape(-1, o)  # free if grad_output is channels-last

        if cols is not None:
            grad_weight_2d = cols.T @ grad_2d
        else:  # cols rebuilt piece by piece, as in forward
            assert self._padded is not None
            grad_weight_2d = F.im2col_t_matmul(self._padded, grad_2d, self._samples_per_piece,
                                               self.kernel_size, (out_h, out_w), self.stride,
                                               self.dilation)
        self.accumulate_grads(grad_weight_2d, grad_2d)
        if not (input_grad and self.needs_input_grad):
            return None
        return self.grad_of_input(grad_2d, weight_matrix, self._padded_shape, self._input_hw,
                                  (out_h, out_w))

    def accumulate_grads(self, grad_weight_2d: np.ndarray, grad_2d: np.ndarray) -> None:
        """Add dL/dW, given as the (KH*KW*C, O) product cols^T g, and dL/db = the column sums
        of g (any row order), into the parameters' ``.grad``."""
        kh, kw = self.kernel_size
        self.weight.accumulate_grad(
            grad_weight_2d.reshape(kh, kw, self.in_channels, -1).transpose(3, 2, 0, 1))
        if self.bias is not None:
            self.bias.accumulate_grad(F.sum_rows(grad_2d))

    def grad_of_input(self, grad_2d: np.ndarray, weight_matrix: np.ndarray,
                      padded_shape: tuple[int, ...], input_hw: tuple[int, int],
                      out_size: tuple[int, int]) -> np.ndarray:
        """dL/dx (N, C, H, W) from g = dL/d(out) as (N*OH*OW, O), rows in output order: with
        stride 1, a correlation of the zero-padded g with the turned kernel
        (``F.conv2d_input_grad``); else col2im(g W^T) over the padded input, cropped."""
        if F.full_correlation_fits(self.stride, self.kernel_size, self.dilation, self._pad):
            grad_nhwc = grad_2d.reshape(padded_shape[0], *out_size, self.out_channels)
            return F.to_nchw(F.conv2d_input_grad(grad_nhwc, weight_matrix, self.kernel_size,
                                                 self.dilation, self._pad, input_hw))
        top, _, left, _ = self._pad
        h, w = input_hw
        grad_padded = F.col2im_per_tap(grad_2d, weight_matrix, padded_shape, self.kernel_size,
                                       out_size, self.stride, self.dilation)
        return F.to_nchw(grad_padded[:, top:top + h, left:left + w, :])

    def inference_forward(self, x: np.ndarray, pool: tuple[int, int] = (1, 1),
                          relu: bool = False) -> np.ndarray:
        """``forward`` without a cache for backward (what ``no_grad`` runs), optionally followed
        by a max pool with (PH, PW) windows and strides and by a ReLU, in one pass over pieces of
        the batch (``F.conv2d_inference``): (N, C, H, W) -> (N, O, OH // PH, OW // PW)."""
        out_size = self.output_size(x)
        padded = self.padded_input(x, scratch_name="conv_input")
        bias = None if self.bias is None else self.bias.data
        out = F.conv2d_inference(padded, self.weight_matrix(), bias, self.kernel_size,
                                 self.stride, self.dilation, out_size, pool, relu)
        return F.to_nchw(out)

    def output_size(self, x: np.ndarray) -> tuple[int, int]:
        """(OH, OW) for an (N, C, H, W) input; a ValueError if the kernel does not fit."""
        h, w = x.shape[2:]
        top, bottom, left, right = self._pad
        kh, kw = self.kernel_size
        out_h = F.conv_output_size(h, kh, self.stride[0], top, bottom, self.dilation[0])
        out_w = F.conv_output_size(w, kw, self.stride[1], left, right, self.dilation[1])
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"{self.describe()}: input of shape {tuple(x.shape)} is padded to "
                f"{h + top + bottom}x{w + left + right}, smaller than the kernel's span "
                f"{F.effective_kernel(kh, self.dilation[0])}x"
                f"{F.effective_kernel(kw, self.dilation[1])}; use a larger input or more padding")
        return out_h, out_w

    def padded_input(self, x: np.ndarray, scratch_name: str | None = None) -> np.ndarray:
        """The channels-last (N, H + padding, W + padding, C) input the kernel slides over."""
        x_nhwc = F.to_nhwc(x)
        if not any(self._pad):
            return x_nhwc
        return F.pad_nhwc(x_nhwc, *self._pad, scratch_name=scratch_name)

    def weight_matrix(self) -> np.ndarray:
        """The weight as (KH*KW*C, O): (O, C, KH, KW) -> (KH, KW, C, O) matches im2col's column
        order; the copy is small."""
        return self.weight.data.transpose(2, 3, 1, 0).reshape(-1, self.out_channels)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return text
