"""DataParallel gives the wrapped module's results, BatchNorm2d and Dropout models included
(whole-batch statistics and masks through nn.collective); the first layer's input gradient can be
skipped; the harness's threaded NumPy training tracks PyTorch over 50 float32 Adam steps."""

import threading

import numpy as np
import pytest

from gradcheck import assert_close
from scratchcnn import nn, optim
from scratchcnn.harness import threads as thread_settings
from scratchcnn.harness import training
from scratchcnn.models import build_model
from scratchcnn.nn import parallel
from scratchcnn.nn.collective import BatchGroup
from scratchcnn.nn.parallel import DataParallel
from scratchcnn.nn.process_collective import HubShard
from scratchcnn.nn.replica import BATCH_AWARE


def sparse_images(rng, n, dtype=np.float64):
    """Mostly-zero images (ties in pooling, dead ReLUs), normalised like MNIST."""
    raw = rng.random((n, 1, 28, 28)) * (rng.random((n, 1, 28, 28)) < 0.3)
    return ((raw - 0.13) / 0.31).astype(dtype), rng.integers(0, 10, n)


def forward_backward(runner, model, images, labels):
    """Loss, input gradient and copies of every parameter gradient of one step."""
    model.zero_grad()
    criterion = nn.CrossEntropyLoss()
    loss = criterion(runner(images), labels)
    grad_input = runner.backward(criterion.backward())
    return loss, grad_input, [p.grad.copy() for p in model.parameters()]


WORKERS = pytest.mark.parametrize("workers", ["threads", "processes"])


@WORKERS
@pytest.mark.parametrize("batch, shards", [(10, 2), (7, 3), (64, 2)])
def test_sharded_step_equals_whole_batch(rng, batch, shards, workers):
    model = build_model("simple-cnn", dtype=np.float64, rng=rng)
    images, labels = sparse_images(rng, batch)
    loss, grad_input, grads = forward_backward(model, model, images, labels)
    runner = DataParallel(model, num_shards=shards, workers=workers)
    loss_p, grad_input_p, grads_p = forward_backward(runner, model, images, labels)
    assert runner._sharded_batch is not None and len(runner._sharded_batch) == shards
    assert_close(loss_p, loss, 1e-14, "loss")
    assert_close(grad_input_p, grad_input, 1e-13, "input gradient")
    pairs = zip(grads_p, grads, strict=True)
    for name, (got, want) in zip(dict(model.named_parameters()), pairs, strict=True):
        assert got.dtype == want.dtype
        assert_close(got, want, 1e-13, name)


@WORKERS
def test_gradients_accumulate_and_replicas_follow_new_weights(rng, workers):
    model = build_model("tiny-cnn", dtype=np.float64, rng=rng)
    runner = DataParallel(model, num_shards=2, workers=workers)
    images, labels = sparse_images(rng, 6)
    _, _, first = forward_backward(runner, model, images, labels)
    criterion = nn.CrossEntropyLoss()  # a second backward without zero_grad adds up
    criterion(runner(images), labels)
    runner.backward(criterion.backward())
    for param, grad in zip(model.parameters(), first, strict=True):
        assert_close(param.grad, 2 * grad, 1e-14)

    # Weights replaced (load_state_dict in place) or rebound (to()) reach the replicas.
    other = build_model("tiny-cnn", dtype=np.float64, rng=np.random.default_rng(7))
    model.load_state_dict(other.state_dict())
    assert_close(runner(images), other(images), 1e-14, "after load_state_dict")
    model.float()
    out = runner(images.astype(np.float32))
    assert out.dtype == np.float32
    assert_close(out, other(images), 1e-5, "after float()")


@WORKERS
def test_flattened_gradients_are_summed_in_place_and_still_accumulate(rng, workers):
    """With flatten_parameters' gradient buffers, the shards' sum is written into them (no
    extra copy for the optimizer); a second backward without zero_grad still adds up."""
    model = build_model("tiny-cnn", dtype=np.float64, rng=rng)
    nn.flatten_parameters(model.parameters())
    images, labels = sparse_images(rng, 8)
    more_images, more_labels = sparse_images(rng, 8)
    _, _, whole = forward_backward(model, model, images, labels)
    _, _, more = forward_backward(model, model, more_images, more_labels)
    runner = DataParallel(model, num_shards=2, workers=workers)
    _, _, sharded = forward_backward(runner, model, images, labels)
    for param, got, want in zip(model.parameters(), sharded, whole, strict=True):
        assert param.grad is param.grad_buffer
        assert_close(got, want, 1e-13)
    runner.forward_backward(more_images, more_labels, nn.CrossEntropyLoss())
    for param, first, second in zip(model.parameters(), whole, more, strict=True):
        assert_close(param.grad, first + second, 1e-13)
    runner.close()


def test_later_replicas_add_their_gradients_into_the_first(rng):
    """backward_into_first: the group's gradient sum builds up in the first replica's arrays, in
    replica order, also for a parameter the first replica got no gradient for."""
    from scratchcnn.nn.replica import backward_into_first, replicate

    model = nn.Linear(3, 2, dtype=np.float64, rng=rng)
    replicas = [replicate(model) for _ in range(3)]
    grads = [rng.standard_normal((2, 3)) for _ in replicas]

    def run(replica, index):
        if index:  # the first replica's weight gets no gradient, its bias one
            replica.weight.accumulate_grad(grads[index])
        replica.bias.accumulate_grad(np.full(2, float(index + 1)))
        return index

    assert backward_into_first(replicas, run) == [0, 1, 2]
    first = replicas[0]
    np.testing.assert_array_equal(first.weight.grad, grads[1] + grads[2])
    np.testing.assert_array_equal(first.bias.grad, np.full(2, 6.0))
    assert all(p.grad is None for replica in replicas[1:] for p in replica.parameters())


def small_bn_model(rng, **bn_options):
    """Conv -> BatchNorm -> ReLU -> Dropout -> Linear on (N, 2, 5, 5) inputs, float64."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False, dtype=np.float64, rng=rng),  # BN: no bias
        nn.BatchNorm2d(4, dtype=np.float64, **bn_options), nn.ReLU(),
        nn.Dropout(0.3, rng=rng), nn.Flatten(), nn.Linear(4 * 5 * 5, 3, dtype=np.float64, rng=rng),
    )


def twin_models(name, seed, **bn_options):
    """Two identical models, Dropout generators included (same seed, same state)."""
    if name == "small":
        return [small_bn_model(np.random.default_rng(seed), **bn_options) for _ in range(2)]
    return [build_model(name, dtype=np.float64, rng=np.random.default_rng(seed))
            for _ in range(2)]


def assert_same_step(model, twin, runner, images, labels, tol=1e-12):
    """One step of ``twin`` unsharded and of ``model`` through ``runner``: same loss, input
    gradient, parameter gradients and buffers (running statistics, num_batches_tracked)."""
    loss, grad_input, grads = forward_backward(twin, twin, images, labels)
    loss_p, grad_input_p, grads_p = forward_backward(runner, model, images, labels)
    assert_close(loss_p, loss, tol, "loss")
    assert_close(grad_input_p, grad_input, tol, "input gradient")
    names = dict(model.named_parameters())
    for name, got, want in zip(names, grads_p, grads, strict=True):
        assert got.dtype == want.dtype
        assert_close(got, want, tol, name)
    buffers = dict(twin.named_buffers())
    assert list(dict(model.named_buffers())) == list(buffers)
    for name, value in model.named_buffers():
        assert value.dtype == buffers[name].dtype
        assert_close(value, buffers[name], tol, name)


@WORKERS
@pytest.mark.parametrize("name, batch", [("bn-cnn", 7), ("small", 9)])
@pytest.mark.parametrize("shards", [2, 3])
def test_batchnorm_and_dropout_shard_like_the_whole_batch(rng, name, batch, shards, workers):
    """Like torch's SyncBatchNorm: batch statistics, their gradients, the running statistics and
    the dropout masks are the whole batch's, so a sharded step is the unsharded one, the shards
    meeting in threads or in worker processes as ``workers`` says."""
    model, twin = twin_models(name, 3)
    model[0].needs_input_grad = twin[0].needs_input_grad = True
    runner = DataParallel(model, num_shards=shards, max_shard_size=2,  # ignored: coupled
                          workers=workers)
    for step in range(2):  # the second step: running statistics updated twice, fresh masks
        images, labels = sparse_images(rng, batch)
        if name == "small":
            images = rng.standard_normal((batch, 2, 5, 5)) + step
            labels = labels % 3
        assert_same_step(model, twin, runner, images, labels)
        assert runner._sharded_batch is not None and len(runner._sharded_batch) == shards
        assert runner._coupled and (runner._processes is not None) == (workers == "processes")
    tracked = [int(b) for key, b in model.named_buffers() if key.endswith("num_batches_tracked")]
    assert tracked and set(tracked) == {2}  # once per call, not once per shard

    model.eval()  # running statistics: no coupling, sharded like any layer (max_shard_size too)
    twin.eval()
    with nn.no_grad():
        assert_close(runner(images), twin(images), 1e-13, "eval mode")
    assert len(runner._sharded_batch) == max(shards, -(-batch // 2))
    assert not runner._coupled and (runner._processes is not None) == (workers == "processes")
    for net in (model, twin):  # running statistics changed in place reach every shard
        for key, buffer in net.named_buffers():
            if key.endswith("running_mean"):
                buffer += 0.25
    with nn.no_grad():
        assert_close(runner(images), twin(images), 1e-13, "new running statistics")
    model.float()  # the replicas (and workers) follow rebound buffers too
    with nn.no_grad():
        assert_close(runner(images.astype(np.float32)), twin(images), 1e-5, "after float()")
    runner.close()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_statistics_land_in_the_module_buffers(rng, dtype):
    """One shard updates the running statistics in place, in the wrapped module's own arrays,
    also after ``to()`` rebinds them, even back to the dtype the replicas were made for."""
    model, twin = twin_models("small", 4)
    runner = DataParallel(model, num_shards=2)
    bn, twin_bn = model[1], twin[1]

    def step_and_compare(label):
        before = bn.running_mean, bn.running_var, bn.num_batches_tracked
        x = (rng.standard_normal((6, 2, 5, 5)) * 2 + 1).astype(bn.running_mean.dtype)
        y = rng.integers(0, 3, 6)
        forward_backward(runner, model, x, y)
        forward_backward(twin, twin, x, y)
        assert runner._sharded_batch == [3, 3]
        after = bn.running_mean, bn.running_var, bn.num_batches_tracked
        assert all(now is then for now, then in zip(after, before, strict=True))  # in place
        tol = 1e-5 if bn.running_mean.dtype == np.float32 else 1e-13
        for key in ("running_mean", "running_var"):
            got, want = getattr(bn, key), getattr(twin_bn, key)
            assert got.dtype == want.dtype == x.dtype
            assert_close(got, want, tol, f"{key} {label}")
        assert int(bn.num_batches_tracked) == int(twin_bn.num_batches_tracked)

    model.to(dtype)
    twin.to(dtype)
    step_and_compare("first step")
    step_and_compare("second step")
    for net in (model, twin):  # rebound twice; the signature is the replicas' again
        net.to(np.float32 if dtype == np.float64 else np.float64)
        net.to(dtype)
    step_and_compare("after to() and back")
    bn.running_mean = np.zeros(4, dtype)  # rebound by hand: same signature too
    twin_bn.running_mean = np.zeros(4, dtype)
    step_and_compare("after assigning running_mean")
    assert int(bn.num_batches_tracked) == 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shards", [2, 3])
def test_dropout_masks_do_not_depend_on_sharding(dtype, shards):
    x = np.ones((7, 3, 4, 5), dtype=dtype)
    whole = nn.Dropout(0.5, rng=np.random.default_rng(8))
    sharded = nn.Dropout(0.5, rng=np.random.default_rng(8))
    runner = DataParallel(nn.Sequential(sharded), num_shards=shards)
    for _ in range(2):
        out = runner(x)
        assert runner._sharded_batch is not None
        np.testing.assert_array_equal(out, whole(x))
        upstream = np.arange(x.size, dtype=dtype).reshape(x.shape)
        np.testing.assert_array_equal(runner.backward(upstream), whole.backward(upstream))
    # The generator advanced exactly as the unsharded draws did.
    assert sharded.rng.random() == whole.rng.random()


@pytest.mark.parametrize("options", [dict(momentum=None), dict(track_running_stats=False),
                                     dict(affine=False), dict(bias=False)])
def test_batchnorm_options_shard_like_the_whole_batch(rng, options):
    model, twin = twin_models("small", 5, **options)
    runner = DataParallel(model, num_shards=3)
    for step in range(3):
        images = rng.standard_normal((8, 2, 5, 5)) * (step + 1)
        assert_same_step(model, twin, runner, images, rng.integers(0, 3, 8))
    model.eval()
    twin.eval()
    images = rng.standard_normal((8, 2, 5, 5))
    # Without running statistics, eval mode normalises with the batch's: still coupled.
    assert_same_step(model, twin, runner, images, rng.integers(0, 3, 8))
    assert len(runner._sharded_batch) == 3


@WORKERS
def test_batchnorm_without_running_stats_shards_with_batch_statistics_in_eval_mode(rng, workers):
    """Without running statistics BatchNorm normalises with the batch's even in eval mode: the
    shards combine theirs and give the unsharded result."""
    def build():
        return nn.Sequential(nn.Conv2d(1, 3, 3, dtype=np.float64, rng=np.random.default_rng(5)),
                             nn.BatchNorm2d(3, track_running_stats=False, dtype=np.float64))

    model, twin = build().eval(), build().eval()
    images, _ = sparse_images(rng, 8)
    runner = DataParallel(model, num_shards=2, max_shard_size=2, workers=workers)
    with nn.no_grad():
        assert_close(runner(images), twin(images), 1e-13, "eval mode, batch statistics")
    assert runner._sharded_batch == [4, 4] and runner._coupled
    assert (runner._processes is not None) == (workers == "processes")
    # Each shard alone would be normalised with its own statistics: far from the batch's.
    with nn.no_grad():
        alone = model(images[:4])
    assert np.abs(alone - twin(images)[:4]).max() > 1e-3


def test_batchnorm_shards_of_one_value_per_channel_use_the_whole_batch(rng):
    """Statistics are over the whole batch: only a whole batch of M <= 1 values is an error."""
    layer = nn.BatchNorm2d(2, dtype=np.float64)
    twin = nn.BatchNorm2d(2, dtype=np.float64)
    runner = DataParallel(nn.Sequential(layer), num_shards=3)
    x = rng.standard_normal((3, 2, 1, 1))
    upstream = rng.standard_normal(x.shape)
    assert_close(runner(x), twin(x), 1e-14, "output")
    assert runner._sharded_batch == [1, 1, 1]
    assert_close(runner.backward(upstream), twin.backward(upstream), 1e-14, "input gradient")
    assert_close(layer.weight.grad, twin.weight.grad, 1e-14, "weight gradient")
    assert_close(layer.running_var, twin.running_var, 1e-14, "running_var")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        runner(x[:1])


class Fail(nn.Module):
    """The identity, or a FloatingPointError in ``forward``/``backward`` when told to."""

    fail_in = None

    def forward(self, x):
        if self.fail_in == "forward":
            raise FloatingPointError("this shard fails")
        return x

    def backward(self, grad_output):
        if self.fail_in == "backward":
            raise FloatingPointError("this shard fails")
        return grad_output


@pytest.mark.parametrize("rank", [0, 2])  # the shard on this thread, or one on a pool thread
@pytest.mark.parametrize("fail_in", ["forward", "backward"])
def test_a_failing_shard_releases_the_others_and_its_error_propagates(rng, rank, fail_in):
    # The failing shard has passed the first BatchNorm's barriers; the others wait at the next.
    model = nn.Sequential(nn.BatchNorm2d(2, dtype=np.float64), nn.Dropout(0.5), Fail(),
                          nn.BatchNorm2d(2, dtype=np.float64))
    runner = DataParallel(model, num_shards=3)  # threads (test_shard_process: processes)
    x = rng.standard_normal((6, 2, 3, 3))
    runner.backward(runner(x))  # makes the replicas
    runner._replicas[rank][2].fail_in = fail_in
    error = run_briefly(lambda: runner.backward(runner(x)))
    assert isinstance(error, FloatingPointError)  # not BrokenBarrierError
    assert all(layer.batch_shard is None for replica in runner._replicas
               for layer in replica.modules() if isinstance(layer, BATCH_AWARE))
    # Nothing is left behind: the next step runs normally.
    runner._replicas[rank][2].fail_in = None
    out = runner(x)
    assert runner._sharded_batch == [2, 2, 2]
    assert runner.backward(out).shape == x.shape


def test_dataparallel_rejects_bad_arguments(rng):
    with pytest.raises(ValueError, match="num_shards"):
        DataParallel(nn.ReLU(), num_shards=0)
    with pytest.raises(TypeError, match="Module"):
        DataParallel(np.zeros(3))
    runner = DataParallel(build_model("tiny-cnn", rng=rng))
    runner(sparse_images(rng, 4, np.float32)[0])
    with pytest.raises(ValueError, match="grad_output"):
        runner.backward(np.zeros((3, 10), np.float32))


@pytest.mark.parametrize("layer", [nn.Conv2d(2, 3, 3, padding=1), nn.Linear(5, 4)])
def test_skipping_input_grad_keeps_parameter_grads(rng, layer):
    x = rng.standard_normal((4, 2, 6, 6) if isinstance(layer, nn.Conv2d) else (4, 5))
    layer.double()
    out = layer(x)
    grad_out = rng.standard_normal(out.shape)
    assert layer.backward(grad_out) is not None
    grads = [p.grad.copy() for p in layer.parameters()]
    layer.zero_grad()
    layer.needs_input_grad = False
    layer(x)
    assert layer.backward(grad_out) is None
    for param, grad in zip(layer.parameters(), grads, strict=True):
        assert_close(param.grad, grad, 0.0)


@pytest.mark.parametrize("name, groups", [("simple-cnn", 0), ("bn-cnn", 3)])
def test_train_epoch_threads_agree_and_restore_first_layer(rng, monkeypatch, name, groups):
    images, labels = sparse_images(rng, 96)  # float64: float32 noise grows over Adam steps
    batches = [np.arange(i, i + 32) for i in range(0, 96, 32)]  # 2 shards of 16 with 2 threads
    # (shards, batch size) of each meeting: bn-cnn's shards meet once per step (forward and
    # backward in one pass, forward_backward), in a BatchGroup (threads) or around a HubShard
    # (the harness's worker processes).
    made = []

    def counted_group(sizes):
        made.append([len(sizes), sum(sizes)])
        return BatchGroup(sizes)

    def counted_hub(workers, rows, batch_size):
        made.append([len(workers) + 1, batch_size])
        return HubShard(workers, rows, batch_size)

    monkeypatch.setattr(parallel, "BatchGroup", counted_group)
    monkeypatch.setattr(parallel, "HubShard", counted_hub)
    losses, states = {}, {}
    for count in (1, 2):
        monkeypatch.setattr(thread_settings, "_configured_threads", count)
        # Same weights and, drawn from the same generator, the same dropout masks.
        model = build_model(name, dtype=np.float64, rng=np.random.default_rng(0))
        opt = optim.Adam(model.parameters())
        losses[count] = training.train_epoch("numpy", model, opt, images, labels, batches,
                                             epoch=1)
        assert model[0].needs_input_grad  # switched off only during the epoch
        states[count] = model.state_dict()
    assert made == [[2, 32]] * groups
    assert losses[2] == pytest.approx(losses[1], rel=1e-12)
    for key, value in states[2].items():  # weights and running statistics alike
        assert_close(value, states[1][key], 1e-9, key)


def test_harness_shards_training_and_inference_to_their_own_sizes(rng, monkeypatch):
    """Training batches split into shards of up to TRAIN_MAX_SHARD_SIZE, inference batches into
    shards of up to EVAL_MAX_SHARD_SIZE, with one runner (and one pair of workers) for both."""
    monkeypatch.setattr(thread_settings, "_configured_threads", 2)
    monkeypatch.setattr(training, "TRAIN_MAX_SHARD_SIZE", 20)
    monkeypatch.setattr(training, "EVAL_MAX_SHARD_SIZE", 10)
    monkeypatch.setattr(training, "MIN_SHARD_SIZE", 1)
    planned = []
    original = DataParallel._shard_sizes

    def recorded(self, n, coupled):
        planned.append(original(self, n, coupled))
        return planned[-1]

    monkeypatch.setattr(DataParallel, "_shard_sizes", recorded)
    model = build_model("tiny-cnn", dtype=np.float64, rng=rng)
    images, labels = sparse_images(rng, 40)
    training.train_epoch("numpy", model, optim.Adam(model.parameters()), images, labels,
                         [np.arange(40)], epoch=1)
    training.evaluate("numpy", model, images, labels, batch_size=40)
    assert planned == [[20, 20], [10, 10, 10, 10]]


def test_harness_shards_small_batches_of_heavy_models_only(monkeypatch):
    """The smallest shard is sized by work: bn-cnn (37 MFLOP an image) splits a batch of 10 in
    two, simple-cnn (2.4 MFLOP) keeps it whole and splits from two shards of MIN_SHARD_SIZE."""
    monkeypatch.setattr(thread_settings, "_configured_threads", 2)
    heavy = training._numpy_runner(build_model("bn-cnn"), None, (1, 28, 28))
    assert heavy._shard_sizes(10, coupled=True) == [5, 5]
    assert heavy._shard_sizes(3, coupled=True) == [3]
    light = training._numpy_runner(build_model("simple-cnn"), None, (1, 28, 28))
    assert light._shard_sizes(10, coupled=False) == [10]
    assert light._shard_sizes(2 * training.MIN_SHARD_SIZE, coupled=False) == [16, 16]
    light.close()


def test_float32_adam_50_steps_track_pytorch(rng, torch, monkeypatch):
    """The harness's threaded float32 path, step for step against PyTorch's."""
    monkeypatch.setattr(thread_settings, "_configured_threads", 2)
    from scratchcnn.reference.torch_models import torch_twin

    images, labels = sparse_images(rng, 50 * 32, np.float32)
    batches = list(np.arange(len(labels)).reshape(50, 32))  # sharded when 2+ threads
    model = build_model("simple-cnn", rng=np.random.default_rng(1))
    twin = torch_twin(model, "simple-cnn")
    step_losses: dict[str, list[float]] = {"numpy": [], "torch": []}
    opts = {"numpy": optim.Adam(model.parameters()), "torch": torch.optim.Adam(twin.parameters())}
    for name, net in (("numpy", model), ("torch", twin)):
        training.train_epoch(name, net, opts[name], images, labels, batches, epoch=1,
                             progress=step_losses[name].append)
    assert len(step_losses["numpy"]) == 50
    # The loss after the 50th update, on fresh data.
    test_x, test_y = sparse_images(rng, 200, np.float32)
    after = [training.evaluate(name, net, test_x, test_y).loss
             for name, net in (("numpy", model), ("torch", twin))]
    assert after[0] == pytest.approx(after[1], rel=1e-5)
    initial = build_model("simple-cnn", rng=np.random.default_rng(1))
    moved = [np.abs(p.data - q.data).max() for p, q in zip(model.parameters(),
                                                           initial.parameters(), strict=True)]
    assert min(moved) > 1e-3  # 50 updates of lr 1e-3 really happened
    np.testing.assert_allclose(step_losses["numpy"], step_losses["torch"], rtol=1e-5)


def test_max_shard_size_splits_large_batches_with_same_results(rng):
    model = build_model("lenet5", dtype=np.float64, rng=rng)
    images, labels = sparse_images(rng, 23)
    loss, grad_input, grads = forward_backward(model, model, images, labels)
    for threads in (1, 2):
        runner = DataParallel(model, num_shards=threads, max_shard_size=5)
        loss_p, grad_input_p, grads_p = forward_backward(runner, model, images, labels)
        assert runner._sharded_batch == [5, 5, 5, 4, 4]
        assert_close(loss_p, loss, 1e-14, "loss")
        assert_close(grad_input_p, grad_input, 1e-13, "input gradient")
        for got, want in zip(grads_p, grads, strict=True):
            assert_close(got, want, 1e-13)
        small = rng.standard_normal((3, 1, 28, 28))  # fewer replicas than last time
        with nn.no_grad():
            assert_close(runner(small), model(small), 1e-14)
    with pytest.raises(ValueError, match="max_shard_size"):
        DataParallel(model, max_shard_size=0)


def test_min_shard_size_keeps_small_batches_whole(rng):
    model = build_model("tiny-cnn", rng=rng)
    runner = DataParallel(model, num_shards=2, min_shard_size=16)
    runner(sparse_images(rng, 31, np.float32)[0])
    assert runner._sharded_batch is None
    runner(sparse_images(rng, 32, np.float32)[0])
    assert runner._sharded_batch == [16, 16]


def run_briefly(step):
    """``step()`` in a thread that must end within 60 s (a hang fails the test): its error."""
    outcome = {}

    def guarded():
        try:
            step()
        except BaseException as error:
            outcome["error"] = error

    caller = threading.Thread(target=guarded, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "a shard waits forever for a collective or at a barrier"
    return outcome.get("error")


def split_step(runner, model, images, labels, criterion):
    """The loss and parameter gradients of forward, loss and backward as three calls."""
    model.zero_grad()
    loss = criterion(runner(images), labels)
    runner.backward(criterion.backward())
    return loss, [p.grad.copy() for p in model.parameters()]


def fused_step(runner, model, images, labels, criterion):
    """The same through DataParallel.forward_backward."""
    model.zero_grad()
    loss = runner.forward_backward(images, labels, criterion)
    return loss, [p.grad.copy() for p in model.parameters()]


@WORKERS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [{}, {"reduction": "sum"},
                                     {"ignore_index": 3, "label_smoothing": 0.1}])
@pytest.mark.parametrize("name, batch, shards, max_shard",
                         [("simple-cnn", 64, 2, None), ("simple-cnn", 50, 2, 16),
                          ("bn-cnn", 12, 3, None)])
def test_forward_backward_gives_the_three_calls_bits(rng, workers, dtype, options, name, batch,
                                                     shards, max_shard):
    """One pass per shard (forward, its part of the loss, backward): the same loss and the same
    parameter gradients, bit for bit, as forward, criterion and backward called in turn; also
    for BatchNorm/Dropout shards meeting in collectives (bn-cnn in training mode)."""
    images, labels = sparse_images(rng, batch, dtype)
    results = {}
    for step in (split_step, fused_step):
        model = build_model(name, dtype=dtype, rng=np.random.default_rng(1))
        model.train()
        for layer in model.modules():
            if isinstance(layer, nn.Dropout):
                layer.rng = np.random.default_rng(2)  # the same masks in both runs
        runner = DataParallel(model, shards, max_shard_size=max_shard, workers=workers)
        criterion = nn.CrossEntropyLoss(**options)
        losses_and_grads = [step(runner, model, images, labels, criterion) for _ in range(2)]
        if step is fused_step:
            assert runner._backward_done  # it did run sharded and fused
        results[step.__name__] = losses_and_grads
        runner.close()
    for (loss_a, grads_a), (loss_b, grads_b) in zip(results["split_step"],
                                                    results["fused_step"], strict=True):
        assert np.asarray(loss_b).dtype == dtype
        np.testing.assert_array_equal(loss_b, loss_a)
        for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
            np.testing.assert_array_equal(grad_b, grad_a)


def test_forward_backward_with_class_weights_takes_the_three_calls(rng):
    images, labels = sparse_images(rng, 32)
    model = build_model("simple-cnn", dtype=np.float64, rng=np.random.default_rng(1))
    runner = DataParallel(model, 2)
    criterion = nn.CrossEntropyLoss(weight=np.linspace(0.5, 2, 10))
    expected = split_step(runner, model, images, labels, criterion)
    got = fused_step(runner, model, images, labels, criterion)
    np.testing.assert_array_equal(got[0], expected[0])
    for grad_a, grad_b in zip(expected[1], got[1], strict=True):
        np.testing.assert_array_equal(grad_b, grad_a)


def test_forward_backward_checks_its_target_and_leaves_no_backward(rng):
    images, labels = sparse_images(rng, 32)
    model = build_model("tiny-cnn", dtype=np.float64, rng=rng)
    runner = DataParallel(model, 2)
    criterion = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"shape \(31,\); expected integer class indices"):
        runner.forward_backward(images, labels[:-1], criterion)
    with pytest.raises(ValueError, match="float64 array"):
        runner.forward_backward(images, labels.astype(np.float64), criterion)
    with nn.no_grad(), pytest.raises(RuntimeError, match="outside no_grad"):
        runner.forward_backward(images, labels, criterion)
    with pytest.raises(ValueError, match="reduction='none'"):
        runner.forward_backward(images, labels, nn.CrossEntropyLoss(reduction="none"))
    runner.forward_backward(images, labels, criterion)
    with pytest.raises(RuntimeError, match="already ran"):
        runner.backward(np.ones((32, 10)))
    runner(images)  # a new forward makes backward legal again
    runner.backward(np.ones((32, 10)) / 32)
