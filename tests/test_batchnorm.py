"""BatchNorm2d against torch.nn.BatchNorm2d in train and eval mode, running statistics,
finite differences, layouts, dtypes and errors."""

import numpy as np
import pytest

from gradcheck import assert_close, check_module_gradients
from scratchcnn.nn import BatchNorm2d, no_grad


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
