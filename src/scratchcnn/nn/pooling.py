"""MaxPool2d and AvgPool2d, vectorised over samples, pixels and channels.

Both compute channels-last and loop only over the KH*KW kernel taps: ``tap_view`` gives, for one
tap (kh, kw), the (N, OH, OW, C) slice of the padded input that tap reads at every output position.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scratchcnn.nn import functional as F
from scratchcnn.nn.module import (
    Module,
    check_grad_output,
    check_input,
    is_grad_enabled,
)


class _Pool2d(Module):
    """Geometry shared by the pooling layers: kernel, stride (default: the kernel), padding,
    dilation and ceil_mode, validated as PyTorch does."""

    splits_exactly = True  # each window is one sample's

    def __init__(self, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                 ceil_mode: bool) -> None:
        super().__init__()
        owner = type(self).__name__
        # Stored as given (int or tuple), so that repr matches PyTorch's.
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.ceil_mode = bool(ceil_mode)
        self._kernel = F.check_positive(F.pair(kernel_size, "kernel_size", owner),
                                        "kernel_size", owner)
        self._stride = F.check_positive(F.pair(self.stride, "stride", owner), "stride", owner)
        self._padding = F.check_positive(F.pair(padding, "padding", owner), "padding", owner,
                                         minimum=0)
        self._dilation = F.check_positive(F.pair(dilation, "dilation", owner), "dilation", owner)
        # PyTorch's rule uses the kernel size itself, not the dilated span.
        if any(self._padding[a] > self._kernel[a] // 2 for a in (0, 1)):
            raise ValueError(f"{owner}: padding {self._padding} must be at most half of the "
                             f"kernel size {self._kernel} (as in PyTorch); reduce the padding")
        self._argmax: np.ndarray | None = None
        self._divisor: np.ndarray | None = None
        self._padded_shape: tuple[int, ...] = ()
        self._input_hw: tuple[int, int] = (0, 0)
        self._output_shape: tuple[int, ...] = ()
        self._dtype: np.dtype = np.dtype(np.float32)

    def _geometry(self, x: np.ndarray) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """Output size (OH, OW) and padding (top, bottom, left, right) for input ``x``. With
        ceil_mode the last window may run past the padded input; the extra bottom/right padding
        covers it (pooling ignores it: -inf for max, excluded from the average's divisor)."""
        out_size, pad_after = [], []
        for axis in (0, 1):
            size, kernel, stride = x.shape[2 + axis], self._kernel[axis], self._stride[axis]
            pad, dilation = self._padding[axis], self._dilation[axis]
            out = F.pool_output_size(size, kernel, stride, pad, dilation, self.ceil_mode)
            needed = (out - 1) * stride + F.effective_kernel(kernel, dilation)
            out_size.append(out)
            pad_after.append(max(pad, needed - size - pad))
        if min(out_size) < 1:
            raise ValueError(f"{self.describe()}: input of shape {tuple(x.shape)} is too small "
                             f"for kernel {self._kernel} with padding {self._padding} (output "
                             f"would be {out_size[0]}x{out_size[1]}); use a larger input")
        (out_h, out_w), (ph, pw) = out_size, self._padding
        return (out_h, out_w), (ph, pad_after[0], pw, pad_after[1])

    def _crop(self, grad_padded: np.ndarray) -> np.ndarray:
        """The input-sized (N, C, H, W) view of a padded channels-last gradient buffer."""
        (top, left), (h, w) = self._padding, self._input_hw
        return F.to_nchw(grad_padded[:, top:top + h, left:left + w, :])

    def _remember_shapes(self, x: np.ndarray, padded: np.ndarray,
                         out_size: tuple[int, int]) -> None:
        self._padded_shape, self._input_hw, self._dtype = padded.shape, x.shape[2:], x.dtype
        self._output_shape = (x.shape[0], x.shape[1], *out_size)

    def _check_backward(self, cache: np.ndarray | None, grad_output: Any) -> np.ndarray:
        if cache is None:
            raise RuntimeError(f"{self.describe()}: backward called without a preceding forward "
                               "(or after a forward under no_grad()); call forward first")
        return F.to_nhwc(check_grad_output(self, grad_output, self._output_shape,
                                             self._dtype))


class MaxPool2d(_Pool2d):
    """``torch.nn.MaxPool2d`` (without ``return_indices``).

    Shapes: (N, C, H, W) -> (N, C, OH, OW), OH = floor_or_ceil((H + 2p - d*(KH-1) - 1) / s) + 1.
    Forward: out[n, c, i, j] = max over taps (kh, kw) of x_pad[n, c, i*s + kh*d, j*s + kw*d], the
    border padded with -inf. Backward: each output's gradient goes to the one input element that
    was its maximum: the first in row-major (kh, kw) order when several tie, exactly as PyTorch's
    CPU kernel; an input element that is the maximum of several overlapping windows gets the sum.
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: Any = None,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 return_indices: bool = False, ceil_mode: bool = False) -> None:
        if return_indices:
            raise ValueError("MaxPool2d: return_indices=True is not supported")
        super().__init__(kernel_size, stride, padding, dilation, ceil_mode)
        self.dilation = dilation
        self.return_indices = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, C, OH, OW); caches only the winning tap's index per output."""
        x = check_input(self, x, 4, "(N, C, H, W)")
        out_size, pads = self._geometry(x)
        x_nhwc = F.to_nhwc(x)
        padded = F.pad_nhwc(x_nhwc, *pads, fill=-np.inf) if any(pads) else x_nhwc
        kh, kw = self._kernel
        taps = [F.tap_view(padded, *divmod(tap_index, kw), out_size, self._stride,
                           self._dilation) for tap_index in range(kh * kw)]
        if is_grad_enabled():
            best, self._argmax = F.first_max_and_argmax(taps)
            self._remember_shapes(x, padded, out_size)
        else:  # inference needs no argmax: a running maximum makes a third of the passes
            best = taps[0].copy()
            for tap in taps[1:]:
                np.maximum(best, tap, out=best)
            self._argmax = None
        return F.to_nchw(best)

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        """(N, C, OH, OW) -> (N, C, H, W): dL/dx[argmax position of each window] += dL/dout."""
        argmax = self._argmax
        grad_nhwc = self._check_backward(argmax, grad_output)
        assert argmax is not None
        kw = self._kernel[1]
        out_size = self._output_shape[2:]
        # Windows that tile the padded input exactly write every element below: no zero fill.
        tiles = self._dilation == (1, 1) and all(
            self._stride[a] == self._kernel[a] and out_size[a] * self._stride[a] ==
            self._padded_shape[1 + a] for a in (0, 1))
        grad_padded = (np.empty if tiles else np.zeros)(self._padded_shape, dtype=self._dtype)
        # When windows cannot overlap, each input element belongs to at most one tap's slice, so
        # writing beats read-add-write. Masks multiply rather than np.add(where=), which is ~10x
        # slower; the price is that an infinite upstream gradient would leak NaN to non-maxima.
        disjoint = all(self._stride[a] >= F.effective_kernel(self._kernel[a], self._dilation[a])
                       for a in (0, 1))
        for tap_index in range(self._kernel[0] * kw):
            tap = F.tap_view(grad_padded, *divmod(tap_index, kw), out_size, self._stride,
                             self._dilation)
            if disjoint:
                np.multiply(grad_nhwc, argmax == tap_index, out=tap)
            else:
                tap += grad_nhwc * (argmax == tap_index)  # overlapping windows add up
        return self._crop(grad_padded)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(_Pool2d):
    """``torch.nn.AvgPool2d``.

    Shapes: (N, C, H, W) -> (N, C, OH, OW), OH = floor_or_ceil((H + 2p - KH) / s) + 1.
    Forward: out[n, c, i, j] = (sum over taps of x_pad[n, c, i*s + kh, j*s + kw]) / D[i, j], zero
    padding, where D is ``divisor_override`` if given, else the window's size clipped to the padded
    input (count_include_pad=True) or the number of real input elements in it (False).
    Backward: dL/dx_pad[n, c, i*s + kh, j*s + kw] += dL/dout[n, c, i, j] / D[i, j] for every tap.
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: Any = None,
                 padding: int | tuple[int, int] = 0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: int | None = None) -> None:
        super().__init__(kernel_size, stride, padding, 1, ceil_mode)
        if divisor_override is not None and (
                isinstance(divisor_override, bool) or not isinstance(divisor_override, int)
                or divisor_override < 1):
            raise ValueError(f"AvgPool2d: divisor_override must be a positive int or None, got "
                             f"{divisor_override!r}")
        self.count_include_pad = bool(count_include_pad)
        self.divisor_override = divisor_override

    def _divisors(self, hw: tuple[int, int], out_size: tuple[int, int],
                  dtype: np.dtype) -> np.ndarray:
        """D[i, j] as an (OH, OW, 1) array, built from per-axis window sizes (PyTorch's rule)."""
        if self.divisor_override is not None:
            return np.full((*out_size, 1), self.divisor_override, dtype=dtype)
        per_axis = []
        for axis in (0, 1):
            size, pad = hw[axis], self._padding[axis]
            start = np.arange(out_size[axis]) * self._stride[axis] - pad
            end = np.minimum(start + self._kernel[axis], size + pad)  # ceil overhang not counted
            if self.count_include_pad:
                per_axis.append(end - start)
            else:
                per_axis.append(np.minimum(end, size) - np.maximum(start, 0))
        return np.multiply.outer(*per_axis).astype(dtype)[:, :, None]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, C, OH, OW)."""
        x = check_input(self, x, 4, "(N, C, H, W)")
        out_size, pads = self._geometry(x)
        x_nhwc = F.to_nhwc(x)
        padded = F.pad_nhwc(x_nhwc, *pads) if any(pads) else x_nhwc
        kh, kw = self._kernel
        total = F.tap_view(padded, 0, 0, out_size, self._stride).copy()
        for tap_index in range(1, kh * kw):
            total += F.tap_view(padded, *divmod(tap_index, kw), out_size, self._stride)
        divisor = self._divisors(x.shape[2:], out_size, x.dtype)
        total /= divisor

        if is_grad_enabled():
            self._divisor = divisor
            self._remember_shapes(x, padded, out_size)
        else:
            self._divisor = None
        return F.to_nchw(total)

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        """(N, C, OH, OW) -> (N, C, H, W): every tap gets dL/dout / D."""
        divisor = self._divisor
        grad_nhwc = self._check_backward(divisor, grad_output)
        grad_share = grad_nhwc / divisor
        grad_padded = np.zeros(self._padded_shape, dtype=self._dtype)
        kw = self._kernel[1]
        out_size = self._output_shape[2:]
        for tap_index in range(self._kernel[0] * kw):
            tap = F.tap_view(grad_padded, *divmod(tap_index, kw), out_size, self._stride)
            tap += grad_share
        return self._crop(grad_padded)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
