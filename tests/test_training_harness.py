"""harness.training lays NumPy parameters end to end, so the optimizer takes its flat path."""

import numpy as np

from scratchcnn.harness.training import make_optimizer, train_epoch
from scratchcnn.models import build_model


def test_numpy_optimizer_updates_one_flat_vector_with_the_same_result(rng):
    images = rng.standard_normal((96, 1, 28, 28)).astype(np.float32)
    labels = np.arange(96) % 10
    batches = [np.arange(48), np.arange(48, 96)]
    results = []
    for flat in (True, False):
        model = build_model("tiny-cnn", rng=np.random.default_rng(0))
        optimizer = make_optimizer("numpy", model.parameters(), "adam", 1e-3)
        if not flat:
            optimizer._supports_flat = False
        train_epoch("numpy", model, optimizer, images, labels, batches, epoch=1)
        assert bool(optimizer._flat_groups) is flat
        results.append(model.state_dict())
    for key, value in results[0].items():
        np.testing.assert_array_equal(value, results[1][key])


def test_strong_recipe_trains_identically_in_both_frameworks_without_dropout(torch, rng):
    """bn-cnn through the accuracy targets' loop: AdamW with weight decay, warm-up + cosine
    schedule, BatchNorm in training and eval mode. With Dropout off (its masks come from each
    framework's own generator) the two frameworks must agree to rounding, epoch after epoch."""
    from scratchcnn.harness.compare import make_lr_schedulers
    from scratchcnn.harness.training import evaluate
    from scratchcnn.reference.torch_models import torch_twin

    images = np.where(rng.random((64, 1, 28, 28)) < 0.3, rng.standard_normal((64, 1, 28, 28)),
                      -0.4)
    labels = rng.integers(0, 10, 64)
    batches = [np.arange(start, start + 16) for start in range(0, 64, 16)]
    model = build_model("bn-cnn", dtype=np.float64, rng=np.random.default_rng(1))
    for layer in model:
        if type(layer).__name__ == "Dropout":
            layer.p = 0.0
    twin = torch_twin(model, "bn-cnn").double()
    for layer in twin:
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    sides = {}
    for framework, net in (("numpy", model), ("torch", twin)):
        optimizer = make_optimizer(framework, net.parameters(), "adamw", 3e-3, weight_decay=0.05)
        schedulers = make_lr_schedulers(framework, optimizer, "cosine", 3, warmup_epochs=1)
        sides[framework] = (net, optimizer, schedulers)
    for epoch in (1, 2, 3):
        results = {}
        for framework, (net, optimizer, schedulers) in sides.items():
            loss = train_epoch(framework, net, optimizer, images, labels, batches, epoch=epoch)
            for scheduler in schedulers:
                scheduler.step()
            evaluation = evaluate(framework, net, images, labels)
            results[framework] = (loss, evaluation.loss, optimizer.param_groups[0]["lr"])
        (loss, eval_loss, lr), (torch_loss, torch_eval_loss, torch_lr) = results.values()
        assert abs(loss - torch_loss) <= 1e-10 * abs(torch_loss), (epoch, loss, torch_loss)
        assert abs(eval_loss - torch_eval_loss) <= 1e-10 * abs(torch_eval_loss), epoch
        assert lr == torch_lr, (epoch, lr, torch_lr)
