"""The fast paths in nn.functional agree with their plain NumPy definitions."""

import numpy as np
import pytest

from scratchcnn.nn import functional as F


@pytest.mark.parametrize("shape", [(50176, 16), (97, 3), (1, 5), (12544, 32), (6, 2000),
                                   (50176, 6), (1009, 6), (0, 4)])
def test_sum_rows_is_the_column_sum(rng, shape):
    matrix = rng.standard_normal(shape).astype(np.float32)
    expected = matrix.astype(np.float64).sum(axis=0)
    got = F.sum_rows(matrix)
    assert got.dtype == np.float32 and got.shape == (shape[1],)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.sqrt(shape[0]) * 4)



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
