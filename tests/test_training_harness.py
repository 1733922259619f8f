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
