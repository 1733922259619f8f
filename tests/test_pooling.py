"""MaxPool2d and AvgPool2d against PyTorch (random geometries, ties, overlapping windows, padding,
ceil_mode), finite differences, dtypes, layouts, no_grad, errors and repr."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck import assert_close, check_module_gradients
from scratchcnn.nn import AvgPool2d, MaxPool2d, ReLU, Sequential, no_grad


def _random_pool_cases(kind: str, count: int, seed: int) -> list:
    """Seeded valid configurations: rectangular kernels that don't divide the input, strides
    smaller than (overlapping), equal to or larger than the kernel, padding up to half the kernel,
    ceil_mode; dilation for max pooling, count_include_pad for average pooling."""
    gen = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        kernel = tuple(int(k) for k in gen.integers(1, 5, size=2))
        stride = None if gen.random() < 0.3 else tuple(int(s) for s in gen.integers(1, 4, size=2))
        padding = tuple(int(gen.integers(0, k // 2 + 1)) for k in kernel)
        config = dict(kernel_size=kernel, stride=stride, padding=padding,
                      ceil_mode=bool(gen.random() < 0.4))
        if kind == "max" and gen.random() < 0.2:
            config["dilation"] = (2, 1)
        if kind == "avg":
            config["count_include_pad"] = bool(gen.integers(2))
        spans = [config.get("dilation", (1, 1))[a] * (kernel[a] - 1) + 1 for a in (0, 1)]
        h, w = (int(v) for v in gen.integers(1, 13, size=2))
        if h + 2 * config["padding"][0] < spans[0] or w + 2 * config["padding"][1] < spans[1]:
            continue
        shape = (int(gen.integers(1, 5)), int(gen.integers(1, 6)), h, w)
        cases.append(pytest.param(config, shape, id=f"{shape}-{config}"))
    return cases


def torch_output_and_grad(torch, layer, x: np.ndarray, upstream: np.ndarray):
    """The same pooling in PyTorch: forward output and input gradient as NumPy arrays."""
    kwargs = {"kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding,
              "ceil_mode": layer.ceil_mode}
    if isinstance(layer, MaxPool2d):
        twin = torch.nn.MaxPool2d(dilation=layer.dilation, **kwargs)
    else:
        twin = torch.nn.AvgPool2d(count_include_pad=layer.count_include_pad,
                                  divisor_override=layer.divisor_override, **kwargs)
    x_t = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
    out_t = twin(x_t)
    out_t.backward(torch.from_numpy(np.ascontiguousarray(upstream)))
    return out_t.detach().numpy(), x_t.grad.numpy()


def compare_with_torch(torch, layer, x, rng, upstream=None, exact=False):
    out = layer(x)
    if upstream is None:
        upstream = rng.standard_normal(out.shape)
    grad_x = layer.backward(upstream)
    expected_out, expected_grad = torch_output_and_grad(torch, layer, x, upstream)
    assert out.shape == expected_out.shape
    if exact:
        np.testing.assert_array_equal(out, expected_out)
        np.testing.assert_array_equal(grad_x, expected_grad)
    else:
        assert_close(out, expected_out, what="output")
        assert_close(grad_x, expected_grad, what="grad input")


@pytest.mark.parametrize(("config", "shape"), _random_pool_cases("max", 30, seed=11))
def test_maxpool_matches_torch_on_random_configurations(torch, rng, config, shape):
    compare_with_torch(torch, MaxPool2d(**config), rng.standard_normal(shape), rng)


@pytest.mark.parametrize(("config", "shape"), _random_pool_cases("avg", 30, seed=12))
def test_avgpool_matches_torch_on_random_configurations(torch, rng, config, shape):
    compare_with_torch(torch, AvgPool2d(**config), rng.standard_normal(shape), rng)


def _tied_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    mnist_like = np.zeros((3, 2, 12, 11))
    mnist_like[:, :, 3:9, 4:8] = rng.integers(0, 4, size=(3, 2, 6, 4))  # a blob on a flat field
    return {
        "all-zero": np.zeros((2, 3, 7, 9)),
        "small-integers": rng.integers(0, 3, size=(2, 3, 9, 8)).astype(np.float64),
        "mnist-like": mnist_like,
        "negative-constant": np.full((1, 2, 6, 6), -1.5),  # ties next to -inf padding
    }


@pytest.mark.parametrize("config", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), ceil_mode=True),
    dict(kernel_size=2, stride=1, dilation=2),
], ids=["2x2", "3x3-overlapping", "3x3-s2-p1", "rect-ceil", "dilated"])
@pytest.mark.parametrize("name", ["all-zero", "small-integers", "mnist-like", "negative-constant"])
def test_maxpool_ties_route_gradient_exactly_like_torch(torch, rng, config, name):
    x = _tied_inputs(rng)[name]
    layer = MaxPool2d(**config)
    # Integer-valued upstream gradients make overlapping sums exact, so any routing difference
    # (e.g. to the last or to every tied element) shows up as an inequality.
    upstream = rng.integers(1, 9, size=layer(x).shape).astype(np.float64)
    compare_with_torch(torch, layer, x, rng, upstream=upstream, exact=True)


def test_maxpool_ties_go_to_the_first_maximum_only():
    x = np.zeros((1, 1, 2, 2))
    layer = MaxPool2d(2)
    layer(x)
    grad = layer.backward(np.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(grad, [[[[1.0, 0.0], [0.0, 0.0]]]])


def test_maxpool_overlapping_windows_sum_their_gradients():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 5.0  # the maximum of all four overlapping 2x2 windows
    layer = MaxPool2d(2, stride=1)
    layer(x)
    grad = layer.backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    expected = np.zeros((1, 1, 3, 3))
    expected[0, 0, 1, 1] = 10.0
    np.testing.assert_array_equal(grad, expected)


def test_avgpool_divisor_override_matches_torch(torch, rng):
    layer = AvgPool2d((3, 2), stride=2, padding=1, ceil_mode=True, divisor_override=5)
    compare_with_torch(torch, layer, rng.standard_normal((2, 3, 7, 8)), rng)


def _distinct_values(rng, shape):
    """Values at least 0.01 apart, so a finite-difference step never changes a window's argmax."""
    return rng.permutation(np.prod(shape)).reshape(shape) * 0.01 + 0.005


@pytest.mark.parametrize("layer", [
    MaxPool2d(2), MaxPool2d(3, stride=2, padding=1), MaxPool2d((2, 3), stride=1, ceil_mode=True),
    AvgPool2d(2), AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    AvgPool2d((3, 2), stride=(1, 2), padding=(1, 0), ceil_mode=True),
], ids=repr)
def test_gradients_match_finite_differences(rng, layer):
    check_module_gradients(layer, _distinct_values(rng, (2, 3, 5, 7)), rng)


@pytest.mark.parametrize("make", [lambda: MaxPool2d(3, 2, 1), lambda: AvgPool2d(3, 2, 1)],
                         ids=["max", "avg"])
def test_layouts_do_not_change_results_and_output_is_channels_last(rng, make):
    layer = make()
    x = rng.standard_normal((2, 3, 7, 6))
    out = layer(x)
    assert out.transpose(0, 2, 3, 1).flags.c_contiguous
    upstream = rng.standard_normal(out.shape)
    grad_x = layer.backward(upstream)
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    strided = np.repeat(x, 2, axis=2)[:, :, ::2]
    upstream_strided = np.ascontiguousarray(upstream.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for variant in (channels_last, strided):
        np.testing.assert_array_equal(layer(variant), out)
        np.testing.assert_array_equal(layer.backward(upstream_strided), grad_x)


@pytest.mark.parametrize("make", [lambda: MaxPool2d(2), lambda: AvgPool2d(3, 2, 1)],
                         ids=["max", "avg"])
def test_float32_stays_float32(rng, make):
    layer = make()
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = layer(x)
    grad = layer.backward(np.ones(out.shape, np.float32))
    assert out.dtype == grad.dtype == np.float32
    reference = make()
    expected = reference(x.astype(np.float64))
    assert_close(out, expected, tol=1e-6, what="float32 vs float64")
    with pytest.raises(TypeError, match="float64"):
        layer.backward(np.ones(out.shape, np.float64))


@pytest.mark.parametrize("make", [lambda: MaxPool2d(2), lambda: AvgPool2d(2)], ids=["max", "avg"])
def test_no_grad_caches_nothing(rng, make):
    layer = make()
    x = rng.standard_normal((1, 2, 4, 4))
    expected = layer(x)
    with no_grad():
        out = layer(x)
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones(out.shape))


@pytest.mark.parametrize("make", [lambda: MaxPool2d(3), lambda: AvgPool2d(3)], ids=["max", "avg"])
def test_bad_inputs_raise_clear_errors(make):
    layer = make()
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}.*\(N, C, H, W\).*\(3, 8, 8\)"):
        layer(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=rf"{name}.*\(1, 2, 2, 8\).*too small"):
        layer(np.zeros((1, 2, 2, 8)))
    with pytest.raises(TypeError, match=name):
        layer(np.zeros((1, 2, 8, 8), dtype=np.int64))
    with pytest.raises(RuntimeError, match=name):
        layer.backward(np.zeros((1, 2, 2, 2)))
    layer(np.zeros((1, 2, 6, 6)))
    with pytest.raises(ValueError, match=rf"{name}.*\(1, 2, 3, 3\).*\(1, 2, 2, 2\)"):
        layer.backward(np.zeros((1, 2, 3, 3)))


@pytest.mark.parametrize(("make", "pattern"), [
    (lambda: MaxPool2d(2, padding=2), "padding.*half"),
    (lambda: MaxPool2d(3, padding=2, dilation=2), "padding.*half"),  # torch ignores dilation here
    (lambda: AvgPool2d(3, padding=2), "padding.*half"),
    (lambda: MaxPool2d(0), "kernel_size"),
    (lambda: MaxPool2d(2, stride=0), "stride"),
    (lambda: AvgPool2d(2, padding=-1), "padding"),
    (lambda: AvgPool2d(2, divisor_override=0), "divisor_override"),
    (lambda: MaxPool2d(2, return_indices=True), "return_indices"),
])
def test_bad_constructor_arguments_raise_value_errors(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


@pytest.mark.parametrize(("cls", "args", "kwargs"), [
    ("MaxPool2d", (2,), {}),
    ("MaxPool2d", ((2, 3), 1, 1), {"ceil_mode": True}),
    ("MaxPool2d", (3, 2, 1, 2), {}),
    ("AvgPool2d", (2,), {}),
    ("AvgPool2d", (3, 2, 1, True, False), {}),
])
def test_repr_matches_torch(torch, cls, args, kwargs):
    ours = {"MaxPool2d": MaxPool2d, "AvgPool2d": AvgPool2d}[cls](*args, **kwargs)
    assert repr(ours) == repr(getattr(torch.nn, cls)(*args, **kwargs))
    assert ours.state_dict() == {} and list(ours.parameters()) == []


@pytest.mark.parametrize("values", ["continuous", "tied"])
def test_maxpool_kernel_with_more_than_256_taps_matches_torch(torch, rng, values):
    shape = (1, 2, 18, 19)
    x = (rng.standard_normal(shape) if values == "continuous"
         else rng.integers(0, 2, size=shape).astype(np.float64))
    layer = MaxPool2d((16, 17), stride=1)  # 272 taps: indices no longer fit in uint8
    upstream = rng.integers(1, 9, size=layer(x).shape).astype(np.float64)
    compare_with_torch(torch, layer, x, rng, upstream=upstream, exact=True)


def test_pooling_output_never_aliases_the_input(rng):
    x = rng.standard_normal((1, 2, 3, 3))
    for layer in (MaxPool2d(1), AvgPool2d(1)):
        out = layer(x)
        np.testing.assert_array_equal(out, x)
        assert not np.shares_memory(out, x)


# -- ReLU -> MaxPool2d run pool-first ---------------------------------------------------------

def _relu_pool_model():
    from scratchcnn.nn import Conv2d, Flatten, Linear, ReLU, Sequential

    gen = np.random.default_rng(5)
    return Sequential(Conv2d(2, 3, 3, padding=1, rng=gen), ReLU(), MaxPool2d(2),
                      ReLU(), MaxPool2d(3, stride=1, padding=1),  # overlapping windows
                      Flatten(), Linear(3 * 3 * 3, 4, rng=gen))


def test_sequential_runs_relu_maxpool_pairs_pool_first_and_keeps_names():
    from scratchcnn.nn import ReLU

    model = _relu_pool_model()
    assert [type(m).__name__ for m in model.execution_order()] == [
        "Conv2d", "MaxPool2d", "ReLU", "MaxPool2d", "ReLU", "Flatten", "Linear"]
    assert [type(m) for m in model][1:3] == [ReLU, MaxPool2d]  # iteration: registration order
    assert list(model.state_dict())[:2] == ["0.weight", "0.bias"]
    assert sorted(map(id, model.execution_order())) == sorted(map(id, model))  # same objects
    plain = _relu_pool_model()[5:]  # no ReLU -> MaxPool2d pair: registration order
    assert plain.execution_order() == list(plain)


def test_execution_order_follows_children_set_later():
    from scratchcnn.nn import Conv2d, ReLU

    model = Sequential(ReLU(), AvgPool2d(2))
    assert [type(m) for m in model.execution_order()] == [ReLU, AvgPool2d]
    setattr(model, "1", MaxPool2d(2))  # replace the child
    assert [type(m) for m in model.execution_order()] == [MaxPool2d, ReLU]
    model.append(Conv2d(1, 1, 1))
    assert len(model.execution_order()) == 3
    inplace = Sequential(ReLU(inplace=True), MaxPool2d(2))  # its input's clamping is observable
    assert inplace.execution_order() == list(inplace)


def _registration_order_loss_and_grads(model, x, labels):
    """Loss and input gradient with every child run in registration order, by hand."""
    from scratchcnn.nn import CrossEntropyLoss

    criterion = CrossEntropyLoss()
    for layer in model:
        x = layer(x)
    loss = criterion(x, labels)
    grad = criterion.backward()
    for layer in reversed(list(model)):
        grad = layer.backward(grad)
    return loss, grad


def test_pool_first_is_exact_including_ties_and_nonpositive_windows():
    """Values, input and parameter gradients bit-identical to the registration order, on inputs
    with tied maxima (positive, zero and negative) and windows that are entirely negative. (The
    first Conv2d, MaxPool2d and ReLU run as one fused step, whose weight gradient sums its rows
    in another order: those two agree to rounding.)"""
    from scratchcnn.nn import CrossEntropyLoss

    gen = np.random.default_rng(11)
    x = gen.integers(-2, 3, size=(6, 2, 6, 6)).astype(np.float64)  # many ties, zeros
    x[0] = -1.0
    labels = gen.integers(0, 4, size=6)
    results = []
    for pool_first in (False, True):
        model = _relu_pool_model().to(np.float64)
        model[0].weight.data[...] = np.round(model[0].weight.data * 4) / 4  # exact tied sums
        model[0].bias.data[...] = 0.0
        if pool_first:
            criterion = CrossEntropyLoss()
            loss = criterion(model(x), labels)
            grad_input = model.backward(criterion.backward(), input_grad=True)
        else:
            loss, grad_input = _registration_order_loss_and_grads(model, x, labels)
        results.append((loss, grad_input, [p.grad.copy() for p in model.parameters()]))
    (loss_a, grad_a, params_a), (loss_b, grad_b, params_b) = results
    assert loss_a == loss_b
    np.testing.assert_array_equal(grad_a, grad_b)
    for index, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        if index < 2:  # the fused first convolution's weight and bias
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        else:
            np.testing.assert_array_equal(a, b)
    assert np.count_nonzero(grad_a) > 0


def test_relu_then_avgpool_runs_in_order(rng):
    """Averaging does not commute with ReLU: relu(avg(x)) != avg(relu(x)) when a window mixes
    signs, so only MaxPool2d may be moved before a ReLU."""
    model = Sequential(ReLU(), AvgPool2d(2))
    x = rng.standard_normal((2, 3, 4, 4))
    assert model.execution_order() == list(model)
    np.testing.assert_array_equal(model(x), model[1](model[0](x)))


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_maxpool_propagates_nan_like_torch(torch, rng, grad):
    x = rng.standard_normal((1, 2, 4, 4))
    x[0, 0, 1, 2] = np.nan  # the window whose maximum is elsewhere must still give NaN
    x[0, 0, 0, 3] = 10.0
    x[0, 1, 3, 0] = np.nan
    layer = MaxPool2d(2)
    if grad:
        out = layer(x)
    else:
        with no_grad():
            out = layer(x)
    expected = torch.nn.functional.max_pool2d(torch.from_numpy(x), 2).numpy()
    assert np.isnan(expected).sum() == 2
    np.testing.assert_array_equal(out, expected)  # NaNs in the same places


def test_maxpool_under_no_grad_leaves_its_input_unchanged(rng):
    # The inference path keeps a running maximum: it must start from a copy of the first tap.
    x = rng.standard_normal((2, 3, 6, 6))
    before = x.copy()
    with no_grad():
        MaxPool2d(2)(x)
    np.testing.assert_array_equal(x, before)
