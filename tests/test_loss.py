"""CrossEntropyLoss against torch.nn.CrossEntropyLoss: values, gradients, options, extreme logits,
dtypes and target validation."""

import numpy as np
import pytest

from gradcheck import assert_close, numerical_gradient
from scratchcnn.nn import CrossEntropyLoss, no_grad


def run_both(torch, logits, target, upstream=None, **options):
    ours = CrossEntropyLoss(**options)
    loss = ours(logits, target)
    torch_options = dict(options)
    if options.get("weight") is not None:
        torch_options["weight"] = torch.from_numpy(options["weight"])
    logits_t = torch.from_numpy(logits).requires_grad_()
    loss_t = torch.nn.CrossEntropyLoss(**torch_options)(logits_t, torch.from_numpy(target))
    if upstream is None:
        grad = ours.backward()
        loss_t.backward()
    else:
        grad = ours.backward(upstream)
        loss_t.backward(torch.from_numpy(upstream))
    assert_close(np.asarray(loss), loss_t.detach().numpy(), what="loss")
    assert_close(grad, logits_t.grad.numpy(), what="grad wrt logits")
    return loss, grad


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.15},
    {"weight": "random"},
    {"weight": "random", "label_smoothing": 0.3},
    {"ignore_index": 1},
    {"weight": "random", "ignore_index": 2, "label_smoothing": 0.2, "reduction": "mean"},
    {"ignore_index": 0, "label_smoothing": 0.1, "reduction": "none"},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("seed", range(3))
def test_matches_torch(torch, seed, options):
    rng = np.random.default_rng(seed)
    n, classes = int(rng.integers(3, 20)), int(rng.integers(3, 11))
    options = dict(options)
    if options.get("weight") == "random":
        options["weight"] = rng.uniform(0.2, 2.0, classes)
    logits = rng.standard_normal((n, classes)) * 3
    target = rng.integers(0, classes, n)
    if "ignore_index" in options:
        target[: n // 3 + 1] = options["ignore_index"]  # some ignored, some not
        target[-1] = (options["ignore_index"] + 1) % classes
    upstream = rng.standard_normal(n) if options.get("reduction") == "none" else None
    run_both(torch, logits, target, upstream, **options)


def test_default_gradient_is_softmax_minus_onehot_over_n(rng):
    logits = rng.standard_normal((5, 4))
    target = np.array([0, 3, 1, 1, 2])
    loss_fn = CrossEntropyLoss()
    loss = loss_fn(logits, target)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(loss, -np.mean(np.log(softmax[np.arange(5), target])))
    np.testing.assert_allclose(loss_fn.backward(), (softmax - np.eye(4)[target]) / 5)
    np.testing.assert_allclose(loss_fn.backward(2.0), 2 * (softmax - np.eye(4)[target]) / 5)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "weight": [1.0, 2.0, 0.5]}])
def test_finite_differences(rng, options):
    logits = rng.standard_normal((4, 3))
    target = np.array([2, 0, 1, 2])
    loss_fn = CrossEntropyLoss(**options)
    loss_fn(logits, target)
    grad = loss_fn.backward()
    numeric = numerical_gradient(lambda: float(loss_fn(logits, target)), logits)
    assert_close(grad, numeric, tol=1e-7, what="cross-entropy grad")


def test_extreme_logits_do_not_overflow(torch):
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 1e4 - 1], [5e3, 5e3, 5e3]])
    target = np.array([1, 0, 2])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow is fine
        loss, grad = run_both(torch, logits, target)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss > 1e3  # confidently wrong predictions cost about 1e4


def test_float32_in_float32_out(rng):
    logits = (rng.standard_normal((6, 10)) * 50).astype(np.float32)
    target = rng.integers(0, 10, 6)
    for reduction in ("mean", "sum"):
        loss_fn = CrossEntropyLoss(reduction=reduction)
        loss = loss_fn(logits, target)
        assert isinstance(loss, np.float32) and isinstance(loss.item(), float)
        assert loss_fn.backward().dtype == np.float32
        assert loss_fn.backward(np.float64(1.0)).dtype == np.float32
    weighted = CrossEntropyLoss(weight=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], label_smoothing=0.1)
    assert weighted(logits, target).dtype == np.float32
    assert weighted.backward().dtype == np.float32


def test_weight_is_a_buffer_like_torch(torch):
    weight = np.arange(1.0, 4.0)
    assert list(CrossEntropyLoss(weight=weight).state_dict()) == list(
        torch.nn.CrossEntropyLoss(weight=torch.from_numpy(weight)).state_dict()
    )
    assert list(CrossEntropyLoss().state_dict()) == []
    assert repr(CrossEntropyLoss()) == "CrossEntropyLoss()"


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (np.array([0, 1, 3]), r"in \[0, 3\).*got 3 \(at index 2\)"),
        (np.array([0, -1, 2]), r"in \[0, 3\).*got -1"),
        (np.array([0.0, 1.0, 2.0]), r"integer class indices of shape \(3,\).*float64"),
        (np.array([0, 1]), r"shape \(3,\).*logits of shape \(3, 3\).*shape \(2,\)"),
        (np.array([[0, 1, 2]]), r"shape \(3,\).*shape \(1, 3\)"),
    ],
)
def test_bad_targets_are_explained(target, pattern):
    with pytest.raises(ValueError, match=r"CrossEntropyLoss\(\).*" + pattern):
        CrossEntropyLoss()(np.zeros((3, 3)), target)


def test_bad_arguments_and_logits():
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"\(N, C\).*\(2, 3, 4\)"):
        CrossEntropyLoss()(np.zeros((2, 3, 4)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"weight has shape \(2,\).*3 classes"):
        CrossEntropyLoss(weight=[1.0, 2.0])(np.zeros((2, 3)), np.zeros(2, dtype=np.int64))


def test_backward_needs_a_forward_and_the_right_grad_shape():
    loss_fn = CrossEntropyLoss()
    with pytest.raises(RuntimeError, match="call forward first"):
        loss_fn.backward()
    with no_grad():
        loss_fn(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(RuntimeError, match="call forward first"):
        loss_fn.backward()
    loss_fn(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\(\).*\(2,\)"):
        loss_fn.backward(np.ones(2))
