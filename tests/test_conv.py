"""Conv2d against PyTorch (random shapes, strides, paddings), finite differences, dtypes, layouts,
gradient accumulation, no_grad, errors, init and repr."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradcheck import assert_close, check_module_gradients, rel_error
from scratchcnn.nn import Conv2d, no_grad


def _random_conv_cases(count: int, seed: int) -> list:
    """Seeded valid configurations: kernels that don't divide the input, rectangular kernels,
    strides 1-3, paddings 0-2, some dilation, bias on and off."""
    gen = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        kernel = tuple(int(k) for k in gen.integers(1, 5, size=2))
        stride = tuple(int(s) for s in gen.integers(1, 4, size=2))
        padding = tuple(int(p) for p in gen.integers(0, 3, size=2))
        dilation = (2, 1) if gen.random() < 0.2 else (1, 1)
        h, w = (int(v) for v in gen.integers(1, 13, size=2))
        if (h + 2 * padding[0] < dilation[0] * (kernel[0] - 1) + 1
                or w + 2 * padding[1] < dilation[1] * (kernel[1] - 1) + 1):
            continue
        n, c, o = (int(v) for v in gen.integers(1, 6, size=3))
        config = dict(in_channels=c, out_channels=o, kernel_size=kernel, stride=stride,
                      padding=padding, dilation=dilation, bias=bool(gen.integers(2)))
        cases.append(pytest.param(config, (min(n, 4), c, h, w),
                                  id=f"x{min(n, 4)}x{c}x{h}x{w}-o{o}-k{kernel}-s{stride}-p{padding}"
                                     f"-d{dilation}-b{config['bias']}"))
    return cases


def torch_twin(torch, layer: Conv2d):
    """A float64 torch.nn.Conv2d with the same configuration and a copy of the weights."""
    twin = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                           layer.stride, layer.padding, layer.dilation,
                           bias=layer.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        twin.weight.copy_(torch.from_numpy(layer.weight.data))
        if layer.bias is not None:
            twin.bias.copy_(torch.from_numpy(layer.bias.data))
    return twin


def compare_with_torch(torch, layer: Conv2d, x: np.ndarray, rng: np.random.Generator) -> None:
    """Forward output, input gradient and parameter gradients agree with PyTorch to 1e-8."""
    twin = torch_twin(torch, layer)
    out = layer(x)
    upstream = rng.standard_normal(out.shape)
    layer.zero_grad()
    grad_x = layer.backward(upstream)

    x_t = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
    out_t = twin(x_t)
    out_t.backward(torch.from_numpy(upstream))
    assert out.shape == tuple(out_t.shape)
    assert_close(out, out_t.detach().numpy(), what="output")
    assert_close(grad_x, x_t.grad.numpy(), what="grad input")
    assert_close(layer.weight.grad, twin.weight.grad.numpy(), what="grad weight")
    if layer.bias is not None:
        assert_close(layer.bias.grad, twin.bias.grad.numpy(), what="grad bias")


@pytest.mark.parametrize(("config", "shape"), _random_conv_cases(32, seed=2024))
def test_matches_torch_on_random_configurations(torch, rng, config, shape):
    layer = Conv2d(**config, dtype=np.float64, rng=rng)
    compare_with_torch(torch, layer, rng.standard_normal(shape), rng)


@pytest.mark.parametrize(("config", "shape"), [
    (dict(in_channels=1, out_channels=16, kernel_size=3, padding=1), (2, 1, 28, 28)),
    (dict(in_channels=16, out_channels=32, kernel_size=3, padding=1), (2, 16, 14, 14)),
    (dict(in_channels=2, out_channels=3, kernel_size=3, padding="same"), (2, 2, 5, 6)),
    (dict(in_channels=2, out_channels=3, kernel_size=(4, 2), padding="same"), (1, 2, 5, 6)),
    (dict(in_channels=2, out_channels=3, kernel_size=(2, 3), padding="same", dilation=(1, 2)),
     (2, 2, 6, 7)),
    (dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid"), (2, 2, 5, 6)),
    (dict(in_channels=3, out_channels=2, kernel_size=5, stride=3), (2, 3, 5, 5)),  # one pixel out
    (dict(in_channels=3, out_channels=2, kernel_size=1, stride=2), (2, 3, 7, 4)),
], ids=["mnist-conv1", "mnist-conv2", "same-odd", "same-even", "same-dilated", "valid",
        "kernel-equals-input", "pointwise-strided"])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_matches_torch_on_named_configurations(torch, rng, config, shape):
    layer = Conv2d(**config, dtype=np.float64, rng=rng)
    compare_with_torch(torch, layer, rng.standard_normal(shape), rng)
    if config.get("padding") == "same":
        assert layer(rng.standard_normal(shape)).shape[2:] == shape[2:]


@pytest.mark.parametrize("config", [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), bias=False),
    dict(kernel_size=2, stride=3, padding=2, dilation=(1, 2)),
])
def test_gradients_match_finite_differences(rng, config):
    layer = Conv2d(2, 3, **config, dtype=np.float64, rng=rng)
    check_module_gradients(layer, rng.standard_normal((2, 2, 5, 6)), rng)


def test_output_is_a_channels_last_view_and_layouts_do_not_change_results(rng):
    layer = Conv2d(3, 4, 3, padding=1, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 3, 6, 5))
    out = layer(x)
    assert out.transpose(0, 2, 3, 1).flags.c_contiguous
    upstream = rng.standard_normal(out.shape)
    layer.zero_grad()
    grad_x = layer.backward(upstream)
    grads = (layer.weight.grad.copy(), layer.bias.grad.copy())

    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    strided = np.repeat(x, 2, axis=3)[:, :, :, ::2]  # a non-contiguous view with equal values
    upstream_strided = np.repeat(upstream, 2, axis=0)[::2]
    for variant in (channels_last, strided):
        layer.zero_grad()
        np.testing.assert_array_equal(layer(variant), out)
        np.testing.assert_array_equal(layer.backward(upstream_strided), grad_x)
        np.testing.assert_array_equal(layer.weight.grad, grads[0])
        np.testing.assert_array_equal(layer.bias.grad, grads[1])


def test_chained_layers_accept_the_channels_last_view(torch, rng):
    first = Conv2d(2, 3, 3, padding=1, dtype=np.float64, rng=rng)
    second = Conv2d(3, 4, 2, stride=2, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 2, 6, 6))
    hidden = first(x)
    compare_with_torch(torch, second, hidden, rng)


def test_float32_in_float32_out_and_close_to_float64(rng):
    layer = Conv2d(3, 5, (3, 2), stride=2, padding=1, rng=rng)
    assert layer.weight.dtype == np.float32 and layer.bias.dtype == np.float32
    x = rng.standard_normal((4, 3, 9, 8)).astype(np.float32)
    out = layer(x)
    upstream = rng.standard_normal(out.shape).astype(np.float32)
    grad_x = layer.backward(upstream)
    assert out.dtype == grad_x.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype
    assert out.dtype == np.float32

    twin = Conv2d(3, 5, (3, 2), stride=2, padding=1, dtype=np.float64)
    twin.load_state_dict(layer.state_dict())
    out64 = twin(x.astype(np.float64))
    grad64 = twin.backward(upstream.astype(np.float64))
    assert rel_error(out, out64) < 1e-5
    assert rel_error(grad_x, grad64) < 1e-5
    assert rel_error(layer.weight.grad, twin.weight.grad) < 1e-5


def test_parameter_gradients_accumulate_across_backward_calls(rng):
    layer = Conv2d(2, 3, 3, padding=1, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 2, 5, 5))
    upstream = rng.standard_normal((2, 3, 5, 5))
    layer(x)
    first_grad_x = layer.backward(upstream)
    once = (layer.weight.grad.copy(), layer.bias.grad.copy())
    layer(x)
    second_grad_x = layer.backward(upstream)
    np.testing.assert_allclose(layer.weight.grad, 2 * once[0], rtol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, 2 * once[1], rtol=1e-12)
    np.testing.assert_array_equal(first_grad_x, second_grad_x)  # input grads do not accumulate


def test_no_grad_caches_nothing_and_backward_then_fails(rng):
    layer = Conv2d(2, 3, 3, dtype=np.float64, rng=rng)
    x = rng.standard_normal((1, 2, 5, 5))
    expected = layer(x)
    with no_grad():
        out = layer(x)
    np.testing.assert_array_equal(out, expected)
    assert layer._cols is None and layer._weight_matrix is None  # the stale cache is dropped too
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones_like(out))


def test_backward_before_forward_is_a_clear_error(rng):
    with pytest.raises(RuntimeError, match=r"Conv2d.*forward"):
        Conv2d(1, 1, 1, rng=rng).backward(np.ones((1, 1, 1, 1), np.float32))


@pytest.mark.parametrize(("shape", "pattern"), [
    ((2, 4, 8, 8), r"Conv2d\(3, 2.*\(N, 3, H, W\).*\(2, 4, 8, 8\)"),  # wrong channel count
    ((3, 8, 8), r"Conv2d\(3, 2.*\(N, 3, H, W\).*\(3, 8, 8\)"),  # missing batch axis
    ((1, 3, 2, 8), r"Conv2d\(3, 2.*\(1, 3, 2, 8\).*kernel"),  # smaller than the kernel
])
def test_bad_input_shapes_raise_value_errors_naming_layer_and_shapes(rng, shape, pattern):
    layer = Conv2d(3, 2, 3, rng=rng)
    with pytest.raises(ValueError, match=pattern):
        layer(np.zeros(shape, np.float32))


def test_bad_grad_output_and_dtype_mismatches_are_reported(rng):
    layer = Conv2d(3, 2, 3, rng=rng)
    out = layer(np.zeros((1, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"Conv2d.*\(1, 2, 4, 4\).*\(1, 2, 3, 3\)"):
        layer.backward(np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(TypeError, match="float64"):
        layer.backward(np.zeros(out.shape, np.float64))
    with pytest.raises(TypeError, match="float64"):
        layer(np.zeros((1, 3, 5, 5), np.float64))  # no silent upcast of a float32 layer


@pytest.mark.parametrize(("kwargs", "pattern"), [
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=(3,)), "kernel_size"),
    (dict(kernel_size=3, stride=0), "stride"),
    (dict(kernel_size=3, padding=-1), "padding"),
    (dict(kernel_size=3, padding="full"), "padding"),
    (dict(kernel_size=3, stride=2, padding="same"), "same.*strided"),
    (dict(kernel_size=3, groups=2), "groups"),
    (dict(kernel_size=3, padding_mode="reflect"), "padding_mode"),
])
def test_bad_constructor_arguments_raise_value_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Conv2d(2, 2, **kwargs)


def test_default_init_follows_torch_distribution(torch, rng):
    layer = Conv2d(16, 32, 3, rng=rng)  # fan_in = 16 * 9 = 144, bound = 1/12
    bound = 1 / math.sqrt(144)
    twin = torch.nn.Conv2d(16, 32, 3)
    for ours, theirs in ((layer.weight.data, twin.weight.detach().numpy()),
                         (layer.bias.data, twin.bias.detach().numpy())):
        assert ours.shape == theirs.shape
        assert np.abs(ours).max() <= bound
        assert np.abs(ours).max() > 0.9 * bound  # uses the whole range, not a smaller one
        assert np.abs(theirs).max() <= bound
    # U(-b, b) has standard deviation b / sqrt(3); 4608 weights pin it to within ~2%.
    assert layer.weight.data.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(layer.weight.data.mean()) < 0.05 * bound


def test_same_seed_gives_same_weights_and_default_rng_is_used():
    import scratchcnn

    a = Conv2d(3, 4, 3, rng=np.random.default_rng(7))
    b = Conv2d(3, 4, 3, rng=np.random.default_rng(7))
    c = Conv2d(3, 4, 3, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    np.testing.assert_array_equal(a.bias.data, b.bias.data)
    assert not np.array_equal(a.weight.data, c.weight.data)
    scratchcnn.manual_seed(3)
    d = Conv2d(3, 4, 3)
    scratchcnn.manual_seed(3)
    e = Conv2d(3, 4, 3)
    np.testing.assert_array_equal(d.weight.data, e.weight.data)


@pytest.mark.parametrize("args", [
    (1, 16, 3, 1, 1), (3, 8, (3, 2), 2), (2, 4, 3, 1, "same"), (2, 4, 3, 1, "valid"),
    (2, 4, 3, 1, 0, 2),
])
def test_repr_and_state_dict_keys_match_torch(torch, args):
    ours, theirs = Conv2d(*args), torch.nn.Conv2d(*args)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    no_bias = Conv2d(1, 2, 3, bias=False)
    assert repr(no_bias) == repr(torch.nn.Conv2d(1, 2, 3, bias=False))
    assert list(no_bias.state_dict()) == ["weight"]


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(stride=2, dilation=(1, 2)),
                                    dict(padding="valid")])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_large_im2col_goes_in_pieces_with_the_same_results(rng, monkeypatch, kwargs, in_channels):
    """Above F.MAX_COLS_BYTES the cols matrix is built a few samples at a time (also for dL/dW in
    backward): the same results up to rounding (the input gradient, bit for bit)."""
    from scratchcnn.nn import functional as F

    x = rng.standard_normal((7, in_channels, 9, 8))
    upstream = None
    results = []
    for limit, piece in ((None, None), (1, 3 * 9 * 8 * 9 * in_channels * 8)):  # ~3 samples
        if limit is not None:
            monkeypatch.setattr(F, "MAX_COLS_BYTES", limit)
            monkeypatch.setattr(F, "COLS_PIECE_BYTES", piece)
        layer = Conv2d(in_channels, 4, 3, dtype=np.float64, rng=np.random.default_rng(1),
                       **kwargs)
        out = layer(x)
        if upstream is None:
            upstream = rng.standard_normal(out.shape)
        grad_input = layer.backward(upstream)
        assert (layer._cols is None) == (limit is not None)
        results.append((out, grad_input, layer.weight.grad, layer.bias.grad))
    (out_a, gin_a, gw_a, gb_a), (out_b, gin_b, gw_b, gb_b) = results
    np.testing.assert_allclose(out_b, out_a, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(gin_a, gin_b)
    np.testing.assert_allclose(gw_b, gw_a, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(gb_a, gb_b)


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(stride=2, dilation=(1, 2)),
                                    dict(padding="valid"), dict(padding=2, dilation=2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_gradient_in_pieces_is_bit_identical(rng, monkeypatch, kwargs, dtype):
    """The input gradient is computed a few samples at a time (``F.GRAD_COLS_BYTES`` of the
    output gradient's im2col with stride 1, ``F.GRAD_PIECE_BYTES`` of it for col2im): one sample
    per piece, or 3 with a shorter last piece, gives the whole batch's bits."""
    from scratchcnn.nn import functional as F

    x = rng.standard_normal((7, 3, 9, 8)).astype(dtype)
    layer = Conv2d(3, 4, 3, dtype=dtype, rng=np.random.default_rng(1), **kwargs)
    out = layer(x)
    upstream = rng.standard_normal(out.shape).astype(dtype)
    itemsize = np.dtype(dtype).itemsize
    grad_bytes = out.shape[2] * out.shape[3] * 4 * itemsize  # one sample's output gradient
    cols_bytes = 9 * 8 * 3 * 3 * 4 * itemsize  # one sample's im2col of it (9x8 input, K = 36)
    grads = []
    for samples in (None, 1, 3):
        monkeypatch.setattr(F, "GRAD_PIECE_BYTES", 2**40 if samples is None
                            else samples * grad_bytes)
        monkeypatch.setattr(F, "GRAD_COLS_BYTES", 2**40 if samples is None
                            else samples * cols_bytes)
        layer(x)
        grads.append(layer.backward(upstream))
    assert grads[0].dtype == dtype
    np.testing.assert_array_equal(grads[1], grads[0])
    np.testing.assert_array_equal(grads[2], grads[0])
    # And the pieces cover every sample: the whole-batch gradient is the textbook one.
    reference = np.zeros((7, 3, 9, 8))
    for sample in range(7):
        single = Conv2d(3, 4, 3, dtype=np.float64, rng=np.random.default_rng(1), **kwargs)
        single(x[sample:sample + 1].astype(np.float64))
        reference[sample] = single.backward(upstream[sample:sample + 1].astype(np.float64))[0]
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(grads[2], reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_next_forward_rewrites_the_cached_cols_in_place_with_the_same_results(rng, in_channels):
    """A training forward writes its im2col matrix into the last forward's (F.recycled): same
    memory when the batch has the same size, new memory when not, and every step's outputs and
    gradients those of a layer that allocates afresh."""
    layer = Conv2d(in_channels, 4, 3, padding=1, rng=np.random.default_rng(3))
    batches = [rng.standard_normal((n, in_channels, 6, 5)).astype(np.float32)
               for n in (4, 4, 2, 4)]
    previous = None
    for step, x in enumerate(batches):
        out = layer(x)
        upstream = rng.standard_normal(out.shape).astype(np.float32)
        layer.zero_grad()
        grad_input = layer.backward(upstream)
        fresh = Conv2d(in_channels, 4, 3, padding=1, rng=np.random.default_rng(3))
        np.testing.assert_array_equal(out, fresh(x))
        fresh.zero_grad()
        np.testing.assert_array_equal(grad_input, fresh.backward(upstream))
        np.testing.assert_array_equal(layer.weight.grad, fresh.weight.grad)
        if step in (1, 3):  # same size as the batch before: 4 samples after 4; not after 2
            assert np.shares_memory(layer._cols, previous) == (step == 1)
        previous = layer._cols
