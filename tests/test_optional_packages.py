"""A plain ``pip install scratchcnn`` has NumPy, threadpoolctl and tqdm only: each command that
needs PyTorch, matplotlib or Pillow says so in one line before any slow work (and leaves no
output directory), compare still writes its report without matplotlib, and thread limits work
without threadpoolctl where they can. A package is made missing by putting None in
``sys.modules``, which makes both ``import`` and ``importlib.util.find_spec`` fail for it."""

from __future__ import annotations

import sys

import pytest

from scratchcnn.cli import main
from scratchcnn.harness.threads import apply_threads, available_cores

TINY = ["--dataset", "mnist-sample", "--limit-train", "40", "--limit-test", "20"]


def missing(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny-cnn checkpoint trained for one epoch on 40 images (with everything installed)."""
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", *TINY, "--model", "tiny-cnn", "--batch-size", "20", "--no-progress",
                 "--out", str(out)]) == 0
    return str(out / "last.npz")


@pytest.mark.parametrize("arguments, needed_by", [
    (["train", *TINY, "--framework", "torch", "--no-progress"], "--framework torch"),
    (["compare", *TINY, "--quiet"], "compare's PyTorch side"),
    (["bench", "--dataset", "random", "--quiet"], "bench"),
    (["accuracy", "mnist-simple-b64", *TINY[2:]], "an accuracy target"),
])
def test_commands_that_train_pytorch_name_it_before_starting(arguments, needed_by, tmp_path,
                                                            monkeypatch, capsys):
    missing(monkeypatch, "torch")
    out = tmp_path / "new" / ("out.json" if arguments[0] == "accuracy" else "out")
    assert main([*arguments, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: PyTorch is not installed, and {needed_by}" in err, err
    assert "pip install 'torch==2.13.0'" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("arguments, needed_by", [
    (["evaluate", "{checkpoint}", "--framework", "torch"], "--framework torch"),
    (["export-torch", "{checkpoint}", "{tmp}/w.pt"], "export-torch"),
    (["import-torch", "{tmp}/w.pt", "--model", "tiny-cnn", "{tmp}/x.npz"], "import-torch"),
])
def test_commands_that_read_or_write_pytorch_files_name_it(arguments, needed_by, checkpoint,
                                                           tmp_path, monkeypatch, capsys):
    missing(monkeypatch, "torch")
    filled = [part.format(checkpoint=checkpoint, tmp=tmp_path) for part in arguments]
    assert main(filled) == 2
    err = capsys.readouterr().err
    assert f"error: PyTorch is not installed, and {needed_by} needs it" in err, err
    assert list(tmp_path.iterdir()) == []


def test_predict_without_pillow_says_what_to_install(checkpoint, tmp_path, monkeypatch, capsys):
    image = tmp_path / "digit.png"
    image.write_bytes(b"not read")
    missing(monkeypatch, "PIL")
    assert main(["predict", checkpoint, str(image)]) == 2
    err = capsys.readouterr().err
    assert "error: Pillow is not installed, and predict" in err
    assert "pip install 'scratchcnn[plots]'" in err


def test_compare_without_matplotlib_says_so_first_and_still_writes_its_report(
        tmp_path, monkeypatch, capsys):
    missing(monkeypatch, "matplotlib")
    out = tmp_path / "compare"
    assert main(["compare", *TINY, "--frameworks", "numpy", "--model", "tiny-cnn",
                 "--batch-size", "20", "--epochs", "1", "--no-memory", "--out", str(out),
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    notice = err.index("matplotlib is not installed, so the report will have no plots")
    assert notice < err.index("epoch 1/1"), "said only after the training"
    assert (out / "report.json").exists() and (out / "report.md").exists()
    assert not list(out.glob("*.png"))


def test_without_threadpoolctl_only_all_cores_can_be_applied(monkeypatch):
    missing(monkeypatch, "threadpoolctl")
    assert apply_threads(None, torch=False) == available_cores()
    if available_cores() > 1:
        with pytest.raises(ValueError, match="pip install threadpoolctl"):
            apply_threads(1, torch=False)
