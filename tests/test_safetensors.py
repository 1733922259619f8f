"""safetensors weights (``scratchcnn.formats.safetensors`` and ``export-torch`` / ``import-torch``
with a .safetensors file): every model round trips bit for bit in float32 and float64, the files
feed the PyTorch twin through ``safetensors.torch`` (strict) and come back from it, neither
direction needs torch, and every kind of damaged or mismatched file, crafted here byte by byte
(8-byte little-endian header length, JSON header, data), is one line, exit 2, and no output."""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from scratchcnn.cli import main
from scratchcnn.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scratchcnn.formats.safetensors import (
    load_checked,
    load_state_dict,
    read_metadata,
    save_state_dict,
)
from scratchcnn.models import MODEL_NAMES, build_model
from scratchcnn.nn import no_grad

pytest.importorskip("safetensors")

MEAN, STD = 0.28, 0.35
EVALUATE = ["--dataset", "mnist-sample", "--limit-test", "20"]


def trained_model(name: str, dtype: str, seed: int = 0):
    """Model ``name`` whose BatchNorm buffers moved away from their initial values (three
    training-mode batches: running statistics and step counters), in eval mode."""
    rng = np.random.default_rng(seed)
    model = build_model(name, dtype=dtype, rng=rng)
    with no_grad():
        for _ in range(3):
            model(rng.standard_normal((4, 1, 28, 28)).astype(dtype))
    return model.eval()


def logits(model, x: np.ndarray) -> np.ndarray:
    with no_grad():
        return model(x)


def checkpoint_of(model, path: Path, name: str, dtype: str) -> Path:
    metadata = {
        "architecture": name, "dataset": "fashion-mnist",
        "classes": [f"class {i}" for i in range(10)], "normalization": {"mean": MEAN, "std": STD},
        "dtype": dtype, "epoch": 3,
    }
    return save_checkpoint(path, model.state_dict(), metadata)


def run_error(capsys, *argv: str) -> str:
    """Run the command, expecting a user error: exit 2 and a single plain line on stderr."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def raw_file(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file made by hand: ``header`` (JSON-encoded unless bytes) after its length
    (``length`` to lie about it), then ``data``."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def header_and_data(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


# -- the Python API -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_round_trips_bit_for_bit(tmp_path, name, dtype):
    model = trained_model(name, dtype)
    path = save_state_dict(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_state_dict(path)
    assert set(loaded) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert loaded[key].tobytes() == value.tobytes(), key

    fresh = build_model(name, dtype=dtype, rng=np.random.default_rng(99)).eval()
    fresh.load_state_dict(load_state_dict(path))  # strict
    x = np.random.default_rng(1).standard_normal((5, 1, 28, 28)).astype(dtype)
    np.testing.assert_array_equal(logits(fresh, x), logits(model, x))
    header, _ = header_and_data(path)
    for key in (k for k in header if k.endswith("num_batches_tracked")):
        assert header[key]["dtype"] == "I64" and header[key]["shape"] == [], key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_torch_twin_loads_the_file_strictly_and_computes_the_same(torch, tmp_path, name):
    from safetensors.torch import load_file

    from scratchcnn.reference.torch_models import build_torch_model

    model = trained_model(name, "float64")
    path = save_state_dict(model.state_dict(), tmp_path / "w.safetensors")
    twin = build_torch_model(name, dtype=np.float64)
    twin.load_state_dict(load_file(path), strict=True)
    twin.eval()
    for key, tensor in twin.state_dict().items():
        assert tensor.dtype == torch.from_numpy(model.state_dict()[key]).dtype, key
    x = np.random.default_rng(2).standard_normal((7, 1, 28, 28))
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits(model, x), expected, rtol=0, atol=1e-10)


def test_a_file_saved_by_safetensors_torch_loads_into_the_numpy_model(torch, tmp_path):
    from safetensors.torch import save_file

    from scratchcnn.reference.torch_models import build_torch_model

    twin = build_torch_model("bn-cnn", dtype=np.float64)
    twin(torch.randn(6, 1, 28, 28, dtype=torch.float64))  # moves the running statistics
    twin.eval()
    path = tmp_path / "twin.safetensors"
    save_file(twin.state_dict(), path, metadata={"format": "pt"})
    assert read_metadata(path) == {"format": "pt"}
    model = build_model("bn-cnn", dtype="float64", rng=np.random.default_rng(0)).eval()
    model.load_state_dict(load_state_dict(path))
    assert int(model.state_dict()["1.num_batches_tracked"]) == 1
    x = np.random.default_rng(3).standard_normal((3, 1, 28, 28))
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits(model, x), expected, rtol=0, atol=1e-10)


def test_strided_big_endian_and_zero_d_arrays_are_written_by_value(tmp_path):
    rng = np.random.default_rng(4)
    state = {
        "transposed": rng.standard_normal((3, 5)).T,  # not C-contiguous
        "strided": rng.standard_normal(10)[::3],
        "big_endian": np.arange(6, dtype=">f8").reshape(2, 3),
        "counter": np.array(7, dtype=np.int64),
        "half": rng.standard_normal(4).astype(np.float16),
    }
    path = save_state_dict(state, tmp_path / "a.safetensors", metadata={"note": "hi"})
    loaded = load_state_dict(path)
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        assert loaded[key].dtype == value.dtype.newbyteorder("="), key
        assert loaded[key].flags.writeable and loaded[key].flags.c_contiguous
    assert loaded["counter"].shape == ()
    assert read_metadata(path) == {"note": "hi"}


def test_bfloat16_loads_as_the_exact_float32(torch, tmp_path):
    from safetensors.torch import save_file

    values = torch.randn(1000, dtype=torch.float32) * 1e3
    save_file({"w": values.bfloat16()}, tmp_path / "bf.safetensors")
    loaded = load_state_dict(tmp_path / "bf.safetensors")["w"]
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, values.bfloat16().float().numpy())


@pytest.mark.parametrize(
    ("state", "metadata", "expected"),
    [
        ({"w": np.array(["a", "b"])}, None, "'w' is not an array of numbers"),
        ({"__metadata__": np.zeros(2)}, None, "a string other than '__metadata__'"),
        ({3: np.zeros(2)}, None, "a string other than"),
        ({"w": np.zeros(2)}, {"epoch": 3}, "metadata must map strings to strings"),
    ],
)
def test_save_refuses_what_is_not_a_state_dict_and_writes_nothing(tmp_path, state, metadata,
                                                                  expected):
    with pytest.raises((ValueError, TypeError), match=expected):
        save_state_dict(state, tmp_path / "x.safetensors", metadata)
    assert list(tmp_path.iterdir()) == []


def test_without_the_package_a_one_line_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    for call in (lambda: save_state_dict({"w": np.zeros(2)}, tmp_path / "x.safetensors"),
                 lambda: load_state_dict(tmp_path / "x.safetensors")):
        with pytest.raises(ImportError, match=r"pip install 'scratchcnn\[safetensors\]'"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_every_truncation_and_header_byte_flip_is_a_checkpoint_error(tmp_path):
    """Whatever happens to a file, loading it returns arrays or raises CheckpointError."""
    good = save_state_dict({"a.weight": np.arange(6.0).reshape(2, 3),
                            "a.counter": np.array(2, dtype=np.int64)},
                           tmp_path / "good.safetensors", metadata={"k": "v"}).read_bytes()
    bad = tmp_path / "bad.safetensors"
    (length,) = struct.unpack("<Q", good[:8])
    for end in range(len(good)):
        bad.write_bytes(good[:end])
        with pytest.raises(CheckpointError, match=r"truncated|empty|not a safetensors"):
            load_state_dict(bad)
    rng = np.random.default_rng(5)
    for position in range(8 + length):
        damaged = bytearray(good)
        damaged[position] ^= int(rng.integers(1, 256))
        bad.write_bytes(bytes(damaged))
        try:
            load_state_dict(bad)
        except CheckpointError as error:
            assert "\n" not in str(error) and str(bad) in str(error)


# -- the command line -----------------------------------------------------------------------------


def test_cli_round_trip_keeps_weights_bits_and_settings_without_options(tmp_path, capsys):
    model = trained_model("bn-cnn", "float64")
    source = checkpoint_of(model, tmp_path / "ck.npz", "bn-cnn", "float64")
    exported = tmp_path / "w.safetensors"
    assert main(["export-torch", str(source), str(exported)]) == 0
    metadata = read_metadata(exported)
    assert metadata["architecture"] == "bn-cnn" and metadata["format"] == "pt"
    assert (float(metadata["mean"]), float(metadata["std"])) == (MEAN, STD)

    back = tmp_path / "back.npz"
    assert main(["import-torch", str(exported), str(back)]) == 0  # no --model needed
    assert "wrote" in capsys.readouterr().out
    imported = load_checkpoint(back)
    assert (imported.architecture, imported.metadata["dataset"]) == ("bn-cnn", "fashion-mnist")
    assert (imported.mean, imported.std, imported.dtype) == (MEAN, STD, np.float64)
    for key, value in model.state_dict().items():
        assert imported.model_state[key].dtype == value.dtype, key
        np.testing.assert_array_equal(imported.model_state[key], value, err_msg=key)

    reports = []
    for checkpoint in (source, back):
        capsys.readouterr()
        assert main(["evaluate", str(checkpoint), *EVALUATE]) == 0
        report = capsys.readouterr().out.splitlines()[1:]  # after the checkpoint's path
        reports.append([re.sub(r"\s+time .*", "", line) for line in report])
    assert reports[0] == reports[1] and reports[0]

    # Options given win over the file's metadata.
    assert main(["import-torch", str(exported), str(tmp_path / "o.npz"), "--dataset", "mnist",
                 "--mean", "0.1", "--std", "0.2", "--dtype", "float32"]) == 0
    other = load_checkpoint(tmp_path / "o.npz")
    assert (other.metadata["dataset"], other.mean, other.std) == ("mnist", 0.1, 0.2)
    assert other.dtype == np.float32


def test_export_and_import_need_no_torch(tmp_path, monkeypatch, capsys):
    model = trained_model("bn-cnn", "float32")
    source = checkpoint_of(model, tmp_path / "ck.npz", "bn-cnn", "float32")
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["export-torch", str(source), str(tmp_path / "w.safetensors")]) == 0
    assert main(["import-torch", str(tmp_path / "w.safetensors"), str(tmp_path / "b.npz")]) == 0
    state = load_checkpoint(tmp_path / "b.npz").model_state
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    # A .pt file still says what it needs.
    err = run_error(capsys, "export-torch", str(source), str(tmp_path / "w.pt"))
    assert "PyTorch is not installed, and export-torch needs it" in err


@pytest.mark.parametrize("command", ["export-torch", "import-torch"])
def test_without_safetensors_the_commands_name_the_extra(tmp_path, monkeypatch, capsys,
                                                         command):
    source = checkpoint_of(trained_model("tiny-cnn", "float32"), tmp_path / "ck.npz",
                           "tiny-cnn", "float32")
    save_state_dict(load_checkpoint(source).model_state, tmp_path / "in.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    argv = ([command, str(source), str(tmp_path / "out.safetensors")]
            if command == "export-torch"
            else [command, str(tmp_path / "in.safetensors"), str(tmp_path / "out.npz")])
    err = run_error(capsys, *argv)
    assert f"safetensors is not installed, and {command} needs it" in err
    assert "pip install 'scratchcnn[safetensors]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "in.safetensors"]


def test_a_safetensors_torch_file_imports_into_an_equal_model(torch, tmp_path, capsys):
    from safetensors.torch import save_file

    from scratchcnn.reference.torch_models import build_torch_model

    twin = build_torch_model("bn-cnn", dtype=np.float64)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(2):  # trained a little: weights and buffers all moved
        optimizer.zero_grad()
        twin(torch.randn(8, 1, 28, 28, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
    twin.eval()
    save_file(twin.state_dict(), tmp_path / "twin.safetensors")
    out = tmp_path / "twin.npz"
    assert main(["import-torch", str(tmp_path / "twin.safetensors"), str(out),
                 "--model", "bn-cnn"]) == 0
    model = load_checkpoint(out).build_model().eval()
    assert int(model.state_dict()["1.num_batches_tracked"]) == 2
    x = np.random.default_rng(6).standard_normal((5, 1, 28, 28))
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits(model, x), expected, rtol=0, atol=1e-10)


def test_half_precision_is_converted_only_when_asked(torch, tmp_path, capsys):
    from safetensors.torch import save_file

    from scratchcnn.reference.torch_models import build_torch_model

    state = build_torch_model("simple-cnn", dtype=np.float32).state_dict()
    for kind in (torch.bfloat16, torch.float16):
        name = str(kind).removeprefix("torch.")
        source = tmp_path / f"{name}.safetensors"
        save_file({k: v.to(kind) for k, v in state.items()}, source)
        err = run_error(capsys, "import-torch", str(source), str(tmp_path / "x.npz"),
                        "--model", "simple-cnn")
        assert f"the weights are {name}; pass --dtype" in err
        out = tmp_path / f"{name}.npz"
        assert main(["import-torch", str(source), str(out), "--model", "simple-cnn",
                     "--dtype", "float64"]) == 0
        imported = load_checkpoint(out).model_state
        for key, value in state.items():
            np.testing.assert_array_equal(imported[key], value.to(kind).double().numpy())


def simple_state(dtype: str = "float32") -> dict[str, np.ndarray]:
    return build_model("simple-cnn", dtype=dtype, rng=np.random.default_rng(7)).state_dict()


def write_case(path: Path, case: str) -> None:
    """A .safetensors file that import-torch --model simple-cnn must refuse."""
    state = simple_state()
    weight = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    if case == "empty":
        path.write_bytes(b"")
    elif case == "too-short":
        path.write_bytes(b"\x10\x00\x00")
    elif case == "text":
        path.write_text("0.weight,0.bias\n1,2\n")
    elif case == "zip":
        save_checkpoint(path, state, {"architecture": "simple-cnn", "dataset": "mnist",
                                      "classes": list("0123456789"),
                                      "normalization": {"mean": 0.1, "std": 0.3},
                                      "dtype": "float32", "epoch": 0})
    elif case in ("header-cut", "data-cut", "trailing"):
        whole = save_state_dict(state, path).read_bytes()
        path.write_bytes({"header-cut": whole[:100], "data-cut": whole[:-10],
                          "trailing": whole + b"\0" * 12}[case])
    elif case == "length-lies":
        raw_file(path, {"0.weight": weight}, b"\0" * 16, length=10**6)
    elif case == "not-json":
        raw_file(path, b"{0.weight: F32}", b"")
    elif case == "json-list":
        raw_file(path, [1, 2, 3])
    elif case == "entry-without-shape":
        raw_file(path, {"0.weight": {"dtype": "F32", "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "unknown-dtype":
        raw_file(path, {"0.weight": {**weight, "dtype": "F24"}}, b"\0" * 16)
    elif case == "shape-lies":
        raw_file(path, {"0.weight": {**weight, "shape": [2, 3]}}, b"\0" * 16)
    elif case == "offsets-overlap":
        raw_file(path, {"0.weight": weight, "0.bias": {**weight, "data_offsets": [8, 24]}},
                 b"\0" * 24)
    elif case == "offsets-gap":
        raw_file(path, {"0.weight": {**weight, "data_offsets": [4, 20]}}, b"\0" * 20)
    elif case == "bad-metadata":
        raw_file(path, {"__metadata__": {"epoch": 3}, "0.weight": weight}, b"\0" * 16)
    elif case == "float8":
        raw_file(path, {"0.weight": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}},
                 b"\0" * 4)
    elif case == "int8-weight":
        save_state_dict({**state, "0.weight": state["0.weight"].astype(np.int8)}, path)
    elif case == "missing-tensor":
        save_state_dict({k: v for k, v in state.items() if k != "9.bias"}, path)
    elif case == "extra-tensor":
        save_state_dict({**state, "10.weight": np.zeros(3, np.float32)}, path)
    elif case == "wrong-shape":
        save_state_dict({**state, "0.weight": np.zeros((8, 1, 3, 3), np.float32)}, path)
    elif case == "other-architecture":
        save_state_dict(build_model("lenet5").state_dict(), path)
    elif case == "nan":
        state["3.bias"][1] = np.nan
        save_state_dict(state, path)
    elif case == "mixed-dtypes":
        save_state_dict({**state, "0.bias": state["0.bias"].astype(np.float64)}, path)
    elif case == "no-tensors":
        save_state_dict({}, path)
    elif case == "unknown-architecture":
        save_state_dict(state, path, metadata={"architecture": "resnet50"})
    elif case == "bad-mean":
        save_state_dict(state, path, metadata={"architecture": "simple-cnn", "mean": "33.3"})


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("empty", "the file is empty"),
        ("too-short", "truncated: 3 bytes, too short for a safetensors file"),
        ("text", "not a safetensors file (its first 8 bytes are not the length"),
        ("zip", "not a safetensors file but a zip archive"),
        ("header-cut", "truncated: the header alone should take"),
        ("data-cut", "truncated: the header describes"),
        ("trailing", "12 bytes follow the last tensor"),
        ("length-lies", "truncated: the header alone should take 1000000 bytes"),
        ("not-json", "its header is not JSON"),
        ("json-list", "not a safetensors file (its first 8 bytes are not the length"),
        ("entry-without-shape", "the header's entry for '0.weight' is not a tensor's"),
        ("unknown-dtype", "gives '0.weight' the dtype 'F24', which safetensors does not have"),
        ("shape-lies", "'0.weight' is F32 of shape [2, 3] (24 bytes), but its data_offsets "
                       "[0, 16] span 16 bytes"),
        ("offsets-overlap", "byte ranges of '0.weight' and '0.bias' overlap"),
        ("offsets-gap", "byte ranges of the start and '0.weight' leave a gap"),
        ("bad-metadata", "__metadata__ is not a map of strings to strings"),
        ("float8", "'0.weight' has dtype F8_E4M3, which NumPy cannot hold"),
        ("int8-weight", "'0.weight' has dtype int8, expected float32"),
        ("missing-tensor", "missing keys ['9.bias'], unexpected keys []"),
        ("extra-tensor", "missing keys [], unexpected keys ['10.weight']"),
        ("wrong-shape", "'0.weight' has shape (8, 1, 3, 3) but 'simple-cnn' expects "
                        "(16, 1, 3, 3)"),
        ("other-architecture", "weights do not match architecture 'simple-cnn'"),
        ("nan", "'3.bias' contains NaN or infinite values"),
        ("mixed-dtypes", "the weights mix float32, float64; pass --dtype"),
        ("no-tensors", "the file holds no tensors"),
    ],
)
def test_bad_files_are_one_line_errors_and_write_nothing(tmp_path, capsys, case, expected):
    source = tmp_path / "in.safetensors"
    write_case(source, case)
    err = run_error(capsys, "import-torch", str(source), str(tmp_path / "out.npz"),
                    "--model", "simple-cnn")
    assert expected in err and str(source) in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown-architecture", "its metadata names the architecture 'resnet50', which "
                                 "scratchcnn does not know; pass --model"),
        ("bad-mean", "its metadata gives the mean '33.3', not a number on the [0, 1] scale"),
        ("missing-tensor", "does not name the architecture of its weights; pass --model"),
    ],
)
def test_metadata_that_cannot_be_used_asks_for_the_option(tmp_path, capsys, case, expected):
    source = tmp_path / "in.safetensors"
    write_case(source, case)
    err = run_error(capsys, "import-torch", str(source), str(tmp_path / "out.npz"))
    assert expected in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]
    if case != "missing-tensor":  # the option given, the file imports
        option = ["--model", "simple-cnn"] if case == "unknown-architecture" else ["--mean", "0.1"]
        assert main(["import-torch", str(source), str(tmp_path / "out.npz"), *option]) == 0


def test_a_pt_file_still_needs_model(tmp_path, capsys):
    err = run_error(capsys, "import-torch", str(tmp_path / "w.pt"), str(tmp_path / "o.npz"))
    assert "--model is required: a torch.save file does not record the architecture" in err
    assert list(tmp_path.iterdir()) == []


def test_values_too_large_for_the_chosen_dtype_are_refused(tmp_path, capsys):
    state = simple_state("float64")
    state["7.weight"][0, 0] = 1e300
    source = save_state_dict(state, tmp_path / "in.safetensors")
    err = run_error(capsys, "import-torch", str(source), str(tmp_path / "o.npz"),
                    "--model", "simple-cnn", "--dtype", "float32")
    assert "'7.weight' has values too large for float32" in err
    assert main(["import-torch", str(source), str(tmp_path / "o.npz"),
                 "--model", "simple-cnn"]) == 0  # fits float64, its own dtype


@pytest.mark.parametrize("case", ["no-such-file", "directory"])
def test_missing_or_directory_input_is_named(tmp_path, capsys, case):
    source = tmp_path / "in.safetensors"
    if case == "directory":
        source.mkdir()
    err = run_error(capsys, "import-torch", str(source), str(tmp_path / "o.npz"),
                    "--model", "simple-cnn")
    assert ("no such file" if case == "no-such-file" else "is a directory") in err
    assert not (tmp_path / "o.npz").exists()


def test_load_checked_fills_missing_step_counters_with_zero(tmp_path):
    state = trained_model("bn-cnn", "float32").state_dict()
    legacy = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = save_state_dict(legacy, tmp_path / "old.safetensors")
    checked, dtype = load_checked(path, "bn-cnn")
    assert dtype == "float32" and list(checked) == list(state)
    counter = checked["4.num_batches_tracked"]
    assert counter.dtype == np.int64 and counter.shape == () and int(counter) == 0


def test_an_export_failing_midway_leaves_no_file(tmp_path, capsys, monkeypatch):
    source = checkpoint_of(trained_model("tiny-cnn", "float32"), tmp_path / "ck.npz",
                           "tiny-cnn", "float32")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    err = run_error(capsys, "export-torch", str(source), str(tmp_path / "w.safetensors"))
    assert "cannot write" in err and "no space left on device" in err
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]


def test_output_paths_are_checked_as_for_pt_files(tmp_path, capsys):
    source = checkpoint_of(trained_model("tiny-cnn", "float32"), tmp_path / "ck.npz",
                           "tiny-cnn", "float32")
    (tmp_path / "dir.safetensors").mkdir()
    err = run_error(capsys, "export-torch", str(source), str(tmp_path / "dir.safetensors"))
    assert "is a directory" in err
    weights = save_state_dict(load_checkpoint(source).model_state, tmp_path / "w.safetensors")
    before = weights.read_bytes()
    err = run_error(capsys, "import-torch", str(weights), str(weights))
    assert "is the input state_dict file itself" in err
    assert weights.read_bytes() == before
