"""Module, Parameter and Sequential (scratchcnn.nn.module): registration, traversal order,
state_dict compatibility with torch.nn.Sequential, loading, modes, dtypes, gradients, repr."""

import numpy as np
import pytest

from scratchcnn import nn as scratch_nn
from scratchcnn.nn import (
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    Module,
    Parameter,
    ReLU,
    Sequential,
    is_grad_enabled,
    no_grad,
)


def numpy_model(rng, dtype=np.float32):
    return Sequential(
        Conv2d(1, 4, 3, padding=1, dtype=dtype, rng=rng),
        BatchNorm2d(4, dtype=dtype),
        ReLU(),
        MaxPool2d(2),
        Sequential(Flatten(), Dropout(0.25, rng=rng)),
        Linear(4 * 3 * 3, 5, dtype=dtype, rng=rng),
        Linear(5, 2, bias=False, dtype=dtype, rng=rng),
    )


def torch_model(torch, dtype=None):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, dtype=dtype),
        nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Flatten(), nn.Dropout(0.25)),
        nn.Linear(4 * 3 * 3, 5, dtype=dtype),
        nn.Linear(5, 2, bias=False, dtype=dtype),
    )


class Affine(Module):
    """A hand-written module: y = scale * inner(x) + shift."""

    def __init__(self):
        super().__init__()
        self.scale = Parameter(np.full(3, 2.0))
        self.inner = Linear(3, 3, dtype=np.float64, rng=np.random.default_rng(0))
        self.register_buffer("calls", np.array(0, dtype=np.int64))
        self.shift = Parameter(np.zeros(3))
        self.not_state = np.ones(2)  # a plain attribute: neither parameter nor buffer


def test_registration_order_and_plain_attributes():
    module = Affine()
    assert [name for name, _ in module.named_parameters()] == [
        "scale", "shift", "inner.weight", "inner.bias"
    ]
    assert list(module.state_dict()) == ["scale", "shift", "calls", "inner.weight", "inner.bias"]
    assert [name for name, _ in module.named_modules()] == ["", "inner"]
    assert list(module.children()) == [module.inner]
    module.shift = None  # removes the parameter, as in torch
    assert "shift" not in dict(module.named_parameters())
    with pytest.raises(TypeError, match="'scale'"):
        module.scale = np.zeros(3)


def test_none_or_del_unregisters_as_in_torch(torch):
    # Dropping a head, a layer or a bias: what is gone must not train, run or be saved.
    x = np.ones((1, 2), dtype=np.float32)
    model = Sequential(Linear(2, 3), ReLU(), Linear(3, 5))
    model(x)  # the forward order is cached: removing a child must reset it
    delattr(model, "2")
    assert model(x).shape == (1, 3) and len(model) == 2
    twin = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 5))
    delattr(twin, "2")
    assert list(model.state_dict()) == list(twin.state_dict())

    module = Affine()
    module.inner = None
    assert list(module.state_dict()) == ["scale", "shift", "calls"]
    assert [name for name, _ in module.named_modules()] == [""]
    del module.shift
    del module.calls
    assert [name for name, _ in module.named_parameters()] == ["scale"]
    assert list(module.state_dict()) == ["scale"]
    module.inner = Linear(3, 3)
    with pytest.raises(TypeError, match="child module 'inner'"):
        module.inner = 5  # would hide a child that still trains and is saved
    module.register_buffer("calls", np.zeros(1))
    with pytest.raises(TypeError, match="buffer 'calls'"):
        module.calls = 3


def test_a_module_held_twice_is_visited_once_but_saved_under_both_names(torch):
    shared = Linear(2, 2)
    module, twin = Module(), torch.nn.Module()
    module.first, module.second = shared, shared
    twin.first = twin.second = torch.nn.Linear(2, 2)
    assert [name for name, _ in module.named_modules()] == ["", "first"]
    assert [name for name, _ in module.named_modules(remove_duplicate=False)] == [
        "", "first", "second"]
    assert [name for name, _ in module.named_modules()] == [
        name for name, _ in twin.named_modules()]
    assert list(module.state_dict()) == list(twin.state_dict())
    module.load_state_dict(module.state_dict())


def test_assigning_before_init_is_explained():
    class Broken(Module):
        def __init__(self):
            self.weight = Parameter(np.zeros(1))

    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\)"):
        Broken()


def test_shared_parameter_is_listed_once(torch):
    # Tied weights: two layers, one Parameter (a module itself may appear only once).
    first, second = Linear(2, 2), Linear(2, 2)
    second.weight = first.weight
    model = Sequential(first, ReLU(), second)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.bias"]
    twin = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    twin[2].weight = twin[0].weight
    assert names == [name for name, _ in twin.named_parameters()]


def test_state_dict_keys_order_shapes_and_dtypes_match_torch(torch, rng):
    ours = numpy_model(rng).state_dict()
    theirs = torch_model(torch).state_dict()
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        assert ours[key].shape == tuple(tensor.shape), key
        assert ours[key].dtype == tensor.numpy().dtype, key
    assert [n for n, _ in numpy_model(rng).named_parameters()] == [
        n for n, _ in torch_model(torch).named_parameters()
    ]


def test_state_dict_is_a_copy(rng):
    model = numpy_model(rng)
    state = model.state_dict()
    state["0.weight"][...] = 123.0
    assert not np.any(model[0].weight.data == 123.0)


def test_weights_round_trip_through_torch(torch, rng):
    model = numpy_model(rng, np.float64).eval()
    twin = torch_model(torch, torch.float64).eval()
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    x = rng.standard_normal((2, 1, 6, 6))
    np.testing.assert_allclose(model(x), twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-12)
    # ... and back: torch tensors load directly.
    fresh = numpy_model(np.random.default_rng(99), np.float64).eval()
    fresh.load_state_dict(twin.state_dict())
    np.testing.assert_array_equal(fresh(x), model(x))


def test_load_state_dict_strict_errors_and_non_strict_result(torch, rng):
    model = numpy_model(rng)
    state = model.state_dict()
    del state["1.running_var"]
    state["9.weight"] = np.zeros(1, dtype=np.float32)
    # RuntimeError as torch raises it (a ported `except RuntimeError` catches it).
    with pytest.raises(RuntimeError, match=r"missing keys \['1.running_var'\].*\['9.weight'\]"):
        model.load_state_dict(state)
    before = model.state_dict()
    state["0.weight"] = state["0.weight"] + 1
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["1.running_var"] and result.unexpected_keys == ["9.weight"]
    np.testing.assert_array_equal(model[0].weight.data, before["0.weight"] + 1)
    np.testing.assert_array_equal(model[1].running_var, before["1.running_var"])
    # torch reports the same keys for the same mismatch.
    twin_result = torch_model(torch).load_state_dict(
        {k: torch.from_numpy(v) for k, v in state.items()}, strict=False
    )
    assert twin_result.missing_keys == result.missing_keys
    assert twin_result.unexpected_keys == result.unexpected_keys


def test_load_state_dict_bad_shape_or_dtype_changes_nothing(rng):
    model = numpy_model(rng)
    before = model.state_dict()
    state = model.state_dict()
    state["0.weight"] = state["0.weight"] + 1  # valid, listed before the bad entry
    state["5.weight"] = np.zeros((5, 99), dtype=np.float32)
    with pytest.raises(ValueError, match=r"'5.weight' has shape \(5, 99\).*\(5, 36\)"):
        model.load_state_dict(state)
    state["5.weight"] = before["5.weight"]
    state["1.num_batches_tracked"] = np.array(1.5)
    with pytest.raises(ValueError, match=r"num_batches_tracked.*float64.*int64"):
        model.load_state_dict(state)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_train_and_eval_reach_every_submodule(rng):
    model = numpy_model(rng)
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    x = rng.standard_normal((3, 1, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(model(x), model(x))  # no dropout, fixed statistics
    model.train()
    assert all(m.training for m in model.modules())
    assert not np.array_equal(model(x), model(x))  # fresh dropout masks


def test_to_float64_casts_parameters_grads_and_float_buffers(rng):
    model = numpy_model(rng)
    x = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    model.backward(np.ones_like(model(x)))
    assert model.to(np.float64) is model
    for name, param in model.named_parameters():
        assert param.dtype == np.float64 and param.grad.dtype == np.float64, name
    buffers = dict(model.named_buffers())
    assert buffers["1.running_mean"].dtype == np.float64
    assert buffers["1.num_batches_tracked"].dtype == np.int64
    assert model(x.astype(np.float64)).dtype == np.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        model.to(np.int32)
    model.float()
    assert all(p.dtype == np.float32 for p in model.parameters())


def test_zero_grad_to_none_or_to_zero(rng):
    model = numpy_model(rng)
    x = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    model.backward(np.ones_like(model(x)))
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and np.any(g != 0) for g in grads)
    model.zero_grad(set_to_none=False)
    assert all(p.grad is g and not np.any(g) for p, g in zip(model.parameters(), grads,
                                                              strict=True))
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_repr_matches_torch(torch, rng):
    assert repr(numpy_model(rng)) == repr(torch_model(torch))


def test_sequential_chains_forward_and_backward_and_indexes(rng):
    first, second = Linear(3, 4, dtype=np.float64, rng=rng), Linear(4, 2, dtype=np.float64, rng=rng)
    model = Sequential(first, ReLU())
    model.append(second)
    assert len(model) == 3 and list(model) == [first, model[1], second] and model[-1] is second
    assert isinstance(model[1:], Sequential) and list(model[1:]) == list(model)[1:]
    x, upstream = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    hidden = np.maximum(x @ first.weight.data.T + first.bias.data, 0)
    np.testing.assert_allclose(model(x), hidden @ second.weight.data.T + second.bias.data)
    grad_x = model.backward(upstream, input_grad=True)
    np.testing.assert_allclose(grad_x, ((upstream @ second.weight.data) * (hidden > 0))
                               @ first.weight.data)
    named = Sequential({"encoder": Linear(2, 2), "act": ReLU()})
    assert list(named.state_dict()) == ["encoder.weight", "encoder.bias"]
    with pytest.raises(TypeError, match="Sequential takes Modules"):
        Sequential(Linear(2, 2), np.zeros(2))


def test_parameter_contract():
    with pytest.raises(TypeError, match="float32 or float64"):
        Parameter(np.zeros(3, dtype=np.int64))
    param = Parameter(np.zeros((2, 3), dtype=np.float32).T)  # stored C-contiguous
    assert param.data.flags.c_contiguous and param.shape == (3, 2) and param.size == 6
    grad = np.ones((3, 2), dtype=np.float32)
    param.accumulate_grad(grad)
    grad[...] = 5  # the stored gradient is a copy, not an alias
    param.accumulate_grad(np.ones((3, 2), dtype=np.float32))
    np.testing.assert_array_equal(param.grad, 2)
    with pytest.raises(RuntimeError, match="does not match"):
        param.accumulate_grad(np.ones((3, 2)))  # float64 into float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_gradient_product_lands_in_the_buffer_with_the_bits_of_the_product(rng, dtype):
    a = rng.standard_normal((40, 5)).astype(dtype).T  # transposed, as Linear passes gradᵀ
    b = rng.standard_normal((40, 300)).astype(dtype)
    param = Parameter(np.zeros((5, 300), dtype=dtype))
    vector = np.zeros(param.size + 1, dtype=dtype)
    param.grad_buffer = vector[1:].reshape(param.shape)  # unaligned, like flattened parameters
    param.accumulate_grad_product(a, b)
    assert param.grad is param.grad_buffer
    np.testing.assert_array_equal(param.grad, a @ b)
    param.accumulate_grad_product(a, b)  # a second one adds, as accumulate_grad does
    np.testing.assert_array_equal(vector[1:], (a @ b + a @ b).ravel())
    assert vector[0] == 0

    unbuffered = Parameter(np.zeros((5, 300), dtype=dtype))
    unbuffered.accumulate_grad_product(a, b)
    np.testing.assert_array_equal(unbuffered.grad, a @ b)
    with pytest.raises(RuntimeError, match="does not match"):
        param.accumulate_grad_product(b.T, a.T)  # (300, 5): a backward's bug, not a new shape


def test_no_grad_nests_and_restores_after_errors():
    assert is_grad_enabled()
    with pytest.raises(KeyError), no_grad():
        assert not is_grad_enabled()
        raise KeyError("boom")
    assert is_grad_enabled()
    with no_grad():
        with no_grad():
            pass
        assert not is_grad_enabled()
    assert is_grad_enabled()


def test_no_grad_decorates_with_or_without_parentheses():
    def grad_mode():
        return is_grad_enabled()

    assert no_grad()(grad_mode)() is False and no_grad(grad_mode)() is False
    assert no_grad(grad_mode).__name__ == "grad_mode"
    assert is_grad_enabled()  # decorating changes nothing until the call


def test_scalar_parameter_keeps_its_0d_shape():
    from scratchcnn.nn import Parameter

    param = Parameter(np.array(2.0))
    assert param.shape == ()
    param.accumulate_grad(np.array(0.5))
    assert param.grad.shape == () and param.grad == 0.5


def test_vector_views_cut_a_vector_into_consecutive_arrays_that_write_through():
    from scratchcnn.nn.module import vector_views

    vector = np.arange(11.0)
    first, scalar, last = vector_views(vector, [(2, 3), (), (4,)])
    assert (first.shape, scalar.shape, last.shape) == ((2, 3), (), (4,))
    np.testing.assert_array_equal(first, [[0, 1, 2], [3, 4, 5]])
    assert scalar == 6
    np.testing.assert_array_equal(last, [7, 8, 9, 10])
    last[0] = -1.0
    assert vector[7] == -1.0


def test_a_state_dict_without_num_batches_tracked_loads_as_in_torch(torch, rng):
    model, twin = numpy_model(rng), torch_model(torch)
    model.train()(np.ones((2, 1, 6, 6), dtype=np.float32))  # the count is now 1
    state = {key: value for key, value in numpy_model(rng).state_dict().items()
             if not key.endswith("num_batches_tracked")}
    result = model.load_state_dict(state)
    assert result.missing_keys == [] and model[1].num_batches_tracked == 1  # left as it was
    assert twin.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}) == result
    del state["1.running_var"]  # any other missing buffer is still a mismatch
    with pytest.raises(RuntimeError, match=r"missing keys \['1.running_var'\]"):
        model.load_state_dict(state)


def test_load_state_dict_unexpected_key_alone(rng):
    model = numpy_model(rng)
    state = {**model.state_dict(), "extra": np.zeros(1, dtype=np.float32)}
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        model.load_state_dict(state)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["extra"]


def test_state_dict_copies_buffers(rng):
    bn = BatchNorm2d(2, dtype=np.float64)
    state = bn.state_dict()
    bn(rng.standard_normal((3, 2, 2, 2)) + 5)  # a training forward updates running_mean
    assert np.any(bn.running_mean != 0)
    np.testing.assert_array_equal(state["running_mean"], np.zeros(2))


def test_load_state_dict_fills_buffers_in_place(rng):
    bn = BatchNorm2d(2, dtype=np.float64)
    held = bn.running_mean
    bn.load_state_dict({**bn.state_dict(), "running_mean": np.array([1.5, -2.0])})
    assert bn.running_mean is held
    np.testing.assert_array_equal(held, [1.5, -2.0])


def test_to_takes_a_device_then_a_dtype(rng):
    model = Linear(3, 2, rng=rng)
    assert model.to(None, np.float64) is model
    assert all(p.dtype == np.float64 for p in model.parameters())


# -- torch.nn API a ported loop reaches for: apply, add_module, get_submodule, recurse, ... ----

def _error(call):
    """(type name, message) of what ``call()`` raises, to compare with torch's."""
    try:
        call()
    except Exception as error:
        return type(error), str(error)
    raise AssertionError("no error raised")


def test_apply_visits_children_first_then_self_as_torch(torch, rng):
    def visits(model):
        names = {id(module): name for name, module in model.named_modules()}
        seen = []
        assert model.apply(lambda module: seen.append(names[id(module)])) is model
        return seen

    ours, theirs = numpy_model(rng), torch_model(torch)
    assert visits(ours) == visits(theirs) == ["0", "1", "2", "3", "4.0", "4.1", "4", "5", "6", ""]
    shared, module, twin = Linear(2, 2), Module(), torch.nn.Module()
    module.first = module.second = shared  # a child held twice is visited once, as in torch
    twin.first = twin.second = torch.nn.Linear(2, 2)
    assert visits(module) == visits(twin) == ["first", ""]

    def init_weights(layer):
        if isinstance(layer, Linear):
            layer.weight.data[...] = 1.0

    ours.apply(init_weights)
    assert np.all(ours[5].weight.data == 1) and np.all(ours[6].weight.data == 1)


def test_add_module_and_register_module_as_torch(torch):
    ours, theirs = Affine(), torch.nn.Module()
    theirs.scale = torch.nn.Parameter(torch.ones(3))
    for model, nn in ((ours, None), (theirs, torch.nn)):
        make = (lambda: Linear(2, 2)) if nn is None else (lambda: torch.nn.Linear(2, 2))
        model.add_module("head", make())
        model.register_module("tail", make())
    assert [n for n, _ in ours.named_parameters()][-4:] == [
        n for n, _ in theirs.named_parameters()][-4:] == [
        "head.weight", "head.bias", "tail.weight", "tail.bias"]
    assert isinstance(ours.get_submodule("head"), Linear)
    for model in (ours, theirs):
        model.add_module("head", None)  # removes the child, as in torch
    assert "head.weight" not in ours.state_dict()
    assert [n for n, _ in ours.named_modules()] == ["", "inner", "tail"]
    bad = [(1, "x"), ("a.b", "x"), ("", "x"), ("scale", "x"), ("training", "x"), ("ok", 5)]
    for name, module in bad:
        errors = []
        for model, layer in ((ours, Linear(2, 2)), (theirs, torch.nn.Linear(2, 2))):
            value = layer if module == "x" else module
            errors.append(_error(lambda m=model, n=name, v=value: m.add_module(n, v)))
        assert errors[0][0] is errors[1][0], (name, errors)
        # The same words as torch's but for torch's module name, and torch's typename in one.
        assert errors[0][1] == errors[1][1] or name == "ok", (name, errors)


def test_sequential_refuses_a_name_torch_refuses_and_a_module_twice_via_add_module(torch):
    from collections import OrderedDict

    for build, layer in ((Sequential, Linear), (torch.nn.Sequential, torch.nn.Linear)):
        with pytest.raises(KeyError, match="attribute 'forward' already exists"):
            build(OrderedDict(forward=layer(2, 2)))
    model = Sequential(Linear(2, 2))
    with pytest.raises(ValueError, match="appears twice"):
        model.add_module("again", model[0])


def test_get_submodule_as_torch(torch, rng):
    ours, theirs = numpy_model(rng), torch_model(torch)
    assert ours.get_submodule("") is ours
    assert ours.get_submodule("4.1") is ours[4][1] and ours.get_submodule("5") is ours[5]
    for target in ("9", "4.2", "4.0.x", "5.weight", "0.weight.data", "4..1"):
        ours_error = _error(lambda t=target: ours.get_submodule(t))
        assert ours_error == _error(lambda t=target: theirs.get_submodule(t)), target
        assert ours_error[0] is AttributeError


def test_parameters_and_buffers_recurse_prefix_and_duplicates_as_torch(torch, rng):
    ours, theirs = numpy_model(rng), torch_model(torch)
    for model in (ours, theirs):
        model[6].weight = model[5].weight  # tied (a 5x... weight: shapes do not matter here)
        model[4].register_buffer("shared", model[1].running_mean)

    def names(pairs):
        return [name for name, _ in pairs]

    for kwargs in ({}, {"prefix": "net"}, {"remove_duplicate": False},
                   {"prefix": "net", "recurse": False}):
        assert names(ours.named_parameters(**kwargs)) == names(theirs.named_parameters(**kwargs))
        assert names(ours.named_buffers(**kwargs)) == names(theirs.named_buffers(**kwargs))
        assert names(ours[1].named_parameters(**kwargs)) == names(
            theirs[1].named_parameters(**kwargs))
        assert names(ours[1].named_buffers(**kwargs)) == names(theirs[1].named_buffers(**kwargs))
    assert len(list(ours.named_parameters(remove_duplicate=False))) == 7
    assert list(ours.parameters(recurse=False)) == [] and list(ours.buffers(recurse=False)) == []
    assert list(ours[0].parameters(recurse=False)) == [ours[0].weight, ours[0].bias]
    assert [b is ours[1].running_mean for b in ours.buffers()] == [True, False, False]
    assert len(list(ours.buffers())) == len(list(theirs.buffers())) == 3


def test_state_dict_prefix_destination_and_keep_vars(torch, rng):
    from collections import OrderedDict

    ours, theirs = numpy_model(rng), torch_model(torch)
    assert list(ours.state_dict(prefix="model.")) == list(theirs.state_dict(prefix="model."))
    target = OrderedDict(first=np.zeros(1))
    assert ours.state_dict(destination=target, prefix="m.") is target
    assert list(target) == ["first", *("m." + key for key in ours.state_dict())]
    kept = ours.state_dict(keep_vars=True)
    assert list(kept) == list(theirs.state_dict(keep_vars=True))
    assert kept["0.weight"] is ours[0].weight and kept["1.running_mean"] is ours[1].running_mean
    assert isinstance(theirs.state_dict(keep_vars=True)["0.weight"], torch.nn.Parameter)
    copied = ours.state_dict()
    assert copied["0.weight"] is not ours[0].weight.data  # the default stays a snapshot
    fresh = numpy_model(np.random.default_rng(7))
    fresh.load_state_dict(kept)  # Parameters load as their values
    np.testing.assert_array_equal(fresh[0].weight.data, ours[0].weight.data)
    assert fresh[0].weight.data is not ours[0].weight.data


def test_non_persistent_buffers_stay_out_of_state_dict_as_in_torch(torch):
    ours, theirs = Affine(), torch.nn.Linear(3, 3)
    ours.register_buffer("mask", np.ones(3), persistent=False)
    theirs.register_buffer("mask", torch.ones(3), persistent=False)
    theirs.register_buffer("calls", torch.zeros(()))
    assert list(ours.state_dict()) == ["scale", "shift", "calls", "inner.weight", "inner.bias"]
    assert list(theirs.state_dict()) == ["weight", "bias", "calls"]
    assert [n for n, _ in ours.named_buffers()] == ["calls", "mask"]  # still a buffer
    assert [n for n, _ in theirs.named_buffers()] == ["mask", "calls"]
    result = ours.load_state_dict(ours.state_dict())  # not expected ...
    assert result.missing_keys == [] == theirs.load_state_dict(theirs.state_dict()).missing_keys
    state = {**ours.state_dict(), "mask": np.zeros(3)}
    assert ours.load_state_dict(state, strict=False).unexpected_keys == ["mask"]  # ... not taken
    assert theirs.load_state_dict({**theirs.state_dict(), "mask": torch.zeros(3)},
                                  strict=False).unexpected_keys == ["mask"]
    assert np.all(ours.mask == 1)
    ours.to(np.float32)
    assert ours.mask.dtype == np.float32 and "mask" not in ours.state_dict()  # stays out
    ours.mask = np.zeros(3)  # assigning keeps the flag, as in torch
    assert "mask" not in ours.state_dict() and dict(ours.named_buffers())["mask"] is ours.mask
    ours.register_buffer("mask", np.ones(3))  # persistent=True by default: saved again
    assert list(ours.state_dict())[3] == "mask"
    ours.register_buffer("mask", np.ones(3), persistent=False)
    del ours.mask  # forgets the flag too, as torch's
    theirs.register_buffer("mask", torch.ones(3), persistent=False)
    del theirs.mask
    assert ours._non_persistent_buffers_set == theirs._non_persistent_buffers_set == set()
    ours.register_buffer("mask", np.ones(2))  # a new buffer of the name is persistent
    assert "mask" in ours.state_dict()


def _mutations(nn, layers):
    """The same edits on a scratchcnn or a torch Sequential; the keys after each."""
    model = nn.Sequential(*layers)
    keys = []
    del model[1]
    keys.append(list(model.state_dict()))
    del model[-3:-1]
    keys.append(list(model._modules))
    model.insert(0, nn.ReLU())
    model.insert(-1, nn.Flatten())
    model.insert(len(model), nn.ReLU())
    keys.append(list(model._modules))
    popped = model.pop(-1)
    keys.append((type(popped).__name__, list(model._modules)))
    model.extend([nn.ReLU(), nn.Flatten()])
    model[-1] = nn.ReLU()
    keys.append([type(layer).__name__ for layer in model])
    return keys


def test_sequential_mutators_give_torch_keys(torch):
    def layers(nn):
        return [nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Flatten(), nn.ReLU()]

    assert _mutations(scratch_nn, layers(scratch_nn)) == _mutations(torch.nn, layers(torch.nn))
    from collections import OrderedDict

    for nn in (scratch_nn, torch.nn):
        named = nn.Sequential(OrderedDict(a=nn.Linear(2, 2), b=nn.ReLU(), c=nn.Linear(2, 2)))
        del named[0:1]  # torch names what is left by number
        assert list(named.state_dict()) == ["1.weight", "1.bias"] and not hasattr(named, "c")
        assert list(named[0:][1:].state_dict()) == ["1.weight", "1.bias"]
    for index in (3, -4):
        assert _error(lambda i=index: Sequential(ReLU())[i])[0] is IndexError
        assert _error(lambda i=index: Sequential(ReLU()).__delitem__(i)) == _error(
            lambda i=index: torch.nn.Sequential(torch.nn.ReLU()).__delitem__(i))
        assert _error(lambda i=index: Sequential(ReLU()).insert(i, ReLU())) == _error(
            lambda i=index: torch.nn.Sequential(torch.nn.ReLU()).insert(i, torch.nn.ReLU()))
    with pytest.raises(AssertionError):  # torch's type for insert; TypeError as elsewhere too
        Sequential().insert(0, np.zeros(1))
    with pytest.raises(TypeError, match="not a Module subclass"):
        Sequential().extend([ReLU(), 5])


def test_sequential_mutators_keep_each_module_once_and_change_nothing_when_refused():
    from collections import OrderedDict

    first, relu = Linear(2, 2), ReLU()
    model = Sequential(first, relu, Sequential(Flatten()))
    inner = model[2][0]
    with pytest.raises(ValueError, match="appears twice"):
        model.insert(0, first)
    with pytest.raises(ValueError, match="appears twice"):
        model[0] = inner  # held inside another child
    model[0] = first  # replacing a child with itself is fine
    with pytest.raises(ValueError, match="appears twice"):
        model.extend([ReLU(), relu])
    with pytest.raises(TypeError, match="del model"):
        model[1] = None
    assert list(model) == [first, relu, model[2]] and list(model._modules) == ["0", "1", "2"]
    named = Sequential(OrderedDict(a=Linear(2, 2), b=ReLU()))
    with pytest.raises(KeyError, match="named '0' to '1'"):
        named.insert(0, ReLU())  # torch fails half-way through renaming here
    assert list(named._modules) == ["a", "b"]
    assert list(named.insert(2, ReLU())._modules) == ["a", "b", "2"]  # as torch: an append


def test_a_mutated_sequential_runs_its_new_order(torch, rng):
    # Each forward first, so the execution order (ReLU/MaxPool2d swap, fused first Conv2d) is
    # cached; the forward after each edit must run the edited model, as the torch twin does.
    nn = scratch_nn

    def build(nn, **kw):
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, **kw), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(2 * 3 * 3, 3, **kw))

    ours, theirs = build(nn, dtype=np.float64, rng=rng), build(torch.nn, dtype=torch.float64)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    x = rng.standard_normal((2, 1, 6, 6))
    extra = Linear(3, 3, dtype=np.float64, rng=rng)
    twin_extra = torch.nn.Linear(3, 3, dtype=torch.float64)
    twin_extra.load_state_dict({k: torch.from_numpy(v) for k, v in extra.state_dict().items()})
    edits = [  # each keeps the shapes valid; the first and the second move the Conv2d
        (lambda m: m.insert(0, nn.MaxPool2d(1)), lambda t: t.insert(0, torch.nn.MaxPool2d(1))),
        (lambda m: m.__delitem__(0), lambda t: t.__delitem__(0)),
        (lambda m: m.__delitem__(1), lambda t: t.__delitem__(1)),  # the ReLU before the pool
        (lambda m: m.insert(2, nn.ReLU()), lambda t: t.insert(2, torch.nn.ReLU())),
        (lambda m: m.__setitem__(2, nn.Flatten()), lambda t: t.__setitem__(2, torch.nn.Flatten())),
        (lambda m: m.extend([nn.ReLU(), extra]),
         lambda t: t.extend([torch.nn.ReLU(), twin_extra])),
        (lambda m: m.pop(-2), lambda t: t.pop(-2)),
    ]
    for edit, twin_edit in edits:
        ours(x), theirs(torch.from_numpy(x))
        edit(ours), twin_edit(theirs)
        ours.zero_grad(), theirs.zero_grad()
        logits, twin_logits = ours(x), theirs(torch.from_numpy(x))
        np.testing.assert_allclose(logits, twin_logits.detach().numpy(), rtol=1e-12, atol=1e-14)
        ours.backward(np.ones_like(logits))
        twin_logits.sum().backward()
        grads = {name: torch.from_numpy(param.grad) for name, param in ours.named_parameters()}
        assert list(grads) == [name for name, _ in theirs.named_parameters()]
        for name, param in theirs.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-12, atol=1e-14)
