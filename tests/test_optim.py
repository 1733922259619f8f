"""scratchcnn.optim against torch.optim: multi-step float64 trajectories, param groups,
zero_grad, state_dict round trips (ours and PyTorch's), validation and dtype preservation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradcheck import assert_close
from scratchcnn import nn
from scratchcnn.nn.module import Parameter, flatten_parameters
from scratchcnn.optim import SGD, Adam, AdamW, Optimizer

SHAPES = [(3, 4), (5,), (2, 3, 2, 2), (1,)]  # not (): Parameter makes 0-d arrays 1-d
STEPS = 25

SGD_CONFIGS = [
    {"lr": 0.1},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    {"lr": 0.1, "weight_decay": 0.1},
    {"lr": 0.05, "maximize": True},
    {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.1, "maximize": True},
    {"lr": 0.02, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.05, "maximize": True},
    {"lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 0.2, "maximize": True},
]
ADAM_CONFIGS = [
    {},
    {"lr": 0.05, "amsgrad": True},
    {"lr": 0.05, "weight_decay": 0.1},
    {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True, "maximize": True},
    {"lr": 0.02, "betas": (0.3, 0.6), "eps": 1e-3},  # 1 - beta1 > 0.5: lerp's other branch
    {"lr": 0.01, "betas": (0.0, 0.9), "maximize": True},
]
ADAMW_CONFIGS = [
    {},
    {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True},
    {"lr": 0.05, "weight_decay": 0.3, "maximize": True},
    {"lr": 0.02, "betas": (0.3, 0.6), "weight_decay": 0.0},
]
CASES = (
    [("SGD", c) for c in SGD_CONFIGS]
    + [("Adam", c) for c in ADAM_CONFIGS]
    + [("AdamW", c) for c in ADAMW_CONFIGS]
)
OURS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}


class Problem:
    """A random separable quadratic, loss = sum(c·θ²)/2 - b·θ, plus fresh noise each step, so
    gradients depend on the trajectory: g = c·θ - b + noise (derived by hand)."""

    def __init__(self, rng: np.random.Generator, shapes=SHAPES) -> None:
        self.shapes = shapes
        self.initial = [rng.standard_normal(s) for s in shapes]
        self.curvature = [rng.uniform(0.5, 2.0, s) for s in shapes]
        self.target = [rng.standard_normal(s) for s in shapes]

    def gradients(self, values, rng: np.random.Generator):
        return [
            c * v - b + 0.3 * rng.standard_normal(np.shape(v))
            for c, v, b in zip(self.curvature, values, self.target, strict=True)
        ]


def make_pair(torch, problem: Problem, dtype=np.float64):
    ours = [Parameter(a.astype(dtype)) for a in problem.initial]
    theirs = [torch.nn.Parameter(torch.tensor(a.astype(dtype))) for a in problem.initial]
    return ours, theirs


def torch_optimizer(torch, name: str, params, **config):
    return getattr(torch.optim, name)(params, foreach=False, **config)


def assert_params_close(ours, theirs, tol, what):
    for i, (p, tp) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(p.data, tp.detach().numpy(), tol, f"{what}, param {i}")


def run_steps(torch, opt, topt, ours, theirs, problem, rng, steps, tol=1e-10, skip_every=3):
    """Step both optimizers; parameter 1 has no gradient on every ``skip_every``-th step (it
    must be skipped, and its Adam step counter must not advance)."""
    for step in range(steps):
        # Each side differentiates at its own parameters; the noise is shared.
        noise_state = rng.bit_generator.state
        grads = problem.gradients([p.data.astype(np.float64) for p in ours], rng)
        rng.bit_generator.state = noise_state
        their_grads = problem.gradients([tp.detach().numpy().astype(np.float64)
                                         for tp in theirs], rng)
        skip = (1,) if step % skip_every == 1 else ()
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.astype(p.dtype)
        for i, (p, tp, g) in enumerate(zip(ours, theirs, their_grads, strict=True)):
            tp.grad = torch.tensor(g.astype(p.dtype))
            if i in skip:
                p.grad = None
                tp.grad = None
        opt.step()
        topt.step()
        assert_params_close(ours, theirs, tol, f"step {step}")


@pytest.mark.parametrize(("name", "config"), CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_trajectory_matches_torch(torch, rng, name, config):
    problem = Problem(rng)
    ours, theirs = make_pair(torch, problem)
    opt = OURS[name](ours, **config)
    topt = torch_optimizer(torch, name, theirs, **config)
    before = [p.data.copy() for p in ours]
    run_steps(torch, opt, topt, ours, theirs, problem, rng, STEPS)
    # The test is only meaningful if the parameters actually moved.
    assert all(not np.allclose(b, p.data) for b, p in zip(before, ours, strict=True))


def test_adam_step_counter_is_per_parameter(torch, rng):
    problem = Problem(rng)
    ours, theirs = make_pair(torch, problem)
    opt, topt = Adam(ours, lr=0.1), torch_optimizer(torch, "Adam", theirs, lr=0.1)
    run_steps(torch, opt, topt, ours, theirs, problem, rng, 9, skip_every=3)
    assert opt.state[ours[0]]["step"] == 9
    assert opt.state[ours[1]]["step"] == 6  # skipped on steps 1, 4, 7


def test_param_groups_with_different_options(torch, rng):
    problem = Problem(rng)
    ours, theirs = make_pair(torch, problem)

    def groups(params):
        return [
            {"params": params[:2], "lr": 0.2},
            {"params": params[2:3], "momentum": 0.9, "nesterov": True},
            {"params": params[3:], "weight_decay": 0.5, "maximize": True},
        ]

    opt = SGD(groups(ours), lr=0.01, momentum=0.5)
    topt = torch_optimizer(torch, "SGD", groups(theirs), lr=0.01, momentum=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.01, 0.01]
    run_steps(torch, opt, topt, ours, theirs, problem, rng, 20)

    ours, theirs = make_pair(torch, problem)
    adam_groups = [{"params": ours[:1], "lr": 0.3, "amsgrad": True}, {"params": ours[1:]}]
    torch_groups = [{"params": theirs[:1], "lr": 0.3, "amsgrad": True}, {"params": theirs[1:]}]
    opt = AdamW(adam_groups, lr=0.01, weight_decay=0.2)
    topt = torch_optimizer(torch, "AdamW", torch_groups, lr=0.01, weight_decay=0.2)
    run_steps(torch, opt, topt, ours, theirs, problem, rng, 20)


def test_state_is_keyed_by_parameter_object(rng):
    a, b = Parameter(np.ones(3)), Parameter(np.ones(3))  # same shape and values, like two layers
    opt = SGD([a, b], lr=0.1, momentum=0.9)
    a.grad, b.grad = np.full(3, 1.0), np.full(3, -2.0)
    opt.step()
    assert set(opt.state) == {a, b}
    np.testing.assert_array_equal(opt.state[a]["momentum_buffer"], np.full(3, 1.0))
    np.testing.assert_array_equal(opt.state[b]["momentum_buffer"], np.full(3, -2.0))


def test_zero_grad_semantics(torch, rng):
    params = [Parameter(rng.standard_normal(s)) for s in SHAPES]
    opt = Adam(params, lr=0.1)
    for p in params:
        p.grad = rng.standard_normal(p.shape)
    opt.step()
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(params, grads, strict=True):
        assert p.grad is g and not np.any(g)  # zeroed in place, same array

    # Zero gradients are not skipped: Adam's momentum still moves the parameters, as in torch.
    values = [p.data.copy() for p in params]
    opt.step()
    assert all(opt.state[p]["step"] == 2 for p in params)
    assert not np.allclose(values[0], params[0].data)

    opt.zero_grad()  # set_to_none=True by default
    assert all(p.grad is None for p in params)
    values = [p.data.copy() for p in params]
    opt.step()  # nothing has a gradient: nothing changes, no state advances
    for v, p in zip(values, params, strict=True):
        np.testing.assert_array_equal(v, p.data)
    assert all(opt.state[p]["step"] == 2 for p in params)


def test_sgd_without_momentum_keeps_no_state_and_never_writes_grad(rng):
    param = Parameter(rng.standard_normal((4, 3)))
    grad = rng.standard_normal((4, 3))
    param.grad = grad.copy()
    opt = SGD([param], lr=0.5, weight_decay=0.1, maximize=True)
    expected = param.data - 0.5 * (-grad + 0.1 * param.data)
    opt.step()
    np.testing.assert_allclose(param.data, expected, rtol=1e-14)
    np.testing.assert_array_equal(param.grad, grad)
    assert opt.state_dict()["state"] == {}


def test_updates_are_in_place_so_parameters_may_view_one_flat_vector(rng):
    flat = rng.standard_normal(12 + 5)
    a = Parameter(flat[:12].reshape(3, 4))
    b = Parameter(flat[12:])
    assert np.shares_memory(a.data, flat) and np.shares_memory(b.data, flat)
    for make in (lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
                 lambda ps: AdamW(ps, lr=0.1, amsgrad=True)):
        opt = make([a, b])
        arrays = (a.data, b.data)
        for _ in range(3):
            a.grad, b.grad = rng.standard_normal(a.shape), rng.standard_normal(b.shape)
            opt.step()
        assert a.data is arrays[0] and b.data is arrays[1]
        np.testing.assert_array_equal(flat, np.concatenate([a.data.ravel(), b.data]))


def save_and_load(state_dict, directory):
    """What a checkpoint does: arrays to .npz, everything else to JSON (no pickle)."""
    arrays, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for index, entries in state_dict["state"].items():
        meta["state"][index] = {}
        for key, value in entries.items():
            if isinstance(value, np.ndarray):
                arrays[f"{index}.{key}"] = value
                meta["state"][index][key] = None
            else:
                meta["state"][index][key] = value
    np.savez(directory / "optim.npz", **arrays)
    (directory / "optim.json").write_text(json.dumps(meta))
    meta = json.loads((directory / "optim.json").read_text())
    with np.load(directory / "optim.npz", allow_pickle=False) as saved:
        for index, entries in meta["state"].items():
            for key, value in entries.items():
                if value is None:
                    entries[key] = saved[f"{index}.{key}"]
    return meta


@pytest.mark.parametrize(
    ("name", "config"),
    [("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}),
     ("Adam", {"lr": 0.05, "amsgrad": True, "betas": (0.8, 0.99)}),
     ("AdamW", {"lr": 0.05, "weight_decay": 0.1})],
)
def test_state_dict_round_trip_mid_trajectory(rng, tmp_path, name, config):
    problem = Problem(rng)
    params = [Parameter(a.copy()) for a in problem.initial]
    opt = OURS[name](
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], **config
    )
    grads = [problem.gradients(problem.initial, rng) for _ in range(20)]

    def step(optimizer, params, g):
        for p, gi in zip(params, g, strict=True):
            p.grad = gi.copy()
        optimizer.step()

    for g in grads[:10]:
        step(opt, params, g)
    saved = opt.state_dict()
    loaded = save_and_load(saved, tmp_path)

    resumed_params = [Parameter(p.data.copy()) for p in params]
    resumed = OURS[name]([{"params": resumed_params[:2]}, {"params": resumed_params[2:]}])
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[1]["lr"] == 0.01
    assert resumed.param_groups[0]["betas" if name != "SGD" else "momentum"] == (
        opt.param_groups[0]["betas" if name != "SGD" else "momentum"])
    for g in grads[10:]:
        step(opt, params, g)
        step(resumed, resumed_params, g)
    for p, q in zip(params, resumed_params, strict=True):
        np.testing.assert_array_equal(p.data, q.data)
    # The saved state_dict is a snapshot: later steps did not change it.
    first = saved["state"][0]
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    assert not np.array_equal(first[key], opt.state[params[0]][key])


@pytest.mark.parametrize(("name", "config"), [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("Adam", {"lr": 0.05, "amsgrad": True}),
    ("AdamW", {"lr": 0.05, "weight_decay": 0.5}),
])
def test_loads_torch_state_dict_and_continues_like_torch(torch, rng, name, config):
    problem = Problem(rng)
    ours, theirs = make_pair(torch, problem)
    topt = torch_optimizer(torch, name, theirs, **config)
    for _ in range(8):
        for tp, g in zip(theirs, problem.gradients([t.detach().numpy() for t in theirs], rng),
                         strict=True):
            tp.grad = torch.tensor(g)
        topt.step()
    torch_state = topt.state_dict()
    converted = {
        "param_groups": torch_state["param_groups"],
        "state": {i: {k: np.asarray(v) for k, v in entries.items()}
                  for i, entries in torch_state["state"].items()},
    }
    for p, tp in zip(ours, theirs, strict=True):
        p.data[...] = tp.detach().numpy()
    opt = OURS[name](ours)  # defaults differ from config: the loaded groups must restore them
    opt.load_state_dict(converted)
    assert opt.param_groups[0]["lr"] == config["lr"]
    assert "foreach" not in opt.param_groups[0]  # PyTorch's kernel switches are not copied
    run_steps(torch, opt, topt, ours, theirs, problem, rng, 10)


@pytest.mark.parametrize(("torch_name", "torch_config", "ours"), [
    ("Adam", {"decoupled_weight_decay": True}, "Adam"),  # torch's other spelling of AdamW
    ("AdamW", {}, "Adam"),
    ("Adam", {}, "AdamW"),
])
def test_refuses_a_torch_state_with_another_weight_decay_rule(torch, rng, torch_name,
                                                              torch_config, ours):
    problem = Problem(rng)
    params, theirs = make_pair(torch, problem)
    topt = torch_optimizer(torch, torch_name, theirs, lr=0.1, weight_decay=0.5, **torch_config)
    state = topt.state_dict()
    opt = OURS[ours](params, lr=0.3)
    # Loading it would carry on with the other rule (decay through the moments or directly).
    with pytest.raises(ValueError, match=r"decoupled_weight_decay=.*load it into Adam"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.3


def test_load_state_dict_rejects_mismatched_structures(rng):
    params = [Parameter(rng.standard_normal(s)) for s in [(3, 4), (5,)]]
    opt = Adam(params, lr=0.1)
    for p in params:
        p.grad = rng.standard_normal(p.shape)
    opt.step()
    good = opt.state_dict()
    before = {k: v.copy() for k, v in opt.state[params[0]].items() if isinstance(v, np.ndarray)}

    def variant(**changes):
        bad = {"state": {i: dict(e) for i, e in good["state"].items()},
               "param_groups": [dict(g) for g in good["param_groups"]]}
        for fn in changes.values():
            fn(bad)
        return bad

    cases = {
        "parameter groups": variant(x=lambda d: d["param_groups"].append(
            {**d["param_groups"][0], "params": [2]})),
        "has 1 parameters": variant(x=lambda d: d["param_groups"][0].update(params=[0])),
        r"has shape \(4, 3\)": variant(x=lambda d: d["state"][0].update(
            exp_avg=np.zeros((4, 3)))),
        "no parameter group lists": variant(x=lambda d: d["state"].update({7: d["state"][0]})),
        "unknown state 'momentum_buffer'": variant(x=lambda d: d["state"][1].update(
            momentum_buffer=np.zeros(5))),
        "lacks": variant(x=lambda d: d["state"][1].pop("exp_avg_sq")),
        "whole number": variant(x=lambda d: d["state"][1].update(step=2.5)),
        "'state' and 'param_groups'": {"param_groups": good["param_groups"]},
    }
    for message, bad in cases.items():
        bad_lr = variant(x=lambda d: [g.update(lr=123.0) for g in d["param_groups"]])
        bad.setdefault("param_groups", bad_lr["param_groups"])
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(bad)
    # Nothing was half-loaded.
    assert opt.param_groups[0]["lr"] == 0.1
    for key, value in before.items():
        np.testing.assert_array_equal(opt.state[params[0]][key], value)


def test_constructor_validation():
    p = Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="learning rate"):
        SGD([p], lr=-0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([p], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        SGD([p], momentum=-1)
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW([p], weight_decay=-1)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="epsilon"):
        Adam([p], eps=-1e-8)
    with pytest.raises(ValueError, match="empty parameter list"):
        Adam([])
    with pytest.raises(ValueError, match="more than one parameter group"):
        SGD([{"params": [p]}, {"params": [p]}])
    with pytest.raises(TypeError, match="single Parameter"):
        SGD(p)
    with pytest.raises(TypeError, match="can only optimize Parameters"):
        SGD([np.zeros(2)])
    p.grad = np.zeros(3)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        SGD([p]).step()


def test_defaults_and_names_match_torch(torch):
    p, tp = Parameter(np.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    for ours, theirs in [(SGD([p]), torch.optim.SGD([tp])), (Adam([p]), torch.optim.Adam([tp])),
                         (AdamW([p]), torch.optim.AdamW([tp]))]:
        ours_group, their_group = ours.param_groups[0], theirs.param_groups[0]
        for key, value in ours_group.items():
            if key != "params":
                assert their_group[key] == value, (type(ours).__name__, key)
    assert isinstance(SGD([p]), Optimizer)
    named = SGD([("w", p)], lr=0.1)
    assert named.param_groups[0]["params"] == [p]
    assert named.state_dict()["param_groups"][0]["param_names"] == ["w"]


@pytest.mark.parametrize(("name", "config"), [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.05, "amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    ("AdamW", {"lr": 0.05}),
])
def test_float32_stays_float32_and_tracks_torch(torch, rng, name, config):
    problem = Problem(rng)
    ours, theirs = make_pair(torch, problem, dtype=np.float32)
    opt = OURS[name](ours, **config)
    # A float64 NumPy scalar in a group (as a scheduler might set) must not upcast anything.
    opt.param_groups[0]["lr"] = np.float64(config["lr"])
    topt = torch_optimizer(torch, name, theirs, **config)
    run_steps(torch, opt, topt, ours, theirs, problem, rng, 15, tol=2e-5)
    for p in ours:
        assert p.data.dtype == np.float32 and p.grad.dtype == np.float32
        for value in opt.state[p].values():
            if isinstance(value, np.ndarray):
                assert value.dtype == np.float32
    state = opt.state_dict()
    fresh = OURS[name]([Parameter(p.data.copy()) for p in ours])
    as_float64 = {"param_groups": state["param_groups"], "state": {
        i: {k: v.astype(np.float64) if isinstance(v, np.ndarray) else v for k, v in e.items()}
        for i, e in state["state"].items()}}
    fresh.load_state_dict(as_float64)  # loaded state is cast to the parameter's dtype
    for entries in fresh.state.values():
        assert all(v.dtype == np.float32 for v in entries.values() if isinstance(v, np.ndarray))


def test_closure_loss_is_returned():
    p = Parameter(np.array([2.0]))
    opt = SGD([p], lr=0.25)

    def closure() -> float:
        opt.zero_grad()
        p.grad = 2 * p.data  # d/dθ θ²
        return float(p.data[0] ** 2)

    assert opt.step(closure) == 4.0
    np.testing.assert_array_equal(p.data, [1.0])


def test_importing_optim_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, scratchcnn.optim; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    ("name", "config"),
    [("Adam", {}), ("Adam", {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True,
                             "maximize": True}),
     ("AdamW", {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True})],
)
def test_adam_whole_group_steps_match_torch_and_the_per_parameter_path(torch, rng, name, config):
    """Once flatten_parameters has laid the parameters end to end, steps where every parameter
    has a gradient update the group as one flat vector: the trajectory tracks torch to 1e-10 and
    is bit-identical to the per-parameter path, also across a skipped gradient and a state_dict
    load (whose arrays are copied into the flat vectors)."""
    problem = Problem(rng)
    ours, theirs = make_pair(torch, problem)
    flatten_parameters(ours)
    opt = OURS[name](ours, **config)
    run_steps(torch, opt, torch_optimizer(torch, name, theirs, **config), ours, theirs, problem,
              rng, 8, skip_every=1)  # x % 1 is never 1: no skips
    flat_base = ours[0].data.base
    assert flat_base is not None and all(p.data.base is flat_base for p in ours)
    assert all(opt.state[p]["step"] == 8 for p in ours)

    twins = [Parameter(p.data.copy()) for p in ours]
    per_param = OURS[name](twins, **config)
    per_param._supports_flat = False
    per_param.load_state_dict(opt.state_dict())
    fresh = [Parameter(p.data.copy()) for p in ours]
    reloaded = OURS[name](fresh, **config)
    reloaded.load_state_dict(opt.state_dict())
    groups = (ours, twins, fresh)
    for step in range(6):
        grads = problem.gradients([p.data for p in ours], rng)
        for params in groups:
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad = None if (step == 2 and i == 1) else g.copy()
        for optimizer in (opt, per_param, reloaded):
            optimizer.step()
        for params in groups[1:]:
            for p, q in zip(ours, params, strict=True):
                np.testing.assert_array_equal(p.data, q.data)
    assert opt.state[ours[1]]["step"] == 13 and opt.state[ours[0]]["step"] == 14


def test_optimizers_never_rebind_parameter_arrays(rng):
    """As in torch, a step updates ``param.data`` in place: arrays a caller holds stay live
    (taken once the optimizers exist: Adam lays the parameters end to end when created)."""
    params = [Parameter(rng.standard_normal(s)) for s in [(3, 4), (5,), (2, 2, 2)]]
    optimizers = (SGD(params, lr=0.1, momentum=0.9), Adam(params), AdamW(params))
    held = [p.data for p in params]
    for optimizer in optimizers:
        for _ in range(3):
            for p in params:
                p.grad = rng.standard_normal(p.shape)
            optimizer.step()
    assert all(p.data is array for p, array in zip(params, held, strict=True))


def test_flatten_parameters_lays_them_end_to_end_keeping_values(rng):
    params = [Parameter(rng.standard_normal(s)) for s in [(3, 4), (5,)]]
    before = [p.data.copy() for p in params]
    vector = flatten_parameters([*params, params[0]])  # a repeated parameter is laid out once
    assert vector.shape == (17,)
    for p, values in zip(params, before, strict=True):
        assert np.shares_memory(p.data, vector)
        np.testing.assert_array_equal(p.data, values)
    with pytest.raises(ValueError, match="one dtype"):
        flatten_parameters([Parameter(np.zeros(2)), Parameter(np.zeros(2, np.float32))])


def test_flattened_gradients_land_in_the_optimizers_flat_vector(rng):
    """flatten_parameters gives the gradients a flat vector too (``grad_buffer``): backward
    writes there, the optimizer adopts it as its flat gradient and copies nothing, and the
    updates are the bits of parameters that never had buffers."""
    x, labels = rng.standard_normal((6, 5), dtype=np.float32), rng.integers(0, 3, 6)
    runs = []
    for flatten in (True, False):
        model = nn.Sequential(nn.Linear(5, 4, rng=np.random.default_rng(1)), nn.ReLU(),
                              nn.Linear(4, 3, rng=np.random.default_rng(2)))
        params = list(model.parameters())
        if flatten:
            flatten_parameters(params)
        opt = Adam(params, lr=0.01)
        criterion = nn.CrossEntropyLoss()
        for _ in range(3):
            opt.zero_grad()
            criterion(model(x), labels)
            model.backward(criterion.backward())
            if flatten:
                assert all(p.grad is p.grad_buffer for p in params)
            opt.step()
        runs.append((params, opt))
    (flat_params, flat_opt), (plain_params, _) = runs
    group = flat_opt._flat_groups[0]
    assert all(np.shares_memory(p.grad, group.grad) for p in flat_params)
    for p, q in zip(flat_params, plain_params, strict=True):
        np.testing.assert_array_equal(p.data, q.data)

    # A buffer that no longer matches (the model cast to another dtype) is not used.
    model = nn.Linear(3, 2, rng=rng)
    flatten_parameters(model.parameters())
    model.double()
    assert model.weight.grad_buffer is None
    model.weight.accumulate_grad(np.ones((2, 3)))
    assert model.weight.grad.dtype == np.float64


def test_rebinding_a_flattened_parameter_keeps_it_updated(rng):
    """After ``w.data = w.data.copy()`` the flat vector no longer holds w: the next step must
    update w's new array, exactly as an optimizer that never flattened."""
    start = [rng.standard_normal(s) for s in [(3, 4), (5,)]]
    grads = [[rng.standard_normal(a.shape) for a in start] for _ in range(2)]
    runs = []
    for flatten in (True, False):
        params = [Parameter(a.copy()) for a in start]
        if flatten:
            flatten_parameters(params)
        opt = Adam(params, lr=0.1)
        for step, step_grads in enumerate(grads):
            if step == 1:
                params[0].data = params[0].data.copy()
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.copy()
            opt.step()
        runs.append(params)
    flat, plain = runs
    for p, q in zip(flat, plain, strict=True):
        np.testing.assert_array_equal(p.data, q.data)


def test_zero_grad_to_zero_skips_parameters_without_grad(rng):
    with_grad, without = Parameter(rng.standard_normal(3)), Parameter(rng.standard_normal(2))
    with_grad.grad = rng.standard_normal(3)
    SGD([with_grad, without]).zero_grad(set_to_none=False)
    assert without.grad is None
    np.testing.assert_array_equal(with_grad.grad, np.zeros(3))


def test_same_parameter_twice_in_a_group_is_rejected():
    p = Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="same parameter twice"):
        SGD([p, p])


@pytest.mark.parametrize("flatten", [False, True], ids=["per_param", "flat"])
@pytest.mark.parametrize("cls", [SGD, Adam], ids=["SGD", "Adam"])
def test_gradient_of_another_dtype_is_rejected(flatten, cls):
    params = [Parameter(np.zeros(3, np.float32)), Parameter(np.zeros(2, np.float32))]
    if flatten:
        flatten_parameters(params)
    params[0].grad = np.ones(3, np.float32)
    params[1].grad = np.ones(2, np.float64)
    with pytest.raises(ValueError, match=r"float32 whose \.grad has shape.*float64"):
        cls(params, lr=0.1).step()


def test_flattened_adam_resumes_from_its_state_dict(rng):
    # The flat step keeps its moments in whole vectors: loading must fill those, or the resumed
    # run would restart Adam from zero moments.
    start = [rng.standard_normal(s) for s in [(30, 31), (7,)]]
    grads = [[rng.standard_normal(a.shape) for a in start] for _ in range(4)]

    def adam_on_flat_params(values):
        params = [Parameter(a.copy()) for a in values]
        flatten_parameters(params)
        return params, Adam(params, lr=0.05)

    def step(params, optimizer, step_grads):
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.copy()
        optimizer.step()

    params, optimizer = adam_on_flat_params(start)
    for step_grads in grads[:2]:
        step(params, optimizer, step_grads)
    resumed, resumed_optimizer = adam_on_flat_params([p.data for p in params])
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    for step_grads in grads[2:]:
        step(params, optimizer, step_grads)
        step(resumed, resumed_optimizer, step_grads)
    for original, copy in zip(params, resumed, strict=True):
        np.testing.assert_array_equal(copy.data, original.data)
