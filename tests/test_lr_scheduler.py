"""scratchcnn.optim.lr_scheduler against torch.optim.lr_scheduler: learning-rate sequences over
40 epochs (past the end of each schedule), chained schedulers, schedulers driving an optimizer,
state_dict round trips and validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scratchcnn.nn.module import Parameter
from scratchcnn.optim import SGD, Adam, lr_scheduler
from scratchcnn.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, StepLR

EPOCHS = 40
LRS = (0.1, 0.03)  # two parameter groups with different learning rates

SCHEDULES = [
    ("StepLR", {"step_size": 3, "gamma": 0.5}),
    ("StepLR", {"step_size": 1}),
    ("CosineAnnealingLR", {"T_max": 10}),
    ("CosineAnnealingLR", {"T_max": 7, "eta_min": 0.01}),
    ("LinearLR", {"start_factor": 0.1, "total_iters": 5}),
    ("LinearLR", {"start_factor": 0.5, "end_factor": 0.2, "total_iters": 8}),
]


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


@pytest.mark.parametrize(("name", "config"), SCHEDULES, ids=[f"{n}-{c}" for n, c in SCHEDULES])
def test_lr_sequence_matches_torch(torch, name, config):
    opt, topt = our_optimizer(), their_optimizer(torch)
    ours = lr_sequence(opt, [getattr(lr_scheduler, name)(opt, **config)])
    theirs = lr_sequence(topt, [getattr(torch.optim.lr_scheduler, name)(topt, **config)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=0)
    assert len(np.unique(ours[:, 0])) > 2  # the schedule really changed the lr
    assert [g["lr"] for g in opt.param_groups] == list(ours[-1])


@pytest.mark.parametrize(("name", "config"), SCHEDULES, ids=[f"{n}-{c}" for n, c in SCHEDULES])
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
