"""BatchNorm2d against torch.nn.BatchNorm2d in train and eval mode, running statistics,
finite differences, layouts, dtypes and errors."""

import numpy as np
import pytest

from gradcheck import assert_close, check_module_gradients
from scratchcnn.nn import BatchNorm2d, no_grad
from scratchcnn.nn import functional as F


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def make_pair(torch, rng, channels, **options):
    layer = BatchNorm2d(channels, dtype=np.float64, **options)
    if layer.affine:  # non-trivial gamma and beta, so their gradients matter
        layer.weight.data[...] = rng.uniform(0.5, 1.5, channels)
    if layer.bias is not None:
        layer.bias.data[...] = rng.standard_normal(channels)
    twin = torch.nn.BatchNorm2d(channels, dtype=torch.float64, **options)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    return layer, twin


def run_both(torch, layer, twin, x, upstream):
    out = layer(x)
    grad_x = layer.backward(upstream)
    x_t = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    out_t = twin(x_t)
    out_t.backward(torch.from_numpy(np.ascontiguousarray(upstream)))
    assert_close(out, out_t.detach().numpy(), what="output")
    assert_close(grad_x, x_t.grad.numpy(), what="input grad")
    for name, param in layer.named_parameters():
        assert_close(param.grad, getattr(twin, name).grad.numpy(), what=f"{name} grad")
    layer.zero_grad()
    twin.zero_grad()


def assert_same_state(torch, layer, twin):
    ours, theirs = layer.state_dict(), twin.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.numpy().dtype, key
        assert_close(ours[key], value.numpy(), what=key)


@pytest.mark.parametrize("seed", range(6))
def test_train_mode_matches_torch_over_several_steps(torch, seed):
    rng = np.random.default_rng(seed)
    n, c, h, w = (int(v) for v in rng.integers(1, 6, size=4))
    n += 1  # at least two values per channel
    momentum = None if seed == 0 else float(rng.uniform(0.05, 0.9))
    layer, twin = make_pair(torch, rng, c, momentum=momentum)
    for step in range(3):
        x = rng.standard_normal((n, c, h, w)) * rng.uniform(0.5, 3, (1, c, 1, 1)) + step
        if seed % 2:
            x = channels_last(x)
        run_both(torch, layer, twin, x, rng.standard_normal(x.shape))
    assert int(layer.num_batches_tracked) == 3
    assert_same_state(torch, layer, twin)

    layer.eval()
    twin.eval()
    x = rng.standard_normal((n, c, h, w))
    run_both(torch, layer, twin, x, rng.standard_normal(x.shape))
    assert int(layer.num_batches_tracked) == 3  # eval leaves the statistics alone
    assert_same_state(torch, layer, twin)


def test_momentum_none_is_the_cumulative_average(rng):
    layer = BatchNorm2d(2, momentum=None, dtype=np.float64)
    batches = [rng.standard_normal((4, 2, 3, 3)) * (i + 1) + i for i in range(4)]
    for x in batches:
        layer(x)
    means = [x.mean(axis=(0, 2, 3)) for x in batches]
    variances = [x.var(axis=(0, 2, 3), ddof=1) for x in batches]
    np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, np.mean(variances, axis=0), rtol=1e-12)


@pytest.mark.parametrize(
    "options",
    [dict(affine=False), dict(bias=False), dict(track_running_stats=False),
     dict(affine=False, track_running_stats=False)],
)
def test_options_match_torch(torch, rng, options):
    layer, twin = make_pair(torch, rng, 3, **options)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        getattr(twin, mode)()
        x = rng.standard_normal((4, 3, 2, 5)) + 1
        run_both(torch, layer, twin, x, rng.standard_normal(x.shape))
    assert_same_state(torch, layer, twin)


@pytest.mark.parametrize("training", [True, False])
def test_finite_differences(rng, training):
    layer = BatchNorm2d(3, dtype=np.float64)
    layer.weight.data[...] = rng.uniform(0.5, 1.5, 3)
    layer.bias.data[...] = rng.standard_normal(3)
    layer.running_mean[...] = rng.standard_normal(3)
    layer.running_var[...] = rng.uniform(0.5, 2, 3)
    layer.train(training)
    # The running statistics move at every training forward; the gradient does not use them.
    check_module_gradients(layer, rng.standard_normal((3, 3, 2, 2)), rng)


def test_float32_stays_float32_and_agrees_with_float64(rng):
    x64 = rng.standard_normal((8, 4, 6, 6)) * 3 + 2
    upstream = rng.standard_normal(x64.shape)
    results = {}
    for dtype in (np.float32, np.float64):
        layer = BatchNorm2d(4, dtype=dtype)
        out = layer(channels_last(x64.astype(dtype)))
        grad = layer.backward(upstream.astype(dtype))
        arrays = [out, grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
                  layer.running_var]
        assert all(a.dtype == dtype for a in arrays)
        results[dtype] = arrays
    for a32, a64 in zip(results[np.float32], results[np.float64], strict=True):
        assert_close(a32, a64, tol=1e-5)


def test_state_dict_keys_order_and_dtypes_match_torch(torch):
    layer = BatchNorm2d(5)
    twin = torch.nn.BatchNorm2d(5)
    assert list(layer.state_dict()) == list(twin.state_dict())
    assert layer.num_batches_tracked.shape == () and layer.num_batches_tracked.dtype == np.int64
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    layer.to(np.float64)
    assert layer.running_var.dtype == np.float64 and layer.num_batches_tracked.dtype == np.int64
    assert list(BatchNorm2d(2, affine=False, track_running_stats=False).state_dict()) == []
    assert repr(layer) == repr(twin)


def test_bad_inputs_name_the_layer_and_shapes():
    layer = BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3.*\(N, 3, H, W\).*\(2, 4, 5, 5\)"):
        layer(np.zeros((2, 4, 5, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(2, 3, 5\)"):
        layer(np.zeros((2, 3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3, 1, 1\)"):
        layer(np.zeros((1, 3, 1, 1), dtype=np.float32))
    with pytest.raises(TypeError, match="float64"):
        layer(np.zeros((2, 3, 2, 2)))
    layer.eval()
    assert layer(np.ones((1, 3, 1, 1), dtype=np.float32)).shape == (1, 3, 1, 1)  # fine in eval


def test_no_grad_keeps_no_cache(rng):
    layer = BatchNorm2d(2, dtype=np.float64)
    with no_grad():
        layer(rng.standard_normal((3, 2, 2, 2)))
    assert int(layer.num_batches_tracked) == 1  # statistics still update, as in torch
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(np.zeros((3, 2, 2, 2)))


# --- Bit-identity with the reference algorithm --------------------------------------------------
# The fast paths fold rows and reuse buffers; they must not change a single bit. The reference is
# the layer's arithmetic as it was written before them (plain NumPy broadcasting, one fresh array
# per operation): same operations, same order, same reductions.

def with_peer(partial: np.ndarray) -> np.ndarray:
    """The batch sums of a call whose other rank holds half as much again as this one: a fixed
    function of this call's partial sums, so a synchronised call is reproducible in one process
    (M = 120 of the test's shape becomes 180, still a whole number)."""
    return partial + partial * np.asarray(0.5, partial.dtype)


class BatchNormWithPeer(BatchNorm2d):
    """BatchNorm2d whose sums over the batch add ``with_peer``'s imagined rank, as
    SyncBatchNorm adds the real ones'."""

    def _sum_over_batch(self, partial_sums: np.ndarray) -> np.ndarray:
        return with_peer(partial_sums)


def reference_sums(v, times=None):
    """Per-channel sums of ``v`` (or of ``v * times``): folded rows for channels-last arrays,
    else NumPy's sum over axes."""
    def rows(a):
        a_nhwc = np.moveaxis(a, 1, -1)
        return a_nhwc.reshape(-1, a.shape[1]) if a_nhwc.flags.c_contiguous else None

    v_rows = rows(v)
    if times is None:
        return v.sum(axis=(0, 2, 3)) if v_rows is None else F.sum_rows(v_rows)
    times_rows = rows(times)
    if v_rows is None or times_rows is None:
        return (v * times).sum(axis=(0, 2, 3))
    return F.sum_rows_of_products(v_rows, times_rows)


def reference_forward(layer, x, combine=None, grad_enabled=True):
    """BatchNorm2d.forward's arithmetic, frozen; updates ``layer``'s running statistics.
    ``combine``: the sums over the batch from this call's partial sums (None: the same)."""
    combine = combine or (lambda partial: partial)
    use_batch_stats = layer.training or layer.running_mean is None
    count = None
    if use_batch_stats:
        sums = combine(np.append(reference_sums(x), x.dtype.type(x.size // x.shape[1])))
        count = int(sums[-1])
        mean = sums[:-1] / sums[-1]
        x_hat = x - mean.reshape(-1, 1, 1)
        var = combine(reference_sums(x_hat, x_hat)) / count
        inv_std = 1.0 / np.sqrt(var + layer.eps)
        x_hat *= inv_std.reshape(-1, 1, 1)
        if layer.training and layer.running_mean is not None:
            layer.num_batches_tracked += 1
            factor = (1.0 / float(layer.num_batches_tracked) if layer.momentum is None
                      else layer.momentum)
            unbiased_var = var * (count / (count - 1))
            layer.running_mean *= 1.0 - factor
            layer.running_mean += factor * mean
            layer.running_var *= 1.0 - factor
            layer.running_var += factor * unbiased_var
    else:
        inv_std = 1.0 / np.sqrt(layer.running_var + layer.eps)
        x_hat = (x - layer.running_mean.reshape(-1, 1, 1)) * inv_std.reshape(-1, 1, 1)
    if layer.affine:
        out = x_hat * layer.weight.data.reshape(-1, 1, 1)
        if layer.bias is not None:
            out += layer.bias.data.reshape(-1, 1, 1)
    else:
        out = x_hat.copy() if grad_enabled else x_hat
    return out, (x_hat, inv_std, count)


def reference_backward(layer, grad, cache, combine=None):
    """BatchNorm2d.backward's arithmetic, frozen: (grad_input, grad_weight, grad_bias)."""
    combine = combine or (lambda partial: partial)
    x_hat, inv_std, count = cache
    grad_bias = reference_sums(grad)
    grad_weight = reference_sums(grad, x_hat)
    scale = inv_std if not layer.affine else inv_std * layer.weight.data
    if count is not None:
        sum_dy, sum_dy_x_hat = combine(np.stack([grad_bias, grad_weight]))
        grad_input = x_hat * (sum_dy_x_hat / count).reshape(-1, 1, 1)
        np.subtract(grad, grad_input, out=grad_input)
        grad_input -= (sum_dy / count).reshape(-1, 1, 1)
        grad_input *= scale.reshape(-1, 1, 1)
    else:
        grad_input = grad * scale.reshape(-1, 1, 1)
    return grad_input, grad_weight, grad_bias


def memory_layout(a):
    """The strides of the axes longer than 1 (a length-1 axis's stride is never used)."""
    return [stride for stride, size in zip(a.strides, a.shape, strict=True) if size > 1]


def assert_bits_equal(ours, reference, what):
    """The same dtype, values to the bit, and memory layout (strides decide how the next layer's
    reductions sum, so a changed layout would change later bits)."""
    assert ours.dtype == reference.dtype, what
    assert ours.tobytes() == reference.tobytes(), f"{what}: {np.max(np.abs(ours - reference))}"
    assert memory_layout(ours) == memory_layout(reference), what


LAYOUTS = {
    "channels_last": channels_last,
    "nchw": np.ascontiguousarray,
    "strided": lambda x: np.repeat(x, 2, axis=3)[..., ::2],  # neither layout: the general path
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 32, 7, 7), (3, 5, 3, 1), (2, 64, 5, 3), (6, 1, 4, 4),
                                   (5, 7, 1, 1), (2, 3, 9, 11)])
@pytest.mark.parametrize("options", [{}, dict(affine=False), dict(bias=False),
                                     dict(track_running_stats=False), dict(momentum=None)])
def test_fast_paths_are_bit_identical_to_the_reference(rng, dtype, shape, options):
    c = shape[1]
    layer = BatchNorm2d(c, dtype=dtype, **options)
    if layer.affine:
        layer.weight.data[...] = rng.uniform(0.5, 1.5, c)
    if layer.bias is not None:
        layer.bias.data[...] = rng.standard_normal(c)
    twin = BatchNorm2d(c, dtype=dtype, **options)
    twin.load_state_dict(layer.state_dict())
    steps = [("train", layout) for layout in LAYOUTS] + [("eval", layout) for layout in LAYOUTS]
    for mode, layout in steps:
        layer.train(mode == "train")
        twin.train(mode == "train")
        x = LAYOUTS[layout](rng.standard_normal(shape).astype(dtype) * 3 + 1)
        grad = LAYOUTS[layout](rng.standard_normal(shape).astype(dtype))
        out = layer(x)
        expected, cache = reference_forward(twin, x)
        assert_bits_equal(out, expected, f"{mode} {layout} output")
        grad_input = layer.backward(grad)
        expected_grads = reference_backward(twin, grad, cache)
        assert_bits_equal(grad_input, expected_grads[0], f"{mode} {layout} grad_input")
        params = (layer.weight, layer.bias)
        for param, expected_grad in zip(params, expected_grads[1:], strict=True):
            if param is not None:
                assert_bits_equal(param.grad, expected_grad, f"{mode} {layout} param grad")
                param.grad = None
        with no_grad():  # inference computes in fewer buffers: the same bits still
            out = layer(x)
        assert_bits_equal(out, reference_forward(twin, x, grad_enabled=False)[0],
                          f"{mode} {layout} output without grad")
        for key, value in twin.state_dict().items():
            assert np.array_equal(layer.state_dict()[key], value), f"{mode} {layout} {key}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grad_layout", list(LAYOUTS))
def test_synchronised_and_mixed_layouts_are_bit_identical_to_the_reference(rng, dtype,
                                                                          grad_layout):
    """Sums that other ranks add to (SyncBatchNorm's one difference), and an upstream gradient
    laid out unlike the input."""
    shape = (4, 16, 6, 5)
    for kind, combine in ((BatchNorm2d, None), (BatchNormWithPeer, with_peer)):
        layer = kind(16, dtype=dtype)
        layer.weight.data[...] = rng.uniform(0.5, 1.5, 16)
        layer.bias.data[...] = rng.standard_normal(16)
        twin = BatchNorm2d(16, dtype=dtype)
        twin.load_state_dict(layer.state_dict())
        x = channels_last(rng.standard_normal(shape).astype(dtype) + 2)
        grad = LAYOUTS[grad_layout](rng.standard_normal(shape).astype(dtype))
        out = layer(x)
        expected, cache = reference_forward(twin, x, combine)
        assert_bits_equal(out, expected, "output")
        expected_grads = reference_backward(twin, grad, cache, combine)
        assert_bits_equal(layer.backward(grad), expected_grads[0], "grad_input")
        assert_bits_equal(layer.weight.grad, expected_grads[1], "weight grad")
        assert_bits_equal(layer.bias.grad, expected_grads[2], "bias grad")
        for key, value in twin.state_dict().items():
            assert np.array_equal(layer.state_dict()[key], value), key


def test_channels_last_inputs_take_the_folded_path(rng, monkeypatch):
    """The bit-identity tests above only mean something if the fast path runs."""
    calls = []
    apply_to_rows = F.apply_to_rows
    monkeypatch.setattr(F, "apply_to_rows",
                        lambda *args: calls.append(args[0]) or apply_to_rows(*args))
    layer = BatchNorm2d(8)
    x = channels_last(rng.standard_normal((4, 8, 5, 5)).astype(np.float32))
    layer.backward(layer(x) * 0 + x)
    # forward: centre, scale, gamma, beta; backward: the x_hat term, the dy term, the scale
    assert calls == [np.subtract, np.multiply, np.multiply, np.add,
                     np.multiply, np.subtract, np.multiply]
    calls.clear()
    layer.backward(layer(np.ascontiguousarray(x)) * 0 + 1)
    assert calls == []



def test_reset_running_stats_matches_torch(torch, rng):
    layer, twin = make_pair(torch, rng, 3)
    x = rng.standard_normal((4, 3, 2, 2))
    layer(x)
    twin(torch.from_numpy(x))
    layer.reset_running_stats()
    twin.reset_running_stats()
    for key, value in twin.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[key], value.numpy(), err_msg=key)
    np.testing.assert_array_equal(layer.running_var, np.ones(3))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_dtype_must_match_running_stats_without_affine(training):
    layer = BatchNorm2d(3, affine=False).train(training)  # float32 statistics, no weight
    with pytest.raises(TypeError, match=r"float64.*float32"):
        layer(np.zeros((2, 3, 2, 2)))
