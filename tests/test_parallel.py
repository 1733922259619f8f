"""DataParallel gives the wrapped module's results; the first layer's input gradient can be
skipped; the harness's threaded NumPy training tracks PyTorch over 50 float32 Adam steps."""

import numpy as np
import pytest

from gradcheck import assert_close
from scratchcnn import nn, optim
from scratchcnn.harness import threads as thread_settings
from scratchcnn.harness import training
from scratchcnn.models import build_model
from scratchcnn.nn.parallel import DataParallel


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
def test_batch_coupled_layers_run_unsharded_in_training(rng, workers):
    """BatchNorm statistics (and Dropout draws) are per batch: sharding would change them."""
    model = build_model("bn-cnn", dtype=np.float64, rng=np.random.default_rng(3))
    twin = build_model("bn-cnn", dtype=np.float64, rng=np.random.default_rng(3))
    images, _ = sparse_images(rng, 8)
    runner = DataParallel(model, num_shards=2, workers=workers)
    assert_close(runner(images), twin(images), 1e-14, "training mode")
    assert runner._sharded_batch is None
    model.eval()
    twin.eval()
    with nn.no_grad():
        assert_close(runner(images), twin(images), 1e-13, "eval mode")
    assert runner._sharded_batch is not None  # eval mode has no coupling: sharded
    for net in (model, twin):  # running statistics changed in place reach every shard
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer += 0.25
    with nn.no_grad():
        assert_close(runner(images), twin(images), 1e-13, "new running statistics")


def test_batchnorm_without_running_stats_runs_unsharded_in_eval_mode(rng):
    """Without running statistics BatchNorm normalises with the batch's even in eval mode."""
    def build():
        return nn.Sequential(nn.Conv2d(1, 3, 3, dtype=np.float64, rng=np.random.default_rng(5)),
                             nn.BatchNorm2d(3, track_running_stats=False, dtype=np.float64))

    model, twin = build().eval(), build().eval()
    images, _ = sparse_images(rng, 8)
    runner = DataParallel(model, num_shards=2)
    with nn.no_grad():
        assert_close(runner(images), twin(images), 1e-13, "eval mode, batch statistics")
    assert runner._sharded_batch is None


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


def test_train_epoch_threads_agree_and_restore_first_layer(rng, monkeypatch):
    images, labels = sparse_images(rng, 96, np.float32)
    batches = [np.arange(i, i + 32) for i in range(0, 96, 32)]  # 2 shards of 16 with 2 threads
    losses = {}
    for count in (1, 2):
        monkeypatch.setattr(thread_settings, "_configured_threads", count)
        model = build_model("simple-cnn", rng=np.random.default_rng(0))
        opt = optim.Adam(model.parameters())
        losses[count] = training.train_epoch("numpy", model, opt, images, labels, batches,
                                             epoch=1)
        assert model[0].needs_input_grad  # switched off only during the epoch
    assert losses[2] == pytest.approx(losses[1], rel=1e-6)


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
