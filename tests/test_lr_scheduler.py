"""scratchcnn.optim.lr_scheduler against torch.optim.lr_scheduler: learning-rate sequences over
40 epochs (past the end of each schedule), chained and sequenced schedulers, ReduceLROnPlateau on
metric sequences, schedulers driving an optimizer, state_dict round trips and validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scratchcnn.nn.module import Parameter
from scratchcnn.optim import SGD, Adam, lr_scheduler
from scratchcnn.optim.lr_scheduler import (
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

EPOCHS = 40


class StepDecay:
    """A callable object for LambdaLR: its attributes are what LambdaLR's state_dict saves."""

    def __init__(self, every, factor):
        self.every, self.factor = every, factor

    def __call__(self, epoch):
        return self.factor ** (epoch // self.every)

LRS = (0.1, 0.03)  # two parameter groups with different learning rates

SCHEDULES = [
    ("StepLR", {"step_size": 3, "gamma": 0.5}),
    ("StepLR", {"step_size": 1}),
    ("CosineAnnealingLR", {"T_max": 10}),
    ("CosineAnnealingLR", {"T_max": 7, "eta_min": 0.01}),
    ("LinearLR", {"start_factor": 0.1, "total_iters": 5}),
    ("LinearLR", {"start_factor": 0.5, "end_factor": 0.2, "total_iters": 8}),
    ("MultiStepLR", {"milestones": [2, 5, 5, 11], "gamma": 0.5}),
    ("MultiStepLR", {"milestones": [30, 0, 9]}),  # any order; 0 applies at construction
    ("ExponentialLR", {"gamma": 0.9}),
    ("ExponentialLR", {"gamma": 1.07}),
    ("LambdaLR", {"lr_lambda": lambda epoch: 0.95**epoch * (1 + epoch % 3)}),
    ("LambdaLR", {"lr_lambda": [lambda epoch: min(1.0, (epoch + 1) / 6), StepDecay(4, 0.6)]}),
]


def case_id(name, config):
    """``name-{config}``, functions by name (their repr holds an address)."""
    def show(value):
        if isinstance(value, list):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return getattr(value, "__name__", type(value).__name__) if callable(value) else repr(value)
    return name + "-{" + ", ".join(f"{k!r}: {show(v)}" for k, v in config.items()) + "}"


SCHEDULE_IDS = [case_id(n, c) for n, c in SCHEDULES]


def our_optimizer():
    params = [Parameter(np.zeros(2)), Parameter(np.zeros(3))]
    return SGD([{"params": params[:1], "lr": LRS[0]}, {"params": params[1:], "lr": LRS[1]}])


def their_optimizer(torch):
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    return torch.optim.SGD(
        [{"params": params[:1], "lr": LRS[0]}, {"params": params[1:], "lr": LRS[1]}]
    )


def lr_sequence(optimizer, schedulers, epochs=EPOCHS):
    """get_last_lr() after construction and after each epoch (optimizer.step, then every
    scheduler's step, as PyTorch recommends)."""
    sequence = [schedulers[-1].get_last_lr()]
    for _ in range(epochs):
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        sequence.append(schedulers[-1].get_last_lr())
    return np.array(sequence)


@pytest.mark.parametrize(("name", "config"), SCHEDULES, ids=SCHEDULE_IDS)
def test_lr_sequence_matches_torch(torch, name, config):
    opt, topt = our_optimizer(), their_optimizer(torch)
    ours = lr_sequence(opt, [getattr(lr_scheduler, name)(opt, **config)])
    theirs = lr_sequence(topt, [getattr(torch.optim.lr_scheduler, name)(topt, **config)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=0)
    assert len(np.unique(ours[:, 0])) > 2  # the schedule really changed the lr
    assert [g["lr"] for g in opt.param_groups] == list(ours[-1])


@pytest.mark.parametrize(("name", "config"), SCHEDULES, ids=SCHEDULE_IDS)
def test_torch_scheduler_state_dict_resumes_the_same_schedule(torch, name, config):
    """A schedule saved by torch mid-way (its state_dict carries torch-only keys) continues
    here with torch's learning rates."""
    topt = their_optimizer(torch)
    theirs = getattr(torch.optim.lr_scheduler, name)(topt, **config)
    lr_sequence(topt, [theirs], epochs=3)
    opt = our_optimizer()
    ours = getattr(lr_scheduler, name)(opt, **config)
    ours.load_state_dict(theirs.state_dict())
    for group, lr in zip(opt.param_groups, ours.get_last_lr(), strict=True):
        group["lr"] = lr  # the optimizer's own state would come from its own state_dict
    np.testing.assert_allclose(lr_sequence(opt, [ours], epochs=6),
                               lr_sequence(topt, [theirs], epochs=6), rtol=1e-13, atol=0)


def test_chained_schedulers_match_torch(torch):
    """Warm-up and cosine stepped together: only the recursive forms compose like this."""
    opt, topt = our_optimizer(), their_optimizer(torch)
    ours = lr_sequence(opt, [LinearLR(opt, 0.2, total_iters=4), CosineAnnealingLR(opt, 12, 1e-3)])
    theirs = lr_sequence(topt, [torch.optim.lr_scheduler.LinearLR(topt, 0.2, total_iters=4),
                                torch.optim.lr_scheduler.CosineAnnealingLR(topt, 12, 1e-3)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=0)


def test_closed_forms_when_alone():
    opt = our_optimizer()
    cosine = lr_sequence(opt, [CosineAnnealingLR(opt, T_max=9, eta_min=0.002)])
    epochs = np.arange(EPOCHS + 1)[:, None]
    base = np.array(LRS)[None, :]
    expected = 0.002 + (base - 0.002) * (1 + np.cos(np.pi * epochs / 9)) / 2
    np.testing.assert_allclose(cosine, expected, rtol=1e-12)
    assert cosine[9, 0] == pytest.approx(0.002) and cosine[18, 0] == pytest.approx(LRS[0])

    opt = our_optimizer()
    step = lr_sequence(opt, [StepLR(opt, step_size=4, gamma=0.3)])
    np.testing.assert_allclose(step, base * 0.3 ** (epochs // 4), rtol=1e-12)


def test_scheduler_drives_optimizer_like_torch(torch, rng):
    initial = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    ours = [Parameter(a.copy()) for a in initial]
    theirs = [torch.nn.Parameter(torch.tensor(a)) for a in initial]
    opt = Adam(ours, lr=0.05, amsgrad=True)
    topt = torch.optim.Adam(theirs, lr=0.05, amsgrad=True, foreach=False)
    sched = CosineAnnealingLR(opt, T_max=8, eta_min=1e-3)
    tsched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=8, eta_min=1e-3)
    for _ in range(30):
        for p, tp in zip(ours, theirs, strict=True):
            noise = rng.standard_normal(p.shape)  # gradient of 0.75·θ², plus noise
            p.grad = 1.5 * p.data + noise
            tp.grad = torch.tensor(1.5 * tp.detach().numpy() + noise)
        opt.step()
        topt.step()
        sched.step()
        tsched.step()
    for p, tp in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_mid_schedule():
    opt = our_optimizer()
    schedulers = [LinearLR(opt, 0.25, total_iters=3), CosineAnnealingLR(opt, T_max=6)]
    lr_sequence(opt, schedulers, epochs=5)
    saved_opt = opt.state_dict()
    saved = json.loads(json.dumps([s.state_dict() for s in schedulers]))  # JSON-friendly
    rest = lr_sequence(opt, schedulers, epochs=15)

    resumed = our_optimizer()
    resumed_schedulers = [LinearLR(resumed, 0.25, total_iters=3), CosineAnnealingLR(resumed, 6)]
    for scheduler, state in zip(resumed_schedulers, saved, strict=True):
        scheduler.load_state_dict(state)
    resumed.load_state_dict(json.loads(json.dumps(saved_opt)))  # after the schedulers
    np.testing.assert_array_equal(lr_sequence(resumed, resumed_schedulers, epochs=15), rest)


@pytest.mark.parametrize(("name", "config"), [
    ("CosineAnnealingLR", {"T_max": 6}),
    ("LinearLR", {"start_factor": 0.2, "total_iters": 8}),
    ("StepLR", {"step_size": 3}),
    ("MultiStepLR", {"milestones": [2, 5, 7]}),
    ("ExponentialLR", {"gamma": 0.8}),
    ("LambdaLR", {"lr_lambda": lambda epoch: 1 / (1 + epoch)}),
])
def test_resuming_with_last_epoch_matches_torch(torch, name, config):
    """Constructing with last_epoch=k takes the initial step from epoch k, as PyTorch does."""
    sequences = []
    for make_opt, module in [(our_optimizer, lr_scheduler),
                             (lambda: their_optimizer(torch), torch.optim.lr_scheduler)]:
        opt = make_opt()
        first = lr_sequence(opt, [getattr(module, name)(opt, **config)], epochs=4)
        resumed = make_opt()
        resumed.load_state_dict(opt.state_dict())  # restores initial_lr and the current lr
        again = getattr(module, name)(resumed, **config, last_epoch=4)
        sequences.append(np.concatenate([first, lr_sequence(resumed, [again], epochs=10)]))
    np.testing.assert_allclose(sequences[0], sequences[1], rtol=1e-13, atol=0)

    with pytest.raises(ValueError, match="initial_lr"):
        StepLR(our_optimizer(), step_size=2, last_epoch=4)


def test_validation_and_get_last_lr_is_a_copy():
    opt = our_optimizer()
    with pytest.raises(TypeError, match="not an Optimizer"):
        StepLR(object(), step_size=2)
    with pytest.raises(ValueError, match="step_size"):
        StepLR(opt, step_size=0)
    with pytest.raises(ValueError, match="T_max"):
        CosineAnnealingLR(opt, T_max=0)
    with pytest.raises(ValueError, match="start_factor"):
        LinearLR(opt, start_factor=0)
    sched = StepLR(opt, step_size=2)
    last = sched.get_last_lr()
    last[0] = 99.0
    assert sched.get_last_lr()[0] == LRS[0]
    with pytest.raises(ValueError, match="unexpected keys"):
        sched.load_state_dict({**sched.state_dict(), "T_max": 3})
    with pytest.raises(ValueError, match="parameter groups"):
        sched.load_state_dict({**sched.state_dict(), "base_lrs": [0.1]})
    assert math.isclose(opt.param_groups[0]["lr"], LRS[0])


ONE_CYCLE = [
    ("SGD", {"max_lr": 0.5, "total_steps": 30}),
    ("SGD", {"max_lr": [0.5, 0.2], "epochs": 4, "steps_per_epoch": 8, "pct_start": 0.25,
             "anneal_strategy": "linear", "three_phase": True}),
    ("Adam", {"max_lr": 0.01, "total_steps": 40, "base_momentum": 0.8, "div_factor": 10.0}),
    ("Adam", {"max_lr": 0.01, "total_steps": 25, "cycle_momentum": False}),
]


@pytest.mark.parametrize(("optimizer", "config"), ONE_CYCLE, ids=[str(c) for c in ONE_CYCLE])
def test_one_cycle_matches_torch_including_momentum(torch, optimizer, config):
    def run(module, make_param, optim_cls):
        params = [make_param(2), make_param(3)]
        opt = optim_cls([{"params": params[:1], "lr": 0.1}, {"params": params[1:]}], lr=0.03)
        sched = module.OneCycleLR(opt, **config)
        lrs, momenta = [], []
        for _ in range(sched.total_steps):
            lrs.append(sched.get_last_lr())
            momenta.append([g["betas"][0] if "betas" in g else g["momentum"]
                            for g in opt.param_groups])
            opt.step()
            sched.step()
        return np.array(lrs), np.array(momenta)

    our_class = {"SGD": SGD, "Adam": Adam}[optimizer]
    ours = run(lr_scheduler, lambda n: Parameter(np.zeros(n)), our_class)
    theirs = run(torch.optim.lr_scheduler, lambda n: torch.nn.Parameter(torch.zeros(n)),
                 getattr(torch.optim, optimizer))
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-13, atol=0)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-13, atol=0)
    max_lrs = np.broadcast_to(config["max_lr"], 2)
    peak = ours[0].max(axis=0)  # reached at the end of the rise, up to step granularity
    assert np.all(peak <= max_lrs * (1 + 1e-12)) and np.all(peak > 0.99 * max_lrs)


def test_one_cycle_validation():
    opt = our_optimizer()
    with pytest.raises(ValueError, match="total_steps or epochs"):
        OneCycleLR(opt, max_lr=0.1)
    with pytest.raises(ValueError, match="pct_start"):
        OneCycleLR(opt, max_lr=0.1, total_steps=10, pct_start=1.5)
    with pytest.raises(ValueError, match="max_lr has 3 values"):
        OneCycleLR(opt, max_lr=[0.1, 0.2, 0.3], total_steps=10)
    sched = OneCycleLR(opt, max_lr=0.1, total_steps=3)
    for _ in range(3):
        sched.step()
    with pytest.raises(ValueError, match="total_steps is 3"):
        sched.step()


def test_one_cycle_resumes_from_json_state_dicts():
    def setup():
        opt = Adam([Parameter(np.zeros(3))], lr=0.01)
        return opt, OneCycleLR(opt, max_lr=0.05, total_steps=20, three_phase=True)

    def trace(opt, sched, steps):
        values = []
        for _ in range(steps):
            opt.step()
            sched.step()
            values.append((sched.get_last_lr()[0], opt.param_groups[0]["betas"][0]))
        return values

    opt, sched = setup()
    trace(opt, sched, 7)
    saved = json.loads(json.dumps({"optim": opt.state_dict(), "sched": sched.state_dict()}))
    expected = trace(opt, sched, 13)
    opt, sched = setup()
    sched.load_state_dict(saved["sched"])
    opt.load_state_dict(saved["optim"])
    assert opt.param_groups[0]["max_lr"] == 0.05
    assert trace(opt, sched, 13) == expected


def test_one_cycle_cycles_only_beta1(torch):
    def run(module, param, optim_cls):
        opt = optim_cls([param], lr=0.01, betas=(0.9, 0.999))
        sched = module.OneCycleLR(opt, max_lr=0.01, total_steps=10)
        betas = []
        for _ in range(sched.total_steps):
            betas.append(tuple(float(b) for b in opt.param_groups[0]["betas"]))
            opt.step()
            sched.step()
        return np.array(betas)

    ours = run(lr_scheduler, Parameter(np.zeros(2)), Adam)
    theirs = run(torch.optim.lr_scheduler, torch.nn.Parameter(torch.zeros(2)), torch.optim.Adam)
    np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=0)
    assert np.all(ours[:, 1] == 0.999)


# -- MultiStepLR, ExponentialLR, LambdaLR: what the shared tests above do not cover -------------


def test_new_schedulers_closed_forms_when_alone():
    epochs = np.arange(EPOCHS + 1)[:, None]
    base = np.array(LRS)[None, :]
    opt = our_optimizer()
    multi = lr_sequence(opt, [MultiStepLR(opt, milestones=[3, 8, 8, 20], gamma=0.5)])
    passed = (epochs >= 3).astype(int) + 2 * (epochs >= 8) + (epochs >= 20)
    np.testing.assert_allclose(multi, base * 0.5**passed, rtol=1e-12)
    opt = our_optimizer()
    exponential = lr_sequence(opt, [ExponentialLR(opt, gamma=0.93)])
    np.testing.assert_allclose(exponential, base * 0.93**epochs, rtol=1e-12)
    opt = our_optimizer()
    lambdas = lr_sequence(opt, [LambdaLR(opt, [lambda e: e + 1, StepDecay(5, 0.1)])])
    np.testing.assert_array_equal(lambdas[:, 0], LRS[0] * (epochs[:, 0] + 1))
    np.testing.assert_array_equal(lambdas[:, 1], LRS[1] * 0.1 ** (epochs[:, 0] // 5))


@pytest.mark.parametrize(("name", "config"), SCHEDULES[6:], ids=SCHEDULE_IDS[6:])
def test_new_schedulers_state_dict_round_trip_through_json(name, config):
    opt = our_optimizer()
    scheduler = getattr(lr_scheduler, name)(opt, **config)
    lr_sequence(opt, [scheduler], epochs=7)
    saved = json.loads(json.dumps(scheduler.state_dict()))
    saved_opt = json.loads(json.dumps(opt.state_dict()))
    rest = lr_sequence(opt, [scheduler], epochs=20)
    resumed = our_optimizer()
    again = getattr(lr_scheduler, name)(resumed, **config)
    again.load_state_dict(saved)
    resumed.load_state_dict(saved_opt)
    np.testing.assert_array_equal(lr_sequence(resumed, [again], epochs=20), rest)


def test_multistep_state_dict_is_torchs_counter_and_loads_into_torch(torch):
    from collections import Counter

    opt = our_optimizer()
    sched = MultiStepLR(opt, milestones=[6, 2, 6])
    assert sched.milestones == Counter({6: 2, 2: 1})
    lr_sequence(opt, [sched], epochs=3)
    state = sched.state_dict()
    assert state["milestones"] == Counter({6: 2, 2: 1})
    state["milestones"][9] = 1  # a copy
    assert 9 not in sched.milestones
    # torch's MultiStepLR takes ours (the same keys and types) and continues as we do
    topt = their_optimizer(torch)
    theirs = torch.optim.lr_scheduler.MultiStepLR(topt, milestones=[1])
    theirs.load_state_dict(sched.state_dict())
    for group, lr in zip(topt.param_groups, sched.get_last_lr(), strict=True):
        group["lr"] = lr
    np.testing.assert_array_equal(lr_sequence(opt, [sched], epochs=8),
                                  lr_sequence(topt, [theirs], epochs=8))


def test_lambda_state_dict_saves_callable_objects_only(torch):
    decay = StepDecay(3, 0.5)
    opt = our_optimizer()
    sched = LambdaLR(opt, [lambda epoch: 1.0, decay])
    topt = their_optimizer(torch)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, [lambda epoch: 1.0, StepDecay(3, 0.5)])
    assert sched.state_dict().keys() == tsched.state_dict().keys() - {
        "_get_lr_called_within_step"}
    assert sched.state_dict()["lr_lambdas"] == [None, {"every": 3, "factor": 0.5}]
    assert sched.state_dict()["lr_lambdas"] == tsched.state_dict()["lr_lambdas"]
    # loading restores the object's attributes into this scheduler's own object, as torch
    fresh = StepDecay(1, 1.0)
    other = LambdaLR(our_optimizer(), [lambda epoch: 1.0, fresh])
    tsched.lr_lambdas[1].factor = 0.25
    lr_sequence(topt, [tsched], epochs=4)
    other.load_state_dict(tsched.state_dict())
    assert (fresh.every, fresh.factor) == (3, 0.25) and other.last_epoch == 4
    assert other.get_last_lr() == tsched.get_last_lr()
    with pytest.raises(ValueError, match="lr_lambdas has 1 entries"):
        other.load_state_dict({**other.state_dict(), "lr_lambdas": [None]})


def test_new_schedulers_validation():
    opt = our_optimizer()
    with pytest.raises(TypeError, match="milestones must be a list"):
        MultiStepLR(opt, milestones=30)
    with pytest.raises(ValueError, match="milestones must be epochs"):
        MultiStepLR(opt, milestones=[3, 7.5])
    with pytest.raises(ValueError, match="milestones must be epochs"):
        MultiStepLR(opt, milestones=[-1])
    with pytest.raises(ValueError, match="gamma must be a positive number"):
        MultiStepLR(opt, milestones=[3], gamma=0)
    with pytest.raises(ValueError, match="gamma must be a positive number"):
        ExponentialLR(opt, gamma="0.9")
    with pytest.raises(TypeError, match="not an Optimizer"):
        ExponentialLR(object(), gamma=0.9)
    with pytest.raises(TypeError, match="not an Optimizer"):
        LambdaLR(object(), lambda epoch: 1.0)
    with pytest.raises(ValueError, match="expected 2 lr_lambdas"):
        LambdaLR(opt, [lambda epoch: 1.0])
    with pytest.raises(TypeError, match="lr_lambda must be a function"):
        LambdaLR(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == list(LRS)  # nothing was changed


# -- SequentialLR -------------------------------------------------------------------------------


def sequential(module, opt, case):
    """SequentialLR cases, built the same way from either module."""
    if case == "warmup-cosine":
        schedulers = [module.LinearLR(opt, start_factor=0.1, total_iters=5),
                      module.CosineAnnealingLR(opt, T_max=12, eta_min=1e-3)]
        milestones = [5]
    elif case == "four":  # closed forms at each restart, and LambdaLR's get_lr (it has none)
        schedulers = [module.ExponentialLR(opt, gamma=1.2),
                      module.MultiStepLR(opt, milestones=[0, 2, 4]),
                      module.LambdaLR(opt, lambda epoch: 0.8**epoch),
                      module.StepLR(opt, step_size=3, gamma=0.5)]
        milestones = [4, 11, 20]
    else:  # cosine first, warm restart with LinearLR, decay past its end
        schedulers = [module.CosineAnnealingLR(opt, T_max=6),
                      module.LinearLR(opt, start_factor=0.3, end_factor=0.6, total_iters=4),
                      module.ExponentialLR(opt, gamma=0.9)]
        milestones = [9, 17]
    return module.SequentialLR(opt, schedulers, milestones)


SEQUENTIAL = ["warmup-cosine", "four", "restart"]


@pytest.mark.parametrize("case", SEQUENTIAL)
def test_sequential_matches_torch(torch, case):
    opt, topt = our_optimizer(), their_optimizer(torch)
    sched = sequential(lr_scheduler, opt, case)
    tsched = sequential(torch.optim.lr_scheduler, topt, case)
    assert sched.get_last_lr() == tsched.get_last_lr()  # the first scheduler's epoch 0 only
    ours, theirs = lr_sequence(opt, [sched]), lr_sequence(topt, [tsched])
    np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=0)
    assert len(np.unique(ours[:, 0])) > 10
    assert [g["lr"] for g in opt.param_groups] == list(ours[-1])
    assert sched.last_epoch == tsched.last_epoch == EPOCHS
    assert [s.last_epoch for s in sched._schedulers] == [s.last_epoch for s in tsched._schedulers]


def test_sequential_warmup_then_cosine_closed_form():
    opt = our_optimizer()
    ours = lr_sequence(opt, [sequential(lr_scheduler, opt, "warmup-cosine")], epochs=20)
    t = np.arange(21)[:, None]
    base = np.array(LRS)[None, :]
    warmup = base * (0.1 + 0.9 * t / 5)
    cosine = 1e-3 + (base - 1e-3) * (1 + np.cos(np.pi * (t - 5) / 12)) / 2
    np.testing.assert_allclose(ours, np.where(t < 5, warmup, cosine), rtol=1e-12)


@pytest.mark.parametrize("case", SEQUENTIAL)
def test_sequential_state_dict_round_trips_and_loads_torchs(torch, case):
    opt = our_optimizer()
    sched = sequential(lr_scheduler, opt, case)
    lr_sequence(opt, [sched], epochs=7)
    saved = json.loads(json.dumps(sched.state_dict()))
    saved_opt = opt.state_dict()
    rest = lr_sequence(opt, [sched], epochs=25)
    resumed = our_optimizer()
    again = sequential(lr_scheduler, resumed, case)
    again.load_state_dict(saved)
    resumed.load_state_dict(saved_opt)
    np.testing.assert_array_equal(lr_sequence(resumed, [again], epochs=25), rest)

    topt = their_optimizer(torch)
    tsched = sequential(torch.optim.lr_scheduler, topt, case)
    lr_sequence(topt, [tsched], epochs=7)
    tstate = tsched.state_dict()
    assert set(saved) | {"_get_lr_called_within_step"} >= set(tstate)
    resumed = our_optimizer()
    again = sequential(lr_scheduler, resumed, case)
    again.load_state_dict(tstate)
    for group, lr in zip(resumed.param_groups, again.get_last_lr(), strict=True):
        group["lr"] = lr
    np.testing.assert_allclose(lr_sequence(resumed, [again], epochs=25),
                               lr_sequence(topt, [tsched], epochs=25), rtol=1e-13, atol=0)


def test_sequential_validation():
    opt = our_optimizer()
    first, second = LinearLR(opt, total_iters=3), ExponentialLR(opt, gamma=0.9)
    with pytest.raises(ValueError, match="non-empty"):
        SequentialLR(opt, [], [])
    with pytest.raises(ValueError, match="expected 1 milestones"):
        SequentialLR(opt, [first, second], [3, 6])
    with pytest.raises(ValueError, match="increasing positive"):
        SequentialLR(opt, [first, second, StepLR(opt, 2)], [6, 3])
    with pytest.raises(ValueError, match="increasing positive"):
        SequentialLR(opt, [first, second], [2.5])
    with pytest.raises(TypeError, match="not a learning-rate scheduler"):
        SequentialLR(opt, [first, "cosine"], [3])
    with pytest.raises(ValueError, match="needs a metric"):
        SequentialLR(opt, [first, ReduceLROnPlateau(opt)], [3])
    with pytest.raises(ValueError, match="another optimizer"):
        SequentialLR(opt, [first, ExponentialLR(our_optimizer(), gamma=0.9)], [3])
    sched = SequentialLR(opt, [first, second], [3])
    with pytest.raises(ValueError, match="_schedulers must hold 2"):
        sched.load_state_dict({**sched.state_dict(), "_schedulers": []})


# -- ReduceLROnPlateau ---------------------------------------------------------------------------


def plateau_metrics():
    """A noisy loss curve that flattens out, then a late improvement: plateaus of every length."""
    noise = np.random.default_rng(7).normal(0.0, 0.03, 90)
    t = np.arange(90)
    return 1.0 + 9.0 * np.exp(-t / 12) + noise - 1.5 * (t >= 60)


PLATEAU = [
    {"patience": 3},
    {"patience": 2, "cooldown": 3, "factor": 0.5, "min_lr": [2e-3, 1e-3]},
    {"patience": 4, "threshold": 0.05, "min_lr": 1e-4},
    {"patience": 1, "threshold": 0.05, "threshold_mode": "abs", "factor": 0.7},
    {"mode": "max", "patience": 2, "threshold": 0.01, "cooldown": 1, "factor": 0.5},
    {"mode": "max", "patience": 3, "threshold": 0.05, "threshold_mode": "abs", "factor": 0.5,
     "min_lr": 0.0245, "eps": 1e-3},  # 0.025 -> 0.0245 is within eps: skipped
]


def plateau_trace(opt, sched, metrics):
    """get_last_lr(), the groups' lr and the counters after each step(metric)."""
    trace = []
    for metric in metrics:
        opt.step()
        sched.step(metric)
        trace.append([*sched.get_last_lr(), *(g["lr"] for g in opt.param_groups),
                      sched.best, sched.num_bad_epochs, sched.cooldown_counter])
    return np.array(trace)


@pytest.mark.parametrize("config", PLATEAU, ids=[str(c) for c in PLATEAU])
def test_reduce_on_plateau_matches_torch(torch, config):
    metrics = plateau_metrics()
    if config.get("mode") == "max":
        metrics = 12.0 - metrics  # rising to a plateau, like an accuracy
    opt, topt = our_optimizer(), their_optimizer(torch)
    sched = ReduceLROnPlateau(opt, **config)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **config)
    assert sched.get_last_lr() == tsched.get_last_lr() == list(LRS)
    ours = plateau_trace(opt, sched, metrics)
    np.testing.assert_array_equal(ours, plateau_trace(topt, tsched, metrics))
    assert len(np.unique(ours[:, 0])) >= 3  # reduced at least twice
    assert sched.last_epoch == len(metrics)


def test_reduce_on_plateau_patience_cooldown_min_lr_by_hand():
    opt = our_optimizer()
    sched = ReduceLROnPlateau(opt, patience=2, cooldown=1, factor=0.5, min_lr=[0.02, 0])
    lrs = plateau_trace(opt, sched, [1.0] * 13)[:, :2]
    # epoch 1 sets best; bad epochs 2, 3, 4 -> reduce after 4; epoch 5 is cooldown (not
    # counted); bad 6, 7, 8 -> reduce after 8; cooldown 9; 10, 11, 12 -> after 12
    reduced_after = [i + 1 for i in range(1, 13) if lrs[i, 1] != lrs[i - 1, 1]]
    assert reduced_after == [4, 8, 12]
    np.testing.assert_array_equal(lrs[:, 0], [0.1] * 3 + [0.05] * 4 + [0.025] * 4 + [0.02] * 2)
    # an improvement resets the count; within the threshold it does not count as one
    opt = our_optimizer()
    sched = ReduceLROnPlateau(opt, patience=1, threshold=0.1)
    lrs = plateau_trace(opt, sched, [1.0, 0.95, 0.8, 0.75, 0.74])[:, 0]
    assert list(lrs) == [0.1, 0.1, 0.1, 0.1, pytest.approx(0.01)]
    opt = our_optimizer()
    sched = ReduceLROnPlateau(opt, mode="max", patience=0, threshold=0.1, threshold_mode="abs")
    lrs = plateau_trace(opt, sched, [1.0, 1.2, 1.25, 1.4])[:, 0]
    assert list(lrs) == [0.1, 0.1, pytest.approx(0.01), pytest.approx(0.01)]


def test_reduce_on_plateau_state_dict_round_trips_and_loads_torchs(torch):
    config = PLATEAU[1]
    metrics = plateau_metrics()
    opt = our_optimizer()
    sched = ReduceLROnPlateau(opt, **config)
    plateau_trace(opt, sched, metrics[:30])
    saved = json.loads(json.dumps(sched.state_dict()))  # best may be inf: Python's JSON keeps it
    saved_opt = opt.state_dict()
    rest = plateau_trace(opt, sched, metrics[30:])
    resumed = our_optimizer()
    again = ReduceLROnPlateau(resumed, **config)
    again.load_state_dict(saved)
    resumed.load_state_dict(saved_opt)
    np.testing.assert_array_equal(plateau_trace(resumed, again, metrics[30:]), rest)

    topt = their_optimizer(torch)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **config)
    plateau_trace(topt, tsched, metrics[:30])
    assert set(tsched.state_dict()) == set(saved)
    resumed = our_optimizer()
    again = ReduceLROnPlateau(resumed)  # every setting comes from the state_dict
    again.load_state_dict(tsched.state_dict())
    for group, lr in zip(resumed.param_groups, again.get_last_lr(), strict=True):
        group["lr"] = lr
    np.testing.assert_array_equal(plateau_trace(resumed, again, metrics[30:]),
                                  plateau_trace(topt, tsched, metrics[30:]))


def test_reduce_on_plateau_validation():
    opt = our_optimizer()
    for kwargs, match in [
        ({"mode": "minimum"}, "mode must be 'min' or 'max'"),
        ({"threshold_mode": "relative"}, "threshold_mode must be 'rel' or 'abs'"),
        ({"factor": 1.0}, r"factor must be in \[0, 1\)"),
        ({"factor": -0.5}, r"factor must be in \[0, 1\)"),
        ({"patience": -1}, "patience must be a non-negative integer"),
        ({"cooldown": 1.5}, "cooldown must be a non-negative integer"),
        ({"threshold": -1e-4}, "threshold must be >= 0"),
        ({"min_lr": [0.1]}, "expected 2 min_lrs"),
        ({"min_lr": -1}, "min_lr must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            ReduceLROnPlateau(opt, **kwargs)
    with pytest.raises(TypeError, match="not an Optimizer"):
        ReduceLROnPlateau(object())
    sched = ReduceLROnPlateau(opt)
    with pytest.raises(TypeError, match="metrics must be a number"):
        sched.step([0.5])
    sched.step(np.float32(0.5))  # NumPy scalars and 0-d arrays are numbers
    sched.step(np.array(0.4))
    assert sched.best == pytest.approx(0.4) and sched.last_epoch == 2
    with pytest.raises(ValueError, match="mode must be"):
        sched.load_state_dict({**sched.state_dict(), "mode": "up"})
