"""Checkpoint files: round trip, atomic writes under a simulated crash, refusal of malformed or
tampered files, and PyTorch state_dict export/import."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from scratchcnn import optim
from scratchcnn.formats import checkpoint as ckpt
from scratchcnn.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scratchcnn.models import build_model
from scratchcnn.nn import CrossEntropyLoss, no_grad

ARCH = "tiny-cnn"


def trained_state(dtype=np.float64):
    """A tiny-cnn after one Adam step, and the optimizer's state_dict (int-keyed, with arrays)."""
    rng = np.random.default_rng(0)
    model = build_model(ARCH, dtype=dtype, rng=rng)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    x = rng.standard_normal((4, 1, 28, 28)).astype(dtype)
    criterion = CrossEntropyLoss()
    criterion(model(x), np.array([0, 1, 2, 3]))
    model.backward(criterion.backward())
    optimizer.step()
    return model, optimizer


def metadata(optimizer=None, **overrides):
    meta = {
        "architecture": ARCH,
        "dataset": "mnist",
        "classes": [str(i) for i in range(10)],
        "normalization": {"mean": 0.1307, "std": 0.3081},
        "dtype": "float64",
        "epoch": 3,
        "rng": {"numpy": np.random.default_rng(7).bit_generator.state},
    }
    if optimizer is not None:
        meta["optimizer"] = {"name": "adam", "state": optimizer.state_dict()}
    meta.update(overrides)
    return meta


@pytest.fixture
def saved(tmp_path):
    model, optimizer = trained_state()
    path = save_checkpoint(tmp_path / "last.npz", model.state_dict(), metadata(optimizer))
    return path, model, optimizer


def read_raw(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def raw_metadata(arrays: dict[str, np.ndarray]) -> dict:
    return json.loads(arrays[ckpt.METADATA_KEY].tobytes())


def with_metadata(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    return {**arrays, ckpt.METADATA_KEY: np.frombuffer(json.dumps(meta).encode(), np.uint8)}


def resign(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """Rewrite the checksum as a forger would, so the *other* checks are what must fire."""
    body = {k: v for k, v in arrays.items() if k != ckpt.METADATA_KEY}
    meta = {**meta, "sha256": ckpt._checksum(meta, body)}
    return with_metadata(arrays, meta)


# -- round trip ---------------------------------------------------------------------------------


def test_round_trip_restores_model_optimizer_and_metadata(saved, rng):
    path, model, optimizer = saved
    loaded = load_checkpoint(path)
    assert list(loaded.model_state) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert loaded.model_state[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded.model_state[key], value)
    assert (loaded.architecture, loaded.epoch, loaded.dtype) == (ARCH, 3, np.float64)
    assert loaded.classes == tuple(str(i) for i in range(10))
    assert (loaded.mean, loaded.std) == (0.1307, 0.3081)
    # Big-int RNG state survives JSON exactly.
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded.metadata["rng"]["numpy"]
    assert restored.random() == np.random.default_rng(7).random()

    # The optimizer state (int keys, arrays, tuples) loads into a fresh optimizer and steps
    # exactly like the original.
    rebuilt = loaded.build_model()
    fresh = optim.Adam(rebuilt.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded.metadata["optimizer"]["state"])
    x = rng.standard_normal((2, 1, 28, 28))
    for net, opt in ((model, optimizer), (rebuilt, fresh)):
        criterion = CrossEntropyLoss()
        criterion(net(x), np.array([4, 5]))
        opt.zero_grad()
        net.backward(criterion.backward())
        opt.step()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(rebuilt.state_dict()[key], value)


def test_float32_checkpoint_keeps_float32(tmp_path):
    model, _ = trained_state(np.float32)
    path = save_checkpoint(tmp_path / "c.npz", model.state_dict(), metadata(dtype="float32"))
    rebuilt = load_checkpoint(path).build_model()
    assert all(p.dtype == np.float32 for p in rebuilt.parameters())
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with no_grad():
        np.testing.assert_array_equal(rebuilt(x), model(x))


def test_save_refuses_incomplete_metadata(tmp_path):
    model, _ = trained_state()
    meta = metadata()
    del meta["classes"]
    with pytest.raises(ValueError, match="classes"):
        save_checkpoint(tmp_path / "c.npz", model.state_dict(), meta)
    assert not list(tmp_path.iterdir())


# -- atomic writes ------------------------------------------------------------------------------


@pytest.mark.parametrize("crash", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_mid_write_keeps_previous_checkpoint(saved, monkeypatch, crash):
    path, model, _ = saved
    before = path.read_bytes()
    real_savez = np.savez

    def savez_then_crash(file, **arrays):
        real_savez(file, **arrays)
        file.seek(len(before) // 2)
        file.truncate()  # half a file on disk, then the process "dies"
        raise crash

    monkeypatch.setattr(ckpt.np, "savez", savez_then_crash)
    model.state_dict()  # unchanged model; the new save would carry epoch 4
    with pytest.raises(type(crash)):
        save_checkpoint(path, model.state_dict(), metadata(epoch=4))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).epoch == 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_successful_save_replaces_file_and_leaves_no_temporaries(saved):
    path, model, _ = saved
    save_checkpoint(path, model.state_dict(), metadata(epoch=9))
    assert load_checkpoint(path).epoch == 9
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# -- refusing bad files -------------------------------------------------------------------------


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _text(path: Path) -> None:
    path.write_text("this is not a checkpoint\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _npy(path: Path) -> None:
    with path.open("wb") as file:
        np.save(file, np.zeros(3))


def _object_array(path: Path) -> None:
    arrays = read_raw(path)
    arrays["model/0.weight"] = np.array([{"evil": 1}, None], dtype=object)
    np.savez(path, **arrays)


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"model/0.weight": np.zeros(3)}))


def _edited_metadata(path: Path) -> None:
    arrays = read_raw(path)
    meta = raw_metadata(arrays)
    meta["epoch"] = 99
    np.savez(path, **with_metadata(arrays, meta))


def _edited_weight(path: Path) -> None:
    arrays = read_raw(path)
    arrays["model/0.weight"] = arrays["model/0.weight"].copy()
    arrays["model/0.weight"].flat[0] += 1e-3
    np.savez(path, **arrays)


def _no_metadata(path: Path) -> None:
    arrays = read_raw(path)
    del arrays[ckpt.METADATA_KEY]
    np.savez(path, **arrays)


def _renamed_key(path: Path) -> None:
    arrays = read_raw(path)
    arrays["model/0.kernel"] = arrays.pop("model/0.weight")
    np.savez(path, **resign(arrays, raw_metadata(arrays)))


def _wrong_shape(path: Path) -> None:
    arrays = read_raw(path)
    arrays["model/0.weight"] = np.zeros((8, 1, 5, 5))
    np.savez(path, **resign(arrays, raw_metadata(arrays)))


def _unknown_architecture(path: Path) -> None:
    arrays = read_raw(path)
    np.savez(path, **resign(arrays, {**raw_metadata(arrays), "architecture": "resnet152"}))


def _future_version(path: Path) -> None:
    arrays = read_raw(path)
    np.savez(path, **resign(arrays, {**raw_metadata(arrays), "format_version": 2}))


def _nan_weight(path: Path) -> None:
    arrays = read_raw(path)
    arrays["model/0.bias"] = arrays["model/0.bias"].copy()
    arrays["model/0.bias"][0] = np.nan
    np.savez(path, **resign(arrays, raw_metadata(arrays)))


def _wrong_dtype(path: Path) -> None:
    arrays = read_raw(path)
    arrays["model/0.bias"] = arrays["model/0.bias"].astype(np.float32)
    np.savez(path, **resign(arrays, raw_metadata(arrays)))


def _stray_array(path: Path) -> None:
    arrays = read_raw(path)
    arrays["meta/payload"] = np.zeros(3)
    np.savez(path, **resign(arrays, raw_metadata(arrays)))


def _bad_std(path: Path) -> None:
    arrays = read_raw(path)
    meta = raw_metadata(arrays)
    meta["normalization"] = {"mean": 0.1, "std": 0}
    np.savez(path, **resign(arrays, meta))


def _three_classes(path: Path) -> None:
    arrays = read_raw(path)
    np.savez(path, **resign(arrays, {**raw_metadata(arrays), "classes": ["a", "b", "c"]}))


def _negative_epoch(path: Path) -> None:
    arrays = read_raw(path)
    np.savez(path, **resign(arrays, {**raw_metadata(arrays), "epoch": -1}))


def _a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncated, "truncated or corrupted"),
        (_three_classes, "3 class names for a model with 10 outputs"),
        (_negative_epoch, "epoch must be >= 0, got -1"),
        (_a_directory, r"is a directory, not a checkpoint file \(the checkpoints of a run are "
                       r"DIR/best.npz and DIR/last.npz\)"),
        (_text, "neither a zip archive nor a NumPy file"),
        (_empty, "the file is empty"),
        (_npy, r"not a checkpoint \(.npz archive\)"),
        (_pickle, "pickled or object data"),
        (_object_array, "pickled or object data"),
        (_edited_metadata, "checksum mismatch"),
        (_edited_weight, "checksum mismatch"),
        (_no_metadata, "not a scratchcnn checkpoint"),
        (_renamed_key, r"missing keys \['0.weight'\], unexpected keys \['0.kernel'\]"),
        (_wrong_shape, r"'0.weight' has shape \(8, 1, 5, 5\) but 'tiny-cnn' expects"),
        (_unknown_architecture, "unknown architecture 'resnet152'"),
        (_future_version, "format version 2 is not supported"),
        (_nan_weight, "'0.bias' contains NaN"),
        (_wrong_dtype, "'0.bias' is float32 but the checkpoint says float64"),
        (_stray_array, r"unexpected arrays \['meta/payload'\]"),
        (_bad_std, "positive std"),
    ],
)
def test_malformed_or_tampered_checkpoint_is_refused(saved, damage, message):
    path = saved[0]
    damage(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.npz")


# -- PyTorch export / import --------------------------------------------------------------------


def test_export_to_torch_gives_same_logits_and_import_round_trips(saved, torch, tmp_path, rng):
    from scratchcnn.cli import main
    from scratchcnn.reference.torch_models import build_torch_model

    path, model, _ = saved
    exported = tmp_path / "weights.pt"
    assert main(["export-torch", str(path), str(exported)]) == 0
    state_dict = torch.load(exported, weights_only=True)
    twin = build_torch_model(ARCH, dtype=np.float64)
    twin.load_state_dict(state_dict)
    x = rng.standard_normal((5, 1, 28, 28))
    with no_grad(), torch.no_grad():
        expected = model(x)
        actual = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)

    imported = tmp_path / "imported.npz"
    assert main(["import-torch", str(exported), str(imported), "--model", ARCH]) == 0
    back = load_checkpoint(imported)
    assert back.dtype == np.float64 and back.epoch == 0
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(back.model_state[key], value)


def test_import_refuses_wrong_architecture_and_non_state_dicts(saved, torch, tmp_path, capsys):
    from scratchcnn.cli import main
    from scratchcnn.cli.convert import import_torch

    path, _, _ = saved
    exported = tmp_path / "weights.pt"
    main(["export-torch", str(path), str(exported)])
    assert main(["import-torch", str(exported), str(tmp_path / "x.npz"), "--model", "lenet5"]) == 2
    assert "do not match architecture 'lenet5'" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()

    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], listed)
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        import_torch(listed, tmp_path / "y.npz", model=ARCH)


def test_import_never_executes_code_from_the_file(tmp_path, torch):
    from scratchcnn.cli.convert import import_torch

    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):  # unpickling this would create ``marker``
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"0.weight": RunsCode()}, evil)
    with pytest.raises(CheckpointError, match="not a loadable PyTorch weights file"):
        import_torch(evil, tmp_path / "z.npz", model=ARCH)
    assert not marker.exists()


def test_zero_dimensional_buffers_keep_their_shape(tmp_path):
    model = build_model("bn-cnn", dtype=np.float64, rng=np.random.default_rng(0))
    assert model.state_dict()["1.num_batches_tracked"].shape == ()
    path = save_checkpoint(
        tmp_path / "bn.npz", model.state_dict(), metadata(architecture="bn-cnn")
    )
    loaded = load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert loaded.model_state[key].shape == value.shape, key
