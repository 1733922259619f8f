"""DataParallel.train_step with the optimizer's step split across the worker processes
(``Optimizer.split_step``, ZeRO-1 style): the bits of ``forward_backward`` then ``step()``, for
every optimizer option, coupled models and several shards per process; the fallbacks (a
non-finite loss, gradients already there, an optimizer the workers were not forked for); and
when a step can be split at all."""

import numpy as np
import pytest

from scratchcnn import nn, optim
from scratchcnn.forked import processes_available
from scratchcnn.harness import training
from scratchcnn.models import build_model
from scratchcnn.nn.parallel import DataParallel
from scratchcnn.optim import optimizer as optimizer_module
from scratchcnn.optim.optimizer import SplitStep
from test_parallel import sparse_images
from test_shard_process import coupled_model

pytestmark = pytest.mark.skipif(not processes_available(), reason="worker processes need Linux")


def make(name, dtype, optimizer_name="adam", **options):
    """A model, its parameters laid out as the harness lays them out, and its optimizer."""
    model = coupled_model(name, dtype) if name == "small" else build_model(
        name, dtype=dtype, rng=np.random.default_rng(3))
    optimizer = training.make_optimizer("numpy", model.parameters(), optimizer_name, 1e-2,
                                        **options)
    optimizer.workers, optimizer.num_threads = "processes", 2
    return model, optimizer


def two_calls(runner, optimizer, x, y):
    """What train_step must match: forward_backward, then step() if the loss is finite."""
    loss = runner.forward_backward(x, y, nn.CrossEntropyLoss())
    if np.isfinite(loss):
        optimizer.step()
    return loss


def train(runner, model, optimizer, batches, split, zero_grad=True):
    """Per step: the loss, the parameters and their gradients, then the optimizer's state."""
    results = []
    for x, y in batches:
        if zero_grad:
            optimizer.zero_grad()
        if split:
            loss = runner.train_step(x, y, nn.CrossEntropyLoss(), optimizer)
        else:
            loss = two_calls(runner, optimizer, x, y)
        results += [loss, *(p.data.copy() for p in model.parameters()),
                    *(p.grad.copy() for p in model.parameters())]
    for state in optimizer.state_dict()["state"].values():
        results += [np.asarray(value) for value in state.values()]
    return results


def assert_same_bits(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def split_steps(monkeypatch):
    """How many split steps ran (SplitStep.finish calls)."""
    count = [0]
    finish = SplitStep.finish

    def counted(self):
        count[0] += 1
        finish(self)

    monkeypatch.setattr(SplitStep, "finish", counted)
    return count


@pytest.mark.parametrize("name, dtype, batch, shards, max_shard, optimizer_name, options", [
    ("simple-cnn", np.float32, 64, 2, None, "adam", {}),
    ("scratch-notebook-cnn", np.float64, 33, 2, None, "adamw",
     {"amsgrad": True, "weight_decay": 0.1}),
    ("tiny-cnn", np.float32, 200, 2, 40, "adam", {"maximize": True, "weight_decay": 1e-3}),
    ("small", np.float64, 12, 3, None, "adam", {}),  # BatchNorm and Dropout, two workers
])
def test_train_step_gives_the_bits_of_forward_backward_then_step(
        rng, split_steps, name, dtype, batch, shards, max_shard, optimizer_name, options):
    batches = [sparse_images(rng, batch, dtype) for _ in range(4)]
    results = {}
    for split in (False, True):
        model, optimizer = make(name, dtype, optimizer_name, **options)
        runner = DataParallel(model, shards, max_shard_size=max_shard, workers="processes")
        results[split] = train(runner, model, optimizer, batches, split)
        runner.close()
    # Every step but the first, which lays out the optimizer's state.
    assert split_steps[0] == len(batches) - 1
    assert_same_bits(results[True], results[False])


def test_an_optimizer_without_a_flat_step_takes_the_two_calls(rng, split_steps):
    batches = [sparse_images(rng, 32) for _ in range(3)]
    results = {}
    for split in (False, True):
        model, optimizer = make("tiny-cnn", np.float64, "sgd", momentum=0.9)
        runner = DataParallel(model, 2, workers="processes")
        results[split] = train(runner, model, optimizer, batches, split)
        runner.close()
    assert split_steps[0] == 0
    assert_same_bits(results[True], results[False])


def test_a_non_finite_loss_skips_the_step_and_the_workers_go_on(rng, split_steps):
    batches = [sparse_images(rng, 32) for _ in range(4)]
    batches[2][0][5, 0, 3, 3] = np.nan
    results = {}
    for split in (False, True):
        model, optimizer = make("simple-cnn", np.float64)
        runner = DataParallel(model, 2, workers="processes")
        results[split] = train(runner, model, optimizer, batches, split)
        runner.close()
    per_step = 1 + 2 * len(list(model.parameters()))
    losses = results[True][:len(batches) * per_step:per_step]
    assert [bool(np.isfinite(loss)) for loss in losses] == [True, True, False, True]
    assert split_steps[0] == 2  # steps 2 and 4
    assert_same_bits(results[True], results[False])


def test_gradients_already_there_are_added_to_as_by_the_two_calls(rng, split_steps):
    batches = [sparse_images(rng, 32) for _ in range(3)]
    results = {}
    for split in (False, True):
        model, optimizer = make("tiny-cnn", np.float64)
        runner = DataParallel(model, 2, workers="processes")
        results[split] = train(runner, model, optimizer, batches[:2], split)
        results[split] += train(runner, model, optimizer, batches[2:], split, zero_grad=False)
        runner.close()
    assert split_steps[0] == 1  # the second step; the third accumulates
    assert_same_bits(results[True], results[False])


def test_a_new_optimizer_gets_workers_forked_for_it(rng, split_steps):
    """Workers forked for the first optimizer hold its state vectors: the second's split steps
    need new ones (were the old ones used, the moments would be the first optimizer's)."""
    batches = [sparse_images(rng, 32) for _ in range(3)]
    results = {}
    for split in (False, True):
        model, first = make("tiny-cnn", np.float64)
        runner = DataParallel(model, 2, workers="processes")
        results[split] = train(runner, model, first, batches, split)
        second = optim.Adam(model.parameters(), lr=3e-3, betas=(0.8, 0.9))
        second.workers, second.num_threads = "processes", 2
        results[split] += train(runner, model, second, batches, split)
        runner.close()
    assert split_steps[0] == 4
    assert_same_bits(results[True], results[False])


def test_split_step_needs_one_laid_out_group_with_empty_gradients(rng):
    model, optimizer = make("tiny-cnn", np.float64)
    params = list(model.parameters())
    assert optimizer.split_step(params, 2) is None  # the first step lays out the state
    for param in params:
        param.grad = np.ones_like(param.data)
    optimizer.step()
    assert optimizer.split_step(params, 2) is None  # backward would add to these gradients
    optimizer.zero_grad()
    plan = optimizer.split_step(params, 2)
    assert isinstance(plan, SplitStep) and plan.step == 1
    assert plan.pieces % 2 == 0  # as many blocks for each process
    assert optimizer.split_step(params[::-1], 2) is None
    assert optimizer.split_step(params[:-1], 2) is None
    optimizer.workers = "threads"
    assert optimizer.split_step(params, 2) is None
    optimizer.workers = "processes"

    optimizer.load_state_dict(optimizer.state_dict())  # state arrays no longer the flat views
    assert optimizer.split_step(params, 2) is None
    for param in params:
        param.grad = np.ones_like(param.data)
    optimizer.step()  # gathers them back
    optimizer.zero_grad()
    assert optimizer.split_step(params, 2) is not None

    two_groups = optim.Adam([{"params": params[:2]}, {"params": params[2:]}])
    two_groups.workers = "processes"
    assert two_groups.split_step(params, 2) is None


def test_blocks_are_dealt_evenly(rng):
    model, optimizer = make("scratch-notebook-cnn", np.float32)
    params = list(model.parameters())
    for param in params:
        param.grad = np.ones_like(param.data)
    optimizer.step()
    flat = optimizer._flat_groups[0]
    blocks = optimizer_module._block_count(flat)
    assert blocks % 2 == 1  # 402k floats: 7 blocks of 256 KB
    assert optimizer_module._block_count(flat, 2) == blocks + 1


def test_a_scheduled_learning_rate_reaches_the_workers_every_step(rng, split_steps):
    batches = [sparse_images(rng, 32) for _ in range(5)]
    results = {}
    for split in (False, True):
        model, optimizer = make("tiny-cnn", np.float64)
        scheduler = optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.3)
        runner = DataParallel(model, 2, workers="processes")
        results[split] = []
        for batch in batches:
            results[split] += train(runner, model, optimizer, [batch], split)
            scheduler.step()
        runner.close()
    assert split_steps[0] == len(batches) - 1
    assert_same_bits(results[True], results[False])


def test_an_error_in_a_workers_part_is_raised_here_and_the_runner_recovers(rng, monkeypatch):
    model, optimizer = make("tiny-cnn", np.float64)
    runner = DataParallel(model, 2, workers="processes")
    batches = [sparse_images(rng, 32) for _ in range(3)]
    train(runner, model, optimizer, batches[:1], split=True)  # lays out the optimizer's state

    def fails(*args):
        raise FloatingPointError("the worker's part failed")

    # Patched before the workers fork (the split needs new ones, forked for this state).
    monkeypatch.setattr(optimizer_module, "run_split_part", fails)
    optimizer.zero_grad()
    with pytest.raises(FloatingPointError, match="worker's part failed"):
        runner.train_step(*batches[1], nn.CrossEntropyLoss(), optimizer)
    assert runner._processes is None  # closed: the next call forks afresh
    monkeypatch.undo()
    optimizer.zero_grad()
    loss = runner.train_step(*batches[2], nn.CrossEntropyLoss(), optimizer)
    assert np.isfinite(loss)
    assert all(np.isfinite(p.data).all() for p in model.parameters())
    runner.close()
