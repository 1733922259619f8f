"""The fast paths in nn.functional agree with their plain NumPy definitions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchcnn.nn import functional as F


@pytest.mark.parametrize("shape", [(50176, 16), (97, 3), (1, 5), (12544, 32), (6, 2000),
                                   (50176, 6), (1009, 6), (0, 4)])
def test_sum_rows_is_the_column_sum(rng, shape):
    matrix = rng.standard_normal(shape).astype(np.float32)
    expected = matrix.astype(np.float64).sum(axis=0)
    got = F.sum_rows(matrix)
    assert got.dtype == np.float32 and got.shape == (shape[1],)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.sqrt(shape[0]) * 4)


@pytest.mark.parametrize("shape", [(50176, 16), (97, 3), (1, 5), (25088, 32), (6, 2000),
                                   (1009, 6), (0, 4)])
def test_sum_rows_of_products_is_the_column_sum_of_the_product(rng, shape):
    a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    expected = (a.astype(np.float64) * b).sum(axis=0)
    got = F.sum_rows_of_products(a, b)
    assert got.dtype == np.float32 and got.shape == (shape[1],)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.sqrt(shape[0]) * 4)
    np.testing.assert_allclose(F.sum_rows_of_products(a, a), (a.astype(np.float64) ** 2).sum(0),
                               rtol=2e-6)


@pytest.mark.parametrize("shape", [(50176, 8), (97, 3), (1, 5), (6272, 32), (6, 2000), (0, 4)])
def test_add_to_rows_adds_the_vector_to_every_row_in_place(rng, shape):
    matrix = rng.standard_normal(shape).astype(np.float32)
    vector = rng.standard_normal(shape[1]).astype(np.float32)
    expected = matrix + vector
    F.add_to_rows(matrix, vector)
    np.testing.assert_array_equal(matrix, expected)  # the same additions: the same bits


@pytest.mark.parametrize("ufunc", [np.subtract, np.multiply])
@pytest.mark.parametrize("shape", [(50176, 8), (97, 3), (1, 5), (6272, 32), (0, 4)])
@pytest.mark.parametrize("in_place", [False, True])
def test_apply_to_rows_is_the_broadcast_ufunc_bit_for_bit(rng, ufunc, shape, in_place):
    matrix = rng.standard_normal(shape)
    vector = rng.standard_normal(shape[1])
    expected = ufunc(matrix, vector)
    out = matrix if in_place else np.full(shape, np.nan)
    F.apply_to_rows(ufunc, matrix, vector, out)
    assert out.tobytes() == expected.tobytes()


def test_apply_to_rows_refuses_a_matrix_it_cannot_fold_in_place():
    out = np.zeros((8, 6))[:, :3]  # rows not adjacent: folding would need a copy
    with pytest.raises(ValueError, match="copy"):
        F.apply_to_rows(np.add, out, np.ones(3), out)

@pytest.mark.parametrize("m, k, n", [
    (25088, 9, 16),  # simple-cnn's first layer at 32 images: pieces of 6944 rows
    (6272, 144, 32),  # its second: pieces of 217 rows, the last one shorter
    (6272, 288, 64),  # pieces would be under MIN_PIECE_ROWS: one call
    (100, 9, 16),  # small enough already: one call
    (0, 9, 16),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a_order", ["C", "F"])  # F: one-channel im2col's transposed matrix
@pytest.mark.parametrize("given_out", [False, True])
def test_matmul_rows_is_the_matrix_product(rng, m, k, n, dtype, a_order, given_out):
    a = np.asarray(rng.standard_normal((m, k)).astype(dtype), order=a_order)
    b = rng.standard_normal((k, n)).astype(dtype)
    out = np.full((m, n), np.nan, dtype) if given_out else None
    got = F.matmul_rows(a, b, out=out)
    assert got.shape == (m, n) and got.dtype == dtype
    assert got is out or not given_out
    expected = a.astype(np.float64) @ b.astype(np.float64)  # every row written, none twice
    tolerance = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * np.sqrt(k))


def test_matmul_rows_pieces_cover_every_row_in_order(rng, monkeypatch):
    """Tiny pieces (one call per 64 rows, 1000 rows: 15 full pieces and a short one) give the
    product's rows in place; with OpenBLAS each row is also bit for bit a one-call product's."""
    monkeypatch.setattr(F, "SMALL_PRODUCT", 64 * 8 * 3)
    a = rng.standard_normal((1000, 8))
    b = rng.standard_normal((8, 3))
    np.testing.assert_allclose(F.matmul_rows(a, b), a @ b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("stride, dilation", [((1, 1), (1, 1)), ((2, 1), (1, 2))])
def test_im2col_matches_the_window_view(rng, channels, stride, dilation):
    padded = rng.standard_normal((2, 9, 8, channels))
    kernel = (3, 2)
    out_size = tuple(F.conv_output_size(padded.shape[1 + a], kernel[a], stride[a], 0, 0,
                                        dilation[a]) for a in (0, 1))
    windows = F.sliding_windows(padded, kernel, out_size, stride, dilation)
    cols = F.im2col(padded, kernel, out_size, stride, dilation)
    np.testing.assert_array_equal(cols, windows.reshape(-1, 6 * channels))


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=2, dilation=2, ceil_mode=True),
                                    dict(kernel_size=1)])
def test_maxpool_inference_path_equals_training_path(rng, kwargs):
    """Under no_grad MaxPool2d takes a running maximum instead of the argmax tournament."""
    from scratchcnn.nn import MaxPool2d, no_grad

    x = np.maximum(rng.standard_normal((3, 4, 9, 8)), 0).astype(np.float32)  # many ties at 0
    x[0, 0, 0, 0] = np.nan
    pool = MaxPool2d(**kwargs)
    with no_grad():
        fast = pool(x)
    np.testing.assert_array_equal(fast, pool(x))
    assert not np.shares_memory(fast, x)


@settings(max_examples=60, deadline=None)
@given(kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       channels=st.tuples(st.integers(1, 3), st.integers(1, 3)), n=st.integers(0, 3),
       seed=st.integers(0, 2**16), data=st.data())
def test_input_grad_by_full_correlation_is_col2im(kernel, dilation, channels, n, seed, data):
    """Wherever it applies (stride 1, no padding wider than the kernel's reach), the correlation
    of the padded output gradient with the turned kernel is col2im(g W^T) cropped to the input,
    with asymmetric paddings, dilation, one channel and an empty batch too."""
    reach = tuple(d * (k - 1) for k, d in zip(kernel, dilation, strict=True))
    pads = tuple(data.draw(st.integers(0, reach[axis // 2])) for axis in range(4))
    top, bottom, left, right = pads
    assert F.full_correlation_fits((1, 1), kernel, dilation, pads)
    size = tuple(data.draw(st.integers(max(1, reach[a] + 1 - pads[2 * a] - pads[2 * a + 1]),
                                       8)) for a in (0, 1))
    out_size = tuple(F.conv_output_size(size[a], kernel[a], 1, pads[2 * a], pads[2 * a + 1],
                                        dilation[a]) for a in (0, 1))
    rng = np.random.default_rng(seed)
    c, o = channels
    weight_matrix = rng.standard_normal((kernel[0] * kernel[1] * c, o))
    grad_2d = rng.standard_normal((n * out_size[0] * out_size[1], o))
    padded_shape = (n, size[0] + top + bottom, size[1] + left + right, c)
    expected = F.col2im_per_tap(grad_2d, weight_matrix, padded_shape, kernel, out_size, (1, 1),
                                dilation)[:, top:top + size[0], left:left + size[1]]
    got = F.conv2d_input_grad(grad_2d.reshape(n, *out_size, o), weight_matrix, kernel,
                              dilation, pads, size)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_full_correlation_needs_stride_one():
    assert F.full_correlation_fits((1, 1), (3, 3), (1, 1), (1, 1, 1, 1))
    assert not F.full_correlation_fits((2, 1), (3, 3), (1, 1), (1, 1, 1, 1))
    assert not F.full_correlation_fits((1, 1), (1, 1), (1, 1), (1, 1, 0, 0))  # pad > reach
    assert F.full_correlation_fits((1, 1), (3, 2), (2, 1), (4, 0, 1, 1))
    assert not F.full_correlation_fits((1, 1), (3, 2), (2, 1), (4, 0, 2, 1))


def test_recycled_reuses_only_matching_contiguous_writable_memory(rng):
    previous = np.empty((6, 4), np.float32)
    reused = F.recycled(previous, (2, 3, 4), np.float32)
    assert reused.shape == (2, 3, 4) and np.shares_memory(reused, previous)
    transposed = np.empty((4, 6), np.float32).T  # F-ordered, as one-channel im2col returns
    assert np.shares_memory(F.recycled(transposed, (24,), np.float32), transposed)
    read_only = np.empty(24, np.float32)
    read_only.flags.writeable = False
    strided = np.empty((6, 8), np.float32)[:, ::2]
    for other, shape, dtype in ((previous, (5, 4), np.float32), (previous, (6, 4), np.float64),
                                (read_only, (24,), np.float32), (strided, (24,), np.float32),
                                (None, (24,), np.float32)):
        fresh = F.recycled(other, shape, dtype)
        assert fresh.shape == shape and fresh.dtype == dtype
        assert other is None or not np.shares_memory(fresh, other)
