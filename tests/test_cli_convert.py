"""``scratchcnn export-torch`` / ``import-torch`` end to end: BatchNorm models (and their int64
step counters) survive every round trip between the frameworks, a torch-trained bn-cnn can be
evaluated and resumed, and every kind of bad input or output path is one line, not a traceback,
and writes nothing."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest

from scratchcnn.cli import main
from scratchcnn.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scratchcnn.models import build_model
from scratchcnn.nn import no_grad

TINY = ["--dataset", "mnist-sample", "--limit-test", "20", "--no-progress"]
MEAN, STD = 0.13, 0.31


def bn_checkpoint(path: Path, dtype: str = "float64") -> tuple[Path, object]:
    """A bn-cnn whose BatchNorm buffers moved away from their initial values (running
    statistics and step counters of 3 training batches), saved as a checkpoint."""
    rng = np.random.default_rng(0)
    model = build_model("bn-cnn", dtype=dtype, rng=rng)
    for _ in range(3):
        model(rng.standard_normal((4, 1, 28, 28)).astype(dtype))
    model.eval()
    metadata = {
        "architecture": "bn-cnn", "dataset": "mnist-sample",
        "classes": [str(i) for i in range(10)], "normalization": {"mean": MEAN, "std": STD},
        "dtype": dtype, "epoch": 3,
    }
    return save_checkpoint(path, model.state_dict(), metadata), model


def run_error(capsys, *argv: str) -> str:
    """Run the command, expecting a user error: exit 2 and a single plain line on stderr."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "\x1b" not in err, err
    return err


def without_timing(report: str) -> list[str]:
    """evaluate's report without its first line (the checkpoint's path) and its timing."""
    return [re.sub(r"\s+time .*", "", line) for line in report.splitlines()[1:]]


def only_files(directory: Path) -> list[str]:
    """The directory's entries: no temporary file of an interrupted write may remain."""
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def simple_state(torch):
    from scratchcnn.reference.torch_models import build_torch_model

    torch.manual_seed(0)
    return build_torch_model("simple-cnn", dtype=np.float32).state_dict()


# -- BatchNorm: num_batches_tracked round trips --------------------------------------------------


def test_numpy_bn_cnn_round_trips_through_torch_with_identical_logits(torch, tmp_path, capsys):
    from scratchcnn.reference.torch_models import build_torch_model

    source, model = bn_checkpoint(tmp_path / "bn.npz")
    exported = tmp_path / "bn.pt"
    assert main(["export-torch", str(source), str(exported)]) == 0
    state_dict = torch.load(exported, weights_only=True)
    assert state_dict["1.num_batches_tracked"].dtype == torch.int64
    assert int(state_dict["1.num_batches_tracked"]) == 3
    build_torch_model("bn-cnn", dtype=np.float64).load_state_dict(state_dict)  # strict

    imported = tmp_path / "back.npz"
    assert main(["import-torch", str(exported), str(imported), "--model", "bn-cnn",
                 "--dataset", "mnist-sample", "--mean", str(MEAN), "--std", str(STD)]) == 0
    back = load_checkpoint(imported)
    for key, value in model.state_dict().items():
        assert back.model_state[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back.model_state[key], value, err_msg=key)
    x = np.random.default_rng(1).standard_normal((6, 1, 28, 28))
    rebuilt = back.build_model().eval()
    with no_grad():
        np.testing.assert_array_equal(rebuilt(x), model(x))

    capsys.readouterr()
    assert main(["evaluate", str(source), *TINY[:4]]) == 0
    original = without_timing(capsys.readouterr().out)
    assert main(["evaluate", str(imported), *TINY[:4]]) == 0
    assert without_timing(capsys.readouterr().out) == original


def test_torch_bn_cnn_state_dict_imports_with_or_without_step_counters(torch, tmp_path):
    from scratchcnn.reference.torch_models import build_torch_model

    twin = build_torch_model("bn-cnn", dtype=np.float32)
    twin(torch.randn(4, 1, 28, 28))
    full = tmp_path / "full.pt"
    torch.save(twin.state_dict(), full)
    assert main(["import-torch", str(full), str(tmp_path / "full.npz"), "--model", "bn-cnn"]) == 0
    state = load_checkpoint(tmp_path / "full.npz").model_state
    assert state["4.num_batches_tracked"].dtype == np.int64
    assert state["4.num_batches_tracked"].shape == () and int(state["4.num_batches_tracked"]) == 1

    # State dicts from before PyTorch counted BatchNorm steps (or int32 counters): torch
    # itself loads them with a counter of 0.
    legacy = {k: (v.int() if k.startswith("1.num") else v) for k, v in twin.state_dict().items()
              if not k.startswith("4.num")}
    torch.save(legacy, tmp_path / "legacy.pt")
    assert main(["import-torch", str(tmp_path / "legacy.pt"), str(tmp_path / "legacy.npz"),
                 "--model", "bn-cnn"]) == 0
    state = load_checkpoint(tmp_path / "legacy.npz").model_state
    assert state["4.num_batches_tracked"].dtype == np.int64
    assert int(state["4.num_batches_tracked"]) == 0
    assert state["1.num_batches_tracked"].dtype == np.int64
    assert int(state["1.num_batches_tracked"]) == 1


def test_torch_trained_bn_cnn_evaluates_resumes_and_exports(torch, tmp_path, capsys):
    from scratchcnn.reference.torch_models import build_torch_model

    out = tmp_path / "run"
    train = ["train", "--out", str(out), "--limit-train", "40", "--batch-size", "20", *TINY]
    assert main([*train, "--model", "bn-cnn", "--framework", "torch"]) == 0
    last = out / "last.npz"
    counter = load_checkpoint(last).model_state["1.num_batches_tracked"]
    assert counter.dtype == np.int64 and int(counter) == 2
    assert main(["evaluate", str(last), *TINY[:4]]) == 0
    assert main(["evaluate", str(last), *TINY[:4], "--framework", "torch"]) == 0

    assert main(["train", "--resume", str(last), "--epochs", "2", "--no-progress"]) == 0
    resumed = load_checkpoint(last)
    assert resumed.epoch == 2
    assert int(resumed.model_state["1.num_batches_tracked"]) == 4  # the counter went on

    exported = tmp_path / "run.pt"
    assert main(["export-torch", str(last), str(exported)]) == 0
    build_torch_model("bn-cnn").load_state_dict(torch.load(exported, weights_only=True))


def test_torch_side_checkpoints_saved_without_step_counters_still_load(tmp_path):
    # What train --framework torch and import-torch wrote before the counters were kept.
    _, model = bn_checkpoint(tmp_path / "new.npz", dtype="float32")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("batches_tracked")}
    metadata = {
        "architecture": "bn-cnn", "dataset": "mnist-sample",
        "classes": [str(i) for i in range(10)], "normalization": {"mean": MEAN, "std": STD},
        "dtype": "float32", "epoch": 1,
    }
    old = save_checkpoint(tmp_path / "old.npz", state, {**metadata, "framework": "torch"})
    loaded = load_checkpoint(old)
    counter = loaded.model_state["8.num_batches_tracked"]
    assert counter.dtype == np.int64 and counter.shape == () and int(counter) == 0
    x = np.random.default_rng(2).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with no_grad():
        np.testing.assert_array_equal(loaded.build_model().eval()(x), model(x))
    # The NumPy side always kept them: one missing there is a damaged checkpoint.
    numpy_side = save_checkpoint(tmp_path / "np.npz", state, metadata)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(numpy_side)


# -- what import-torch accepts ------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_common_wrappers_around_a_state_dict_are_accepted(
    torch, simple_state, tmp_path, wrapper
):
    source = tmp_path / "wrapped.pt"
    torch.save({wrapper: simple_state, "optimizer_state_dict": {"state": {}}, "epoch": 3,
                "loss": 0.25}, source)
    assert main(["import-torch", str(source), str(tmp_path / "w.npz"),
                 "--model", "simple-cnn"]) == 0
    state = load_checkpoint(tmp_path / "w.npz").model_state
    np.testing.assert_array_equal(state["0.weight"], simple_state["0.weight"].numpy())


def test_bfloat16_and_sparse_tensors_are_converted(torch, simple_state, tmp_path, capsys):
    bf16 = tmp_path / "bf16.pt"
    torch.save({k: v.bfloat16() for k, v in simple_state.items()}, bf16)
    err = run_error(capsys, "import-torch", str(bf16), str(tmp_path / "x.npz"),
                    "--model", "simple-cnn")
    assert "bfloat16" in err and "--dtype" in err
    assert main(["import-torch", str(bf16), str(tmp_path / "bf.npz"), "--model", "simple-cnn",
                 "--dtype", "float32"]) == 0
    state = load_checkpoint(tmp_path / "bf.npz").model_state
    expected = simple_state["0.weight"].bfloat16().float().numpy()
    assert state["0.weight"].dtype == np.float32
    np.testing.assert_array_equal(state["0.weight"], expected)

    sparse = tmp_path / "sparse.pt"
    torch.save({k: v.to_sparse() if v.dim() == 2 else v for k, v in simple_state.items()}, sparse)
    assert main(["import-torch", str(sparse), str(tmp_path / "sp.npz"),
                 "--model", "simple-cnn"]) == 0
    state = load_checkpoint(tmp_path / "sp.npz").model_state
    for key, value in simple_state.items():
        np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)


# -- what import-torch refuses, in one line --------------------------------------------------------


def write_case(torch, simple_state, path: Path, case: str) -> None:
    from scratchcnn.reference.torch_models import build_torch_model

    if case == "text":
        path.write_text("hi\n")
    elif case == "empty-file":
        path.write_bytes(b"")
    elif case == "meta":
        torch.save({k: v.to("meta") for k, v in simple_state.items()}, path)
    elif case == "module":
        torch.save(build_torch_model("simple-cnn"), path)
    elif case == "empty-dict":
        torch.save({}, path)
    elif case == "unknown-wrapper":
        torch.save({"net": simple_state, "epoch": 3}, path)
    elif case == "mixed-dtypes":
        torch.save({k: v.double() if k == "0.bias" else v for k, v in simple_state.items()}, path)
    elif case == "npz-checkpoint":
        bn_checkpoint(path)
    elif case == "truncated":
        torch.save(simple_state, path)
        path.write_bytes(path.read_bytes()[:5000])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("text", "not a PyTorch weights file"),
        ("empty-file", "the file is empty"),
        ("meta", "'0.weight' is a meta tensor"),
        ("module", "holds a whole model (torch.nn.modules.container.Sequential)"),
        ("empty-dict", "the file holds no tensors"),
        ("unknown-wrapper", "got a dict with keys ['net', 'epoch']"),
        ("mixed-dtypes", "the weights mix float32, float64; pass --dtype"),
        ("npz-checkpoint", "is a scratchcnn checkpoint already, there is nothing to import"),
        ("truncated", "not a loadable PyTorch weights file"),
    ],
)
def test_bad_state_dict_files_are_one_line_errors(
    torch, simple_state, tmp_path, capsys, case, expected
):
    source = tmp_path / "in.pt"
    write_case(torch, simple_state, source, case)
    err = run_error(capsys, "import-torch", str(source), str(tmp_path / "out.npz"),
                    "--model", "simple-cnn")
    assert expected in err
    if case in ("module", "unknown-wrapper", "empty-dict", "text"):
        assert "torch.save(model.state_dict(), path)" in err
    assert only_files(tmp_path) == ["in.pt"]


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--mean", "nan"], "--mean must be a finite number"),
        (["--mean=-inf"], "--mean must be a finite number"),
        (["--std", "inf"], "--std must be a finite positive number"),
        (["--std", "0"], "--std must be a finite positive number"),
        (["--mean", "33.3", "--std", "78.6"], "on the [0, 1] scale"),
        (["--std", "1.5"], "on the [0, 1] scale"),
    ],
)
def test_non_finite_normalisation_is_refused_up_front(tmp_path, capsys, option, expected):
    err = run_error(capsys, "import-torch", str(tmp_path / "absent.pt"), str(tmp_path / "o.npz"),
                    "--model", "simple-cnn", *option)
    assert expected in err


def test_unreadable_input_reports_the_os_error(torch, simple_state, tmp_path, capsys,
                                               monkeypatch):
    source = tmp_path / "in.pt"
    torch.save(simple_state, source)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source))

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", denied)
        err = run_error(capsys, "import-torch", str(source), str(tmp_path / "o.npz"),
                        "--model", "simple-cnn")
    assert "permission denied" in err and "torch.save" not in err

    real_open = Path.open

    def open_denied(self, *args, **kwargs):
        if self == source:
            denied()
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_denied)
    err = run_error(capsys, "import-torch", str(source), str(tmp_path / "o.npz"),
                    "--model", "simple-cnn")
    assert "permission denied" in err and "torch.save" not in err
    assert only_files(tmp_path) == ["in.pt"]


# -- output paths ---------------------------------------------------------------------------------


def test_output_equal_to_input_is_refused_and_the_input_kept(torch, simple_state, tmp_path,
                                                             capsys, monkeypatch):
    checkpoint, _ = bn_checkpoint(tmp_path / "ck.npz")
    before = checkpoint.read_bytes()
    monkeypatch.chdir(tmp_path)
    for out in ("ck.npz", "./ck.npz", str(checkpoint)):
        err = run_error(capsys, "export-torch", "ck.npz", out)
        assert "is the input checkpoint itself" in err
    assert checkpoint.read_bytes() == before

    weights = tmp_path / "a.pt"
    torch.save(simple_state, weights)
    before = weights.read_bytes()
    err = run_error(capsys, "import-torch", "a.pt", "a.pt", "--model", "simple-cnn")
    assert "is the input state_dict file itself" in err
    assert weights.read_bytes() == before
    assert only_files(tmp_path) == ["a.pt", "ck.npz"]


@pytest.mark.parametrize("command", ["export-torch", "import-torch"])
def test_unusable_output_paths_are_one_line_errors(torch, simple_state, tmp_path, capsys,
                                                   command):
    checkpoint, _ = bn_checkpoint(tmp_path / "ck.npz")
    weights = tmp_path / "a.pt"
    torch.save(simple_state, weights)
    source, extra = ((checkpoint, []) if command == "export-torch"
                     else (weights, ["--model", "simple-cnn"]))
    (tmp_path / "dir").mkdir()
    (tmp_path / "plain").write_text("a file, not a directory")
    os.mkfifo(tmp_path / "fifo")
    cases = {
        str(tmp_path / "dir"): "is a directory",
        str(tmp_path / "fifo"): "exists and is not a regular file",
        "": "the output path is empty",
        str(tmp_path / "plain" / "x.out"): f"cannot write {tmp_path / 'plain' / 'x.out'} (",
    }
    for out, expected in cases.items():
        err = run_error(capsys, command, str(source), out, *extra)
        assert expected in err, (out, err)
    assert only_files(tmp_path) == ["a.pt", "ck.npz", "dir", "fifo", "plain"]
    assert (tmp_path / "fifo").is_fifo()
    assert only_files(tmp_path / "dir") == []


@pytest.mark.parametrize("command", ["export-torch", "import-torch"])
def test_a_write_failing_midway_leaves_no_file(torch, simple_state, tmp_path, capsys,
                                               monkeypatch, command):
    checkpoint, _ = bn_checkpoint(tmp_path / "ck.npz")
    weights = tmp_path / "a.pt"
    torch.save(simple_state, weights)
    if command == "export-torch":
        argv = [command, str(checkpoint), str(tmp_path / "out.pt")]
        real_save = torch.save

        def fail(obj, file, *args, **kwargs):
            real_save(obj, file, *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", fail)
    else:
        argv = [command, str(weights), str(tmp_path / "out.npz"), "--model", "simple-cnn"]

        def fail(file, **arrays):
            file.write(b"PK\x03\x04 half an archive")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(np, "savez", fail)
    err = run_error(capsys, *argv)
    assert "no space left on device" in err
    assert only_files(tmp_path) == ["a.pt", "ck.npz"]
