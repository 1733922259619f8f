"""Low-level helpers shared by the convolution and pooling layers.

Everything here works on channels-last (NHWC) arrays, the layout the layers compute in:

* ``pair`` / ``check_positive`` turn ``int`` or ``(int, int)`` arguments into validated pairs;
* ``conv_output_size`` / ``pool_output_size`` give PyTorch's output lengths;
* ``pad_nhwc`` copies an input once into a bordered buffer (the border written once, no np.pad);
* ``tap_view`` is the strided slice one kernel tap (kh, kw) sees across every output position;
* ``sliding_windows`` is the im2col view (N, OH, OW, KH, KW, C) of a padded buffer, no copy;
* ``im2col`` copies it into the (N*OH*OW, KH*KW*C) matrix a convolution multiplies, and
  ``matmul_rows`` multiplies such a tall, narrow matrix in BLAS-friendly pieces of rows;
* ``im2col_matmul``, ``im2col_t_matmul`` are Conv2d's products in cache-sized pieces of samples
  (forward and dL/dW for large im2col matrices); dL/dx is ``conv2d_input_grad`` (a correlation
  of the padded output gradient, stride 1) or ``col2im_per_tap`` (strided convolutions);
* ``first_max_and_argmax`` is MaxPool2d's maximum and winning tap in one tournament;
  ``unpool_phases`` its backward in phase order, ``phase_rows_to_nhwc`` back to the layout;
* ``conv2d_inference`` is a convolution under ``no_grad``, with the tiling max pool, bias and
  ReLU after it in one pass over cache-sized pieces (``pooled_im2col`` orders its rows so the
  pool is a maximum of contiguous blocks), its temporaries in reused ``scratch`` buffers;
* ``sum_rows`` is a fast, accurate column sum (a bias gradient), ``add_to_rows`` a fast bias add,
  ``apply_to_rows`` any such per-column binary ufunc;
* ``channel_sums``, ``channel_sums_of_products`` and ``apply_per_channel`` are BatchNorm2d's
  per-channel passes over (N, C, H, W) arrays, through the row helpers when channels-last.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

Pair = tuple[int, int]


def pair(value: Any, name: str, owner: str) -> Pair:
    """``value`` as an ``(int, int)`` pair; an int ``k`` means ``(k, k)``, as in torch.nn."""
    items = (value, value) if isinstance(value, (int, np.integer)) else value
    try:
        first, second = items
    except (TypeError, ValueError):
        message = f"{owner}: {name} must be an int or a pair of ints, got {value!r}"
        raise ValueError(message) from None
    for item in (first, second):
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise ValueError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
    return int(first), int(second)


def check_positive(values: Pair, name: str, owner: str, minimum: int = 1) -> Pair:
    """Raise a ValueError unless both entries of ``values`` are at least ``minimum``."""
    if min(values) < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {values}")
    return values


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """The channels-last view (N, H, W, C) of a logically NCHW array; no copy."""
    return x.transpose(0, 2, 3, 1)


def to_nchw(x_nhwc: np.ndarray) -> np.ndarray:
    """The logically NCHW view of a channels-last array; no copy (see module.py's docstring)."""
    return x_nhwc.transpose(0, 3, 1, 2)


def effective_kernel(kernel: int, dilation: int) -> int:
    """The span of a dilated kernel: taps sit ``dilation`` apart."""
    return dilation * (kernel - 1) + 1


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int,
                     dilation: int = 1) -> int:
    """floor((size + padding - span) / stride) + 1, PyTorch's Conv2d output length."""
    return (size + pad_before + pad_after - effective_kernel(kernel, dilation)) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """PyTorch's pooling output length. With ``ceil_mode`` the division rounds up, but a last
    window that would start beyond the input plus its left padding is dropped."""
    span = size + 2 * padding - effective_kernel(kernel, dilation)
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def pad_nhwc(x_nhwc: np.ndarray, top: int, bottom: int, left: int, right: int,
             fill: float = 0.0, scratch_name: str | None = None) -> np.ndarray:
    """A new C-contiguous (N, top+H+bottom, left+W+right, C) array: ``x_nhwc`` inside a border of
    ``fill``. ``x_nhwc`` may have any strides; this is the one copy that makes it channels-last.
    With ``scratch_name``, written into that ``scratch`` buffer rather than a new array."""
    n, h, w, c = x_nhwc.shape
    shape = (n, top + h + bottom, left + w + right, c)
    padded = (np.empty(shape, dtype=x_nhwc.dtype) if scratch_name is None
              else scratch(scratch_name, shape, x_nhwc.dtype))
    # Write only the border strips, so every element is written exactly once.
    padded[:, :top] = fill
    padded[:, top + h:] = fill
    padded[:, top:top + h, :left] = fill
    padded[:, top:top + h, left + w:] = fill
    padded[:, top:top + h, left:left + w] = x_nhwc
    return padded


def tap_view(padded: np.ndarray, kh: int, kw: int, out_size: Pair, stride: Pair,
             dilation: Pair = (1, 1)) -> np.ndarray:
    """The (N, OH, OW, C) strided view of ``padded`` (NHWC) that kernel tap (kh, kw) reads: element
    [n, oh, ow, c] is padded[n, oh*sh + kh*dh, ow*sw + kw*dw, c]. Writable when ``padded`` is, so
    backward passes can add a tap's gradient into it in place."""
    top, left = kh * dilation[0], kw * dilation[1]
    rows = slice(top, top + stride[0] * (out_size[0] - 1) + 1, stride[0])
    cols = slice(left, left + stride[1] * (out_size[1] - 1) + 1, stride[1])
    return padded[:, rows, cols, :]


def sliding_windows(padded: np.ndarray, kernel: Pair, out_size: Pair, stride: Pair,
                    dilation: Pair = (1, 1)) -> np.ndarray:
    """The read-only im2col view (N, OH, OW, KH, KW, C) of ``padded`` (NHWC): element
    [n, oh, ow, kh, kw, c] is padded[n, oh*sh + kh*dh, ow*sw + kw*dw, c]. No data is copied."""
    sn, sh, sw, sc = padded.strides
    shape = (padded.shape[0], *out_size, *kernel, padded.shape[3])
    strides = (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc)
    return as_strided(padded, shape=shape, strides=strides, writeable=False)


def im2col(padded: np.ndarray, kernel: Pair, out_size: Pair, stride: Pair,
           dilation: Pair = (1, 1), scratch_name: str | None = None,
           reuse: np.ndarray | None = None) -> np.ndarray:
    """The (N*OH*OW, KH*KW*C) matrix of ``sliding_windows``: row = output pixel, columns = taps
    in (kh, kw, c) order. Possibly a transposed (F-ordered) view; BLAS takes either. Written into
    the ``scratch`` buffer ``scratch_name`` if given, else into ``reuse``'s memory if it is an
    earlier result of the same size (see ``recycled``), else into a new array."""
    n, c = padded.shape[0], padded.shape[3]
    rows = n * out_size[0] * out_size[1]

    def buffer(shape: tuple[int, ...]) -> np.ndarray:
        return (recycled(reuse, shape, padded.dtype) if scratch_name is None
                else scratch(scratch_name, shape, padded.dtype))

    if c > 1:
        windows = sliding_windows(padded, kernel, out_size, stride, dilation)
        cols = buffer(windows.shape)
        np.copyto(cols, windows)  # one strided copy
        return cols.reshape(rows, kernel[0] * kernel[1] * c)
    # One channel: the strided copy would move single elements; writing the matrix transposed,
    # one tap (whole image rows) at a time, is ~10x faster.
    cols_t = buffer((kernel[0] * kernel[1], n, *out_size, 1))
    for tap_index in range(kernel[0] * kernel[1]):
        cols_t[tap_index] = tap_view(padded, *divmod(tap_index, kernel[1]), out_size, stride,
                                     dilation)
    # The tap count, not -1: an empty batch has rows = 0, from which NumPy cannot infer it.
    return cols_t.reshape(kernel[0] * kernel[1], rows).T


def recycled(previous: np.ndarray | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised ``shape`` array in ``previous``'s memory when ``previous`` is a
    contiguous (C or F order) array of exactly that many ``dtype`` elements, else a new array.

    For a cache that a layer's next forward replaces anyway (Conv2d's im2col matrix): writing
    the same multi-megabyte buffer every step rather than a freshly allocated one made
    simple-cnn's one-thread training step 2-7% faster at batch 64 (its 7 MB matrix; no page
    faults either way), no faster at batch 32 (3.6 MB)."""
    if (previous is not None and previous.dtype == dtype and previous.size == math.prod(shape)
            and (previous.flags.c_contiguous or previous.flags.f_contiguous)
            and previous.flags.writeable):
        return previous.ravel(order="K").reshape(shape)
    return np.empty(shape, dtype)


# OpenBLAS, NumPy's BLAS, computes a product of at most this many multiply-adds (M*N*K) with
# "small-matrix" kernels that skip copying both operands into packed panels first.
SMALL_PRODUCT = 10**6
# Pieces of fewer rows lose more to per-call overhead than they gain (a 64-channel, K = 288
# product: 54-row pieces were ~18% slower than one call). This also leaves bn-cnn's K = 576
# product whole, whose small-kernel pieces would sum in another order (other bits).
MIN_PIECE_ROWS = 64


def matmul_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` (into ``out`` if given) for a tall (M, K) ``a`` and a narrow (K, N) ``b``, as
    consecutive pieces of ``a``'s rows of at most ``SMALL_PRODUCT`` multiply-adds each, when that
    leaves ``MIN_PIECE_ROWS`` rows or more per piece. The convolutions' narrow products (N = 6-32
    output channels, K = 9-288 taps) ran 1.1-2x faster so (K = 9: 2x) than as one call, which
    first copies ``a`` into packed panels. Each output row is the same dot products either way:
    the same bits with OpenBLAS's AVX-512 kernels; its AVX2 kernels (Haswell, Zen) round a row
    by where it sits in the call, so there they may differ in the last place."""
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), np.result_type(a, b))
    rows = SMALL_PRODUCT // max(n * k, 1)
    if rows < MIN_PIECE_ROWS or rows >= m:
        return np.matmul(a, b, out=out)
    for start in range(0, m, rows):
        np.matmul(a[start:start + rows], b, out=out[start:start + rows])
    return out


# -- convolution in cache-sized pieces (Conv2d) -----------------------------------------------

# Largest im2col matrix built at once; larger ones (bn-cnn's 32-channel 28x28 layers: 58 MB at
# batch 64) go a few samples at a time, never whole: cache-sized pieces are ~1.5x faster than one
# matrix streamed through memory, and use less.
MAX_COLS_BYTES = 16 * 2**20
# The size of each of those pieces: a few MB, so a piece is still in cache for its product.
COLS_PIECE_BYTES = 4 * 2**20
# The output gradient's bytes per piece of col2im (see ``col2im_per_tap``).
GRAD_PIECE_BYTES = 512 * 2**10


def sample_pieces(n: int, per_piece: int, rows_per_sample: int) -> list[tuple[slice, slice]]:
    """(rows of an (N*rows_per_sample, ...) matrix, samples) for consecutive groups of
    ``per_piece`` samples."""
    return [(slice(start * rows_per_sample, min(start + per_piece, n) * rows_per_sample),
             slice(start, start + per_piece)) for start in range(0, n, per_piece)]


def cols_piece_samples(padded: np.ndarray, taps: int, out_size: Pair) -> int:
    """0 when the im2col matrix of ``padded`` (``taps`` = KH*KW*C columns) fits in
    ``MAX_COLS_BYTES`` and is built whole; else how many samples' rows to build at a time."""
    row_bytes = out_size[0] * out_size[1] * taps * padded.itemsize
    if padded.shape[0] * row_bytes <= MAX_COLS_BYTES:
        return 0
    return max(1, COLS_PIECE_BYTES // row_bytes)


def im2col_matmul(padded: np.ndarray, weight_matrix: np.ndarray, per_piece: int, kernel: Pair,
                  out_size: Pair, stride: Pair, dilation: Pair) -> np.ndarray:
    """``im2col(padded) @ weight_matrix``, (N*OH*OW, O), with im2col built ``per_piece``
    samples at a time and never whole."""
    n, rows_per_sample = padded.shape[0], out_size[0] * out_size[1]
    out = np.empty((n * rows_per_sample, weight_matrix.shape[1]), dtype=padded.dtype)
    for rows, samples in sample_pieces(n, per_piece, rows_per_sample):
        cols = im2col(padded[samples], kernel, out_size, stride, dilation)
        matmul_rows(cols, weight_matrix, out=out[rows])
    return out


def im2col_t_matmul(padded: np.ndarray, grad_2d: np.ndarray, per_piece: int, kernel: Pair,
                    out_size: Pair, stride: Pair, dilation: Pair) -> np.ndarray:
    """``im2col(padded).T @ grad_2d`` (a weight gradient, (KH*KW*C, O)), with im2col rebuilt
    ``per_piece`` samples at a time as in ``im2col_matmul``."""
    n, rows_per_sample = padded.shape[0], out_size[0] * out_size[1]
    taps = kernel[0] * kernel[1] * padded.shape[3]
    total = np.zeros((taps, grad_2d.shape[1]), dtype=grad_2d.dtype)
    for rows, samples in sample_pieces(n, per_piece, rows_per_sample):
        total += im2col(padded[samples], kernel, out_size, stride, dilation).T @ grad_2d[rows]
    return total


def col2im_per_tap(grad_2d: np.ndarray, weight_matrix: np.ndarray, padded_shape: tuple[int, ...],
                   kernel: Pair, out_size: Pair, stride: Pair, dilation: Pair) -> np.ndarray:
    """The gradient of a padded NHWC input, ``padded_shape``, from the output gradient
    ``grad_2d`` (N*OH*OW, O) and the (KH*KW*C, O) ``weight_matrix``: col2im(grad_2d W^T).

    One kernel tap at a time: (N*OH*OW, O) @ (O, C) gives the gradient of the input pixels that
    tap read, added onto them in place. Per-tap products write contiguous blocks, which add faster
    than strided slices of one (N*OH*OW, KH*KW*C) product; each goes into one reused buffer, with
    its (O, C) weight block made contiguous first (for LeNet's 6 channels ~10% faster than
    transposed views and fresh arrays). A few samples at a time, so a piece's gradient, products
    and input rows (~1 MB for 512 KB of gradient) stay in a 2 MB L2 across the taps; the same bits,
    each sample's sums unchanged. 512 KB pieces made one-thread training steps 2-4% faster than
    128 KB ones.
    """
    kh, kw = kernel
    n, c, o = padded_shape[0], padded_shape[3], grad_2d.shape[1]
    grad_padded = np.zeros(padded_shape, dtype=grad_2d.dtype)
    tap_weights = np.ascontiguousarray(weight_matrix.reshape(kh * kw, c, o).transpose(0, 2, 1))
    rows_per_sample = out_size[0] * out_size[1]
    per_piece = max(1, GRAD_PIECE_BYTES // (rows_per_sample * o * grad_2d.itemsize))
    product = np.empty((min(n, per_piece) * rows_per_sample, c), dtype=grad_2d.dtype)
    for rows, samples in sample_pieces(n, per_piece, rows_per_sample):
        piece_grad, piece_padded = grad_2d[rows], grad_padded[samples]
        piece_product = product[:len(piece_grad)]
        for tap_index in range(kh * kw):
            matmul_rows(piece_grad, tap_weights[tap_index], out=piece_product)
            tap = tap_view(piece_padded, *divmod(tap_index, kw), out_size, stride, dilation)
            tap += piece_product.reshape(len(piece_padded), *out_size, c)
    return grad_padded


# Bytes of the output gradient's im2col built and multiplied at a time by
# ``conv2d_input_grad``: simple-cnn's second layer (K = 288) ran fastest with 4 samples a piece
# (0.9 MB), ~7% faster than col2im_per_tap in isolation; 16 or 32 samples lost that gain.
GRAD_COLS_BYTES = 1 * 2**20


def conv2d_input_grad(grad_nhwc: np.ndarray, weight_matrix: np.ndarray, kernel: Pair,
                      dilation: Pair, pad: tuple[int, int, int, int],
                      input_hw: Pair) -> np.ndarray:
    """dL/dx (N, H, W, C) of a stride-1 convolution, from g = dL/d(out) (N, OH, OW, O) and its
    (KH*KW*C, O) ``weight_matrix``: the "full" correlation of g with the kernel turned 180
    degrees and its channel axes swapped,

        dx[n, i, j, c] = sum_{kh,kw,o} g_pad[n, i + kh*d, j + kw*d, o] W[o, c, KH-1-kh, KW-1-kw],

    where g_pad is g with d*(K-1) - p zeros on each side (p the forward's padding there). So
    it is a forward convolution again: im2col of g_pad (K = KH*KW*O columns), one product, a
    few samples at a time (``GRAD_COLS_BYTES``), written straight into dx. No col2im
    scatter-adds and no cropping of a padded gradient: ~4% of simple-cnn's training step
    against ``col2im_per_tap``. Needs every d*(K-1) - p >= 0 (a padding no wider than the
    kernel's reach), which ``full_correlation_fits`` checks."""
    n, o = grad_nhwc.shape[0], grad_nhwc.shape[3]
    (kh, kw), (top, bottom, left, right) = kernel, pad
    reach_h, reach_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
    grad_padded = pad_nhwc(grad_nhwc, reach_h - top, reach_h - bottom, reach_w - left,
                           reach_w - right, scratch_name="grad_output_padded")
    c = weight_matrix.shape[0] // (kh * kw)
    turned = weight_matrix.reshape(kh, kw, c, o)[::-1, ::-1].transpose(0, 1, 3, 2)
    turned_matrix = np.ascontiguousarray(turned).reshape(kh * kw * o, c)
    grad_input = np.empty((n, *input_hw, c), grad_nhwc.dtype)
    rows_per_sample = input_hw[0] * input_hw[1]
    per_piece = max(1, GRAD_COLS_BYTES // max(1, rows_per_sample * kh * kw * o
                                              * grad_nhwc.itemsize))
    for rows, samples in sample_pieces(n, per_piece, rows_per_sample):
        cols = im2col(grad_padded[samples], kernel, input_hw, (1, 1), dilation,
                      scratch_name="grad_output_cols")
        matmul_rows(cols, turned_matrix, out=grad_input.reshape(-1, c)[rows])
    return grad_input


def full_correlation_fits(stride: Pair, kernel: Pair, dilation: Pair,
                          pad: tuple[int, int, int, int]) -> bool:
    """Whether ``conv2d_input_grad`` applies: stride 1 and no padding wider than d*(K-1)."""
    reach_h, reach_w = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
    top, bottom, left, right = pad
    return stride == (1, 1) and max(top, bottom) <= reach_h and max(left, right) <= reach_w


@functools.lru_cache(maxsize=256)  # the search takes ~0.2 ms for prime M and K = 1; shapes repeat
def _row_fold(m: int, k: int, width: int = 1024) -> int:
    """How many rows of an (M, K) matrix to fold into one: the largest divisor of M up to
    width / K, so a row-wise pass runs over ~width-wide rows. (A power-of-two gcd alone folded
    LeNet's 6-channel 64*28*28 rows only 2-fold: 4x slower.)"""
    limit = max(1, width // max(k, 1))
    return next(d for d in range(min(limit, max(m, 1)), 0, -1) if m % d == 0)


def sum_rows(matrix: np.ndarray) -> np.ndarray:
    """``matrix.sum(axis=0)`` for an (M, K) matrix. NumPy reduces a narrow matrix one short row at
    a time; folding rows into ~1024-wide ones first is ~5x faster, and the two-level sum is more
    accurate too."""
    m, k = matrix.shape
    fold = _row_fold(m, k)
    return matrix.reshape(m // fold, fold * k).sum(axis=0).reshape(fold, k).sum(axis=0)


def sum_rows_of_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a * b).sum(axis=0)`` for two (M, K) matrices, without the (M, K) product: one einsum
    pass over rows folded as in ``sum_rows`` (~3x faster than a multiply, then ``sum_rows``)."""
    m, k = a.shape
    fold = _row_fold(m, k)
    shape = (m // fold, fold * k)
    return np.einsum("ij,ij->j", a.reshape(shape), b.reshape(shape)).reshape(fold, k).sum(axis=0)


def add_to_rows(matrix: np.ndarray, vector: np.ndarray) -> None:
    """``matrix += vector`` in place, for a C-contiguous (M, K) matrix and a (K,) vector (a bias),
    by ``apply_to_rows`` (8 channels: 4x faster than NumPy's loop over the narrow rows)."""
    apply_to_rows(np.add, matrix, vector, matrix)


def apply_to_rows(ufunc: np.ufunc, matrix: np.ndarray, vector: np.ndarray,
                  out: np.ndarray) -> None:
    """``ufunc(matrix, vector, out=out)`` for C-contiguous (M, K) ``matrix`` and ``out`` (which
    may be ``matrix``) and a (K,) ``vector`` broadcast over the rows: the same operations on the
    same values, but over rows folded ~8192 wide (the vector tiled to match). NumPy's loop over a
    narrow matrix pays per row; binary loops over rows under ~6000 values ran ~25% slower here
    (3 MB arrays, NumPy 2.4), 1024 or 4096 alike."""
    m, k = matrix.shape
    fold = _row_fold(m, k, width=8192)
    shape = (m // fold, fold * k)  # copy=False: raises rather than working on a copy
    ufunc(matrix.reshape(shape, copy=False), np.tile(vector, fold),
          out=out.reshape(shape, copy=False))


# -- inference: a convolution with the max pool, bias and ReLU after it ----------------------

# Bytes of im2col rows built and multiplied at a time at inference. Larger pieces mean fewer
# calls; simple-cnn's inference at one thread took 0.61 s with 256 KB pieces, 0.53 s with 512 KB,
# 0.48 s with 1 MB, 0.46 s with 2 or 4 MB (the piece's product is still in L3 for the pool).
INFERENCE_COLS_BYTES = 4 * 2**20
# Scratch buffers above this size are not kept (a large batch through a lone layer).
MAX_SCRATCH_BYTES = 8 * 2**20

_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised ``shape`` array in a buffer this thread reuses under ``name``.

    Inference writes its temporaries (padded input, im2col pieces, products) into the same memory
    on every call: a fresh multi-megabyte array costs a page fault per 4 KB touched whenever glibc
    has handed the last one back to the system, ~10% of simple-cnn's inference. Buffers above
    ``MAX_SCRATCH_BYTES`` are fresh arrays, so a large batch leaves nothing large behind. A buffer
    is valid until the next call with the same name on this thread.
    """
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if size > MAX_SCRATCH_BYTES:
        return np.empty(shape, dtype)
    buffers: dict[str, np.ndarray] = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.nbytes < size:
        buffer = buffers[name] = np.empty(size, np.uint8)
    return buffer[:size].view(dtype).reshape(shape)


def pooled_im2col(padded: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, pool: Pair,
                  pooled_size: Pair, scratch_name: str | None = "cols") -> np.ndarray:
    """The im2col matrix (PH*PW*N*POH*POW, KH*KW*C) of the convolution outputs that a max pool
    with (PH, PW) windows and strides (no padding) reads, rows in phase order (ph, pw, n, i, j):
    conv output (i*PH + ph, j*PW + pw), so each of the PH*PW window positions is one contiguous
    block of rows, and the pool is an elementwise maximum of those blocks. Outputs no window
    reads (the floor of the division) are left out. pool = (1, 1) gives ``im2col``'s rows.
    Written into the thread's ``scratch`` buffer ``scratch_name`` (valid until the next call
    with that name), or into a new array when it is None."""
    n, c = padded.shape[0], padded.shape[3]
    sn, sh, sw, sc = padded.strides
    (kh, kw), (ph, pw), (poh, pow_) = kernel, pool, pooled_size
    rows = ph * pw * n * poh * pow_

    def buffer(shape: tuple[int, ...]) -> np.ndarray:
        return (np.empty(shape, padded.dtype) if scratch_name is None
                else scratch(scratch_name, shape, padded.dtype))

    if pool == (1, 1):  # the plain order: im2col's copies
        return im2col(padded, kernel, pooled_size, stride, dilation, scratch_name=scratch_name)
    # Strides of (ph, pw, n, i, j): conv output row i*PH + ph reads padded row (i*PH + ph)*stride.
    output_strides = (stride[0] * sh, stride[1] * sw, sn, ph * stride[0] * sh,
                      pw * stride[1] * sw)
    if c > 1:
        windows = as_strided(padded, (ph, pw, n, poh, pow_, kh, kw, c),
                             (*output_strides, dilation[0] * sh, dilation[1] * sw, sc),
                             writeable=False)
        cols = buffer(windows.shape)
        np.copyto(cols, windows)
        return cols.reshape(rows, kh * kw * c)
    # One channel: written transposed, one tap at a time (see ``im2col``).
    cols_t = buffer((kh, kw, ph, pw, n, poh, pow_))
    for tap_h in range(kh):
        for tap_w in range(kw):
            cols_t[tap_h, tap_w] = as_strided(
                padded[:, tap_h * dilation[0]:, tap_w * dilation[1]:, 0],
                (ph, pw, n, poh, pow_), output_strides, writeable=False)
    return cols_t.reshape(kh * kw, rows).T


def conv2d_inference(padded: np.ndarray, weight_matrix: np.ndarray, bias: np.ndarray | None,
                     kernel: Pair, stride: Pair, dilation: Pair, out_size: Pair,
                     pool: Pair = (1, 1), relu: bool = False) -> np.ndarray:
    """relu(maxpool(conv(x)) + bias) as a new (N, OH // PH, OW // PW, O) channels-last array,
    for a padded NHWC input (``padded``) and the (KH*KW*C, O) ``weight_matrix``; the pool (PH, PW
    windows, stride the window, no padding) and the ReLU are optional. No cache for backward.

    A few samples at a time (``INFERENCE_COLS_BYTES`` of im2col): ``pooled_im2col``, one
    product, the pool as a maximum of the product's contiguous row blocks, then bias and ReLU on
    the pooled piece while it is in cache. The same values as the layers one by one: the bias is
    added after the pool, on PH*PW times fewer values, which changes no bit, because rounding
    x + b is monotone in x, so max(x_k + b) = max(x_k) + b exactly. (The products' rows are in
    another order: bit for bit the layers' with OpenBLAS's AVX-512 kernels, within a few units
    in the last place with its AVX2 ones, which round a row by where it sits.)
    """
    n = padded.shape[0]
    o = weight_matrix.shape[1]
    pooled = (out_size[0] // pool[0], out_size[1] // pool[1])
    phases = pool[0] * pool[1]
    rows_per_sample = phases * pooled[0] * pooled[1]
    result = np.empty((n, *pooled, o), dtype=padded.dtype)
    row_bytes = rows_per_sample * weight_matrix.shape[0] * padded.itemsize
    # Pieces of equal size: a small last piece would cost nearly a whole piece's calls.
    pieces = max(1, math.ceil(n * row_bytes / INFERENCE_COLS_BYTES))
    per_piece = max(1, math.ceil(n / pieces))
    for start in range(0, n, per_piece):
        piece = padded[start:start + per_piece]
        target = result[start:start + per_piece].reshape(-1, o)
        cols = pooled_im2col(piece, kernel, stride, dilation, pool, pooled)
        if phases == 1:
            matmul_rows(cols, weight_matrix, out=target)
        else:
            product = matmul_rows(cols, weight_matrix,
                                  out=scratch("product", (len(cols), o), padded.dtype))
            blocks = product.reshape(phases, len(target), o)
            np.maximum(blocks[0], blocks[1], out=target)
            for block in blocks[2:]:
                np.maximum(target, block, out=target)
        bias_then_relu(target, bias, relu)
    return result


def bias_then_relu(rows: np.ndarray, bias: np.ndarray | None, relu: bool) -> None:
    """``rows = relu(rows + bias)`` in place (each part optional), for a C-contiguous (M, O)
    matrix, bit for bit as the bias add and ``np.maximum(x, 0)`` give, but with vector operands:
    np.maximum against the scalar 0 ran ~2.5x slower than against a vector (NumPy 2.4, float32).
    With a bias it is max(rows, -bias) + bias, which rounds to the same bits: x + b rounds
    monotonically in x, -b + b is +0, and a NaN stays a NaN (its sign bit may differ)."""
    if relu:
        floor = np.zeros(rows.shape[1], rows.dtype) if bias is None else -bias
        apply_to_rows(np.maximum, rows, floor, rows)
    if bias is not None:
        add_to_rows(rows, bias)


# -- max pooling ------------------------------------------------------------------------------

def first_max_and_argmax(taps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise maximum of the (N, OH, OW, C) tap views and the index of the first tap that
    attains it (row-major window order, PyTorch's tie rule), as a new array and a uint8 array.

    A pairwise tournament: each round merges neighbours (earlier, later), and the later one wins
    only if strictly greater, so the first maximum survives. It does no window copy and, unlike a
    running maximum with masked updates, needs only cheap unmasked passes. np.maximum propagates
    NaN like PyTorch (the index of a NaN may differ).
    """
    index_dtype = np.min_scalar_type(len(taps) - 1)
    level: list[tuple[np.ndarray, Any]] = [(tap, k) for k, tap in enumerate(taps)]
    while len(level) > 1:
        merged = []
        for (earlier, earlier_index), (later, later_index) in zip(level[0::2], level[1::2],
                                                                  strict=False):
            later_wins = later > earlier
            if isinstance(earlier_index, int):  # first round: two adjacent single taps
                index = later_wins.view(np.uint8).astype(index_dtype, copy=False)
                if earlier_index:
                    index = index + index_dtype.type(earlier_index)
            else:
                # earlier + wins * (later - earlier), never negative (later taps have larger
                # indices): ~40x faster than np.where on a boolean mask.
                index = np.subtract(later_index, earlier_index, dtype=index_dtype)
                index *= later_wins.view(np.uint8)
                index += earlier_index
            merged.append((np.maximum(earlier, later), index))
        if len(level) % 2:
            merged.append(level[-1])
        level = merged
    best, argmax = level[0]
    if len(taps) == 1:  # a 1x1 kernel: copy, so the output never aliases the input
        return best.copy(), np.zeros(best.shape, dtype=index_dtype)
    return best, argmax


def no_winner_where(winner: np.ndarray, mask: np.ndarray, phases: int) -> np.ndarray:
    """``winner`` (winning phases, 0 .. phases-1) with ``phases`` wherever ``mask`` is True:
    outputs whose gradient ``unpool_phases`` sends nowhere. In place when its dtype holds it."""
    if phases > np.iinfo(winner.dtype).max:
        winner = winner.astype(np.min_scalar_type(phases))
    np.putmask(winner, mask, phases)
    return winner


def unpool_phases(grad_pooled: np.ndarray, winner: np.ndarray, phases: int) -> np.ndarray:
    """Max pooling's backward in phase order: the (phases*M, O) gradient of the pooled
    convolution outputs (blocks as ``pooled_im2col`` orders them) from the (M, O) gradient of
    the pool's output and the winning phase of each output. Block k is grad_pooled where winner
    == k, else 0; a winner of ``phases`` or more (a ReLU after the pool that let nothing
    through) gets 0 in every block. Contiguous passes, where the layers' own backward writes
    strided slices of the input's shape."""
    grad = np.empty((phases, *grad_pooled.shape), grad_pooled.dtype)
    for phase in range(phases):
        np.multiply(grad_pooled, winner == phase, out=grad[phase])
    return grad.reshape(-1, grad_pooled.shape[1])


def phase_rows_to_nhwc(rows: np.ndarray, n: int, pool: Pair, pooled_size: Pair,
                       out_size: Pair) -> np.ndarray:
    """The (N, OH, OW, O) channels-last array of a (PH*PW*N*POH*POW, O) matrix in
    ``pooled_im2col``'s phase order; outputs no pool window read (the floor of the division)
    are 0."""
    (ph, pw), (poh, pow_) = pool, pooled_size
    o = rows.shape[1]
    exact = (out_size[0] == ph * poh and out_size[1] == pw * pow_)
    natural = (np.empty if exact else np.zeros)((n, *out_size, o), rows.dtype)
    blocks = rows.reshape(ph, pw, n, poh, pow_, o)
    for phase_h in range(ph):
        for phase_w in range(pw):
            natural[:, phase_h:ph * poh:ph, phase_w:pw * pow_:pw] = blocks[phase_h, phase_w]
    return natural


# -- per-channel passes over (N, C, H, W) arrays (BatchNorm2d) ----------------------------------

_CHANNEL_REDUCE_AXES = (0, 2, 3)  # every axis but the channel axis: statistics are per channel


def per_channel(v: np.ndarray) -> np.ndarray:
    """A (C,) vector as (C, 1, 1), to broadcast against (N, C, H, W)."""
    return v.reshape(-1, 1, 1)


def channel_rows(a: np.ndarray) -> np.ndarray | None:
    """The (N*H*W, C) matrix of a channels-last (N, C, H, W) array (a view), else None."""
    a_nhwc = to_nhwc(a)
    return a_nhwc.reshape(-1, a_nhwc.shape[3]) if a_nhwc.flags.c_contiguous else None


def channels_last_like(*arrays: np.ndarray) -> np.ndarray | None:
    """A new channels-last array shaped like ``arrays[0]`` when all of them are channels-last:
    writing results into it (``out=``) avoids one fresh array per operation. None otherwise,
    so that every operation allocates its result in the layout NumPy picks, as before."""
    if any(channel_rows(a) is None for a in arrays):
        return None
    return to_nchw(np.empty(to_nhwc(arrays[0]).shape, arrays[0].dtype))


def apply_per_channel(ufunc: np.ufunc, a: np.ndarray, vector: np.ndarray,
                      out: np.ndarray | None = None, *,
                      spare: np.ndarray | None = None) -> np.ndarray:
    """``ufunc(a, vector[c])`` on every channel c of (N, C, H, W) ``a``, into ``out`` (e.g. ``a``:
    in place), else into a new array, which may be ``spare`` (a channels-last buffer free for
    reuse). Channels-last arrays of one dtype go through ``apply_to_rows``: the same
    operations, but NumPy's inner loop then runs over ~8192 values, not C (up to 2x faster)."""
    rows = channel_rows(a)
    if rows is not None and a.dtype == vector.dtype:
        target = out if out is not None else spare if spare is not None else channels_last_like(a)
        target_rows = channel_rows(target)
        if target_rows is not None and target.dtype == a.dtype:
            apply_to_rows(ufunc, rows, vector, target_rows)
            return target
    # Anything else exactly as NumPy broadcasts it (the same result dtype and layout as before).
    return ufunc(a, per_channel(vector), out=out)


def channel_sums(v: np.ndarray) -> np.ndarray:
    """Per-channel sums (C,) of (N, C, H, W) ``v`` over N, H, W. A channels-last array is an
    (N*H*W, C) matrix, whose rows NumPy would add one C-wide row at a time; ``sum_rows``
    folds them into ~1024-wide rows first: ~4x faster, and a two-level sum, more accurate."""
    rows = channel_rows(v)
    return v.sum(axis=_CHANNEL_REDUCE_AXES) if rows is None else sum_rows(rows)


def channel_sums_of_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel sums (C,) of ``a * b`` over N, H, W; without the product array when both are
    channels-last (``sum_rows_of_products``)."""
    rows_a, rows_b = channel_rows(a), channel_rows(b)
    if rows_a is None or rows_b is None:
        return np.multiply(a, b).sum(axis=_CHANNEL_REDUCE_AXES)
    return sum_rows_of_products(rows_a, rows_b)
