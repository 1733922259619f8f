"""Checkpoints: one ``.npz`` file holding a model's weights and everything needed to resume a run.

Layout of the file (``np.savez``: plain arrays only, read back with ``allow_pickle=False``)::

    model/<key>        one array per entry of the model's state_dict ("model/0.weight", ...)
    meta/<path>        arrays found inside the metadata (optimizer moments, torch RNG bytes...)
    __metadata__       the metadata as UTF-8 JSON bytes (a uint8 array)

The metadata is a JSON object: format and version, architecture, dataset, class names,
normalisation, dtype, epoch, optimizer (name, hyper-parameters, per-parameter state), RNG state,
run configuration. Arrays nested in it are replaced by ``{"__array__": "meta/<path>"}``
references, and dicts with non-string keys (a torch-style optimizer state is keyed by parameter
index) by ``{"__items__": [[key, value], ...]}``, so any such structure survives the round trip.

``sha256`` in the metadata covers the rest of the metadata and every array (name, dtype, shape,
bytes): an edited or corrupted file is refused. It is an integrity check, not a signature.

Files are written atomically (temporary file in the same directory, fsync, ``os.replace``), so a
run killed at any moment leaves either the previous checkpoint or the new one, never half a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scratchcnn.atomic import atomic_write

FORMAT = "scratchcnn-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "__metadata__"
MODEL_PREFIX = "model/"
META_PREFIX = "meta/"
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "architecture": str,
    "dataset": str,
    "classes": list,
    "normalization": dict,
    "dtype": str,
    "epoch": int,
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A loaded (and validated) checkpoint."""

    path: Path | None
    metadata: dict[str, Any]
    model_state: dict[str, np.ndarray]

    @property
    def architecture(self) -> str:
        return self.metadata["architecture"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.metadata["dtype"])

    @property
    def epoch(self) -> int:
        return self.metadata["epoch"]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.metadata["classes"])

    @property
    def mean(self) -> float:
        return float(self.metadata["normalization"]["mean"])

    @property
    def std(self) -> float:
        return float(self.metadata["normalization"]["std"])

    def build_model(self, rng: np.random.Generator | None = None):
        """A fresh NumPy model of this architecture and dtype, holding the checkpoint's weights."""
        model = _fresh_model(self.architecture, self.dtype, self.path, rng)
        model.load_state_dict(self.model_state)
        return model


# -- saving -------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    model_state: Mapping[str, Any],
    metadata: Mapping[str, Any],
) -> Path:
    """Write a checkpoint atomically. ``model_state`` maps state_dict keys to arrays (NumPy, or
    anything with a ``.numpy()`` such as CPU tensors); ``metadata`` must hold the fields of
    ``REQUIRED_FIELDS`` and may hold arrays anywhere (optimizer state, RNG state)."""
    missing = [name for name in REQUIRED_FIELDS if name not in metadata]
    if missing:
        raise ValueError(f"checkpoint metadata for {path} lacks the fields {missing}")
    arrays: dict[str, np.ndarray] = {}
    for key, value in model_state.items():
        arrays[MODEL_PREFIX + key] = _c_order(_to_numpy(value))
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in metadata.items() if k not in ("format", "format_version", "sha256")},
    }
    encoded = _encode(body, META_PREFIX.rstrip("/"), arrays)
    encoded["sha256"] = _checksum(encoded, arrays)
    arrays[METADATA_KEY] = np.frombuffer(
        json.dumps(encoded, allow_nan=False).encode("utf-8"), dtype=np.uint8
    )
    return atomic_write(path, lambda file: np.savez(file, **arrays))


def _c_order(array: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it turns 0-d arrays (BatchNorm's step counter) into 1-d ones.
    return np.asarray(array, order="C")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        return value.detach().cpu().numpy().copy()
    return np.asarray(value)


def _encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON-able copy of ``value``; arrays go into ``arrays`` under their path."""
    if isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "numpy")):
        is_tensor = not isinstance(value, np.ndarray)
        arrays[path] = _c_order(_to_numpy(value))
        return {"__array__": path, "tensor": True} if is_tensor else {"__array__": path}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        if all(isinstance(key, str) for key in value):
            for key in value:
                if key.startswith("__") or "/" in key:
                    raise ValueError(f"checkpoint metadata key {key!r} is reserved")
            return {key: _encode(item, f"{path}/{key}", arrays) for key, item in value.items()}
        return {
            "__items__": [
                [_plain_key(key), _encode(item, f"{path}/{key}", arrays)]
                for key, item in value.items()
            ]
        }
    if isinstance(value, (list, tuple)):
        return [_encode(item, f"{path}/{i}", arrays) for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"checkpoint metadata {path!r} is {value}; only finite numbers are saved")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path!r} in a checkpoint")


def _plain_key(key: Any) -> int | str:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer, str)):
        raise TypeError(f"checkpoint metadata keys must be str or int, got {key!r}")
    return key if isinstance(key, str) else int(key)


def _checksum(encoded_metadata: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    body = {k: v for k, v in encoded_metadata.items() if k != "sha256"}
    digest.update(json.dumps(body, sort_keys=True, allow_nan=False).encode("utf-8"))
    for name in sorted(k for k in arrays if k != METADATA_KEY):
        array = _c_order(arrays[name])
        digest.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# -- loading ------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike,
    *,
    tensor_hook: Callable[[np.ndarray], Any] | None = None,
    check_model: bool = True,
) -> Checkpoint:
    """Read and validate a checkpoint; raises CheckpointError naming the file and the problem.

    Checks, in order: a readable ``.npz`` of plain arrays, JSON metadata of a known format
    version with the required fields, the SHA-256, finite floating values in the run's dtype,
    and (``check_model``) that the model arrays match a freshly built model of the recorded
    architecture key by key and shape by shape. Arrays that were tensors when saved are passed
    through ``tensor_hook`` (e.g. ``torch.from_numpy``) if given.
    """
    path = Path(path)
    arrays = _read_arrays(path)
    if METADATA_KEY not in arrays:
        raise CheckpointError(f"{path}: not a scratchcnn checkpoint (no {METADATA_KEY} entry)")
    metadata = _parse_metadata(path, arrays.pop(METADATA_KEY))
    expected = metadata.get("sha256")
    if not isinstance(expected, str) or _checksum(metadata, arrays) != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch: the file was modified or corrupted after it was "
            "written; use an intact checkpoint"
        )
    _check_fields(path, metadata)
    model_state = {
        name[len(MODEL_PREFIX):]: array
        for name, array in arrays.items()
        if name.startswith(MODEL_PREFIX)
    }
    if metadata.get("framework") == "torch":
        _add_missing_step_counters(model_state)
    referenced: set[str] = set()
    decoded = _decode(path, metadata, arrays, referenced, tensor_hook)
    stray = sorted(set(arrays) - referenced - {MODEL_PREFIX + k for k in model_state})
    if stray:
        raise CheckpointError(f"{path}: unexpected arrays {stray} not described by the metadata")
    _check_values(path, decoded["dtype"], model_state, {k: arrays[k] for k in referenced})
    checkpoint = Checkpoint(path=path, metadata=decoded, model_state=model_state)
    if check_model:
        _check_against_architecture(checkpoint)
    return checkpoint


def _add_missing_step_counters(model_state: dict[str, np.ndarray]) -> None:
    """Torch-side checkpoints (train --framework torch, import-torch) written before
    BatchNorm's ``num_batches_tracked`` was kept lack it: give them a counter of 0, as PyTorch
    does for state_dicts older than that buffer, rather than refuse them."""
    for key in list(model_state):
        if key.endswith(".running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            model_state.setdefault(counter, np.array(0, dtype=np.int64))


# The first bytes of a zip archive (np.savez's format), a .npy file and a pickle (protocol 2+).
_ZIP_MAGIC = b"PK"
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_MAGIC = b"\x80"


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file (the checkpoints "
                              "of a run are DIR/best.npz and DIR/last.npz)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with path.open("rb") as file:
        head = file.read(len(_NPY_MAGIC))
    if not head:
        raise CheckpointError(f"{path}: the file is empty (an interrupted copy?), not a checkpoint")
    # np.load hands a file of any other kind to pickle, which allow_pickle=False then refuses:
    # say what the file is not, rather than calling a text file pickled data.
    if not head.startswith((_ZIP_MAGIC, _NPY_MAGIC, _PICKLE_MAGIC)):
        raise CheckpointError(f"{path}: not a checkpoint: a checkpoint is a .npz (zip) archive "
                              "written by scratchcnn, and this file is neither a zip archive nor "
                              "a NumPy file")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: not a checkpoint (.npz archive) but a single array")
        with archive:
            return {name: archive[name] for name in archive.files}
    except CheckpointError:
        raise
    except ValueError as error:
        if "allow_pickle" in str(error) or "pickled" in str(error):
            raise CheckpointError(
                f"{path}: contains pickled or object data, which is never loaded (it could run "
                "code); this is not a checkpoint written by scratchcnn"
            ) from None
        raise CheckpointError(f"{path}: unreadable checkpoint ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise CheckpointError(
            f"{path}: not a valid .npz checkpoint (truncated or corrupted? {error})"
        ) from None
    except Exception as error:  # malformed zip members surface as assorted errors
        raise CheckpointError(
            f"{path}: corrupted checkpoint ({type(error).__name__}: {error})"
        ) from None


def _parse_metadata(path: Path, raw: np.ndarray) -> dict[str, Any]:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: metadata entry is {raw.dtype} {raw.shape}, not JSON bytes")
    try:
        metadata = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a scratchcnn checkpoint (format is not {FORMAT!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported (this scratchcnn "
            f"reads version {FORMAT_VERSION}); re-create it with a matching scratchcnn"
        )
    return metadata


def _check_fields(path: Path, metadata: Mapping[str, Any]) -> None:
    for name, kind in REQUIRED_FIELDS.items():
        value = metadata.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: metadata field {name!r} is missing or malformed")
    if metadata["dtype"] not in ("float32", "float64"):
        raise CheckpointError(f"{path}: dtype {metadata['dtype']!r} is not float32 or float64")
    norm = metadata["normalization"]
    std = norm.get("std")
    if not all(isinstance(norm.get(k), (int, float)) for k in ("mean", "std")) or not std > 0:
        raise CheckpointError(f"{path}: normalization must hold a mean and a positive std")
    if not metadata["classes"] or not all(isinstance(c, str) for c in metadata["classes"]):
        raise CheckpointError(f"{path}: classes must be a non-empty list of names")
    if metadata["epoch"] < 0:
        raise CheckpointError(f"{path}: epoch must be >= 0, got {metadata['epoch']}")


def _decode(
    path: Path,
    value: Any,
    arrays: Mapping[str, np.ndarray],
    referenced: set[str],
    tensor_hook: Callable[[np.ndarray], Any] | None,
) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            name = value["__array__"]
            if not isinstance(name, str) or not name.startswith(META_PREFIX) or name not in arrays:
                raise CheckpointError(f"{path}: metadata refers to a missing array {name!r}")
            referenced.add(name)
            array = arrays[name]
            return tensor_hook(array) if value.get("tensor") and tensor_hook else array
        if "__items__" in value:
            return {
                key: _decode(path, item, arrays, referenced, tensor_hook)
                for key, item in value["__items__"]
            }
        return {k: _decode(path, v, arrays, referenced, tensor_hook) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(path, item, arrays, referenced, tensor_hook) for item in value]
    return value


def _check_values(
    path: Path,
    dtype: str,
    model_state: Mapping[str, np.ndarray],
    extra_arrays: Mapping[str, np.ndarray],
) -> None:
    if not model_state:
        raise CheckpointError(f"{path}: the checkpoint holds no model weights")
    for name, array in _all_arrays(model_state, extra_arrays):
        if array.dtype.kind == "f" and array.dtype != np.dtype(dtype) and name in model_state:
            raise CheckpointError(
                f"{path}: {name!r} is {array.dtype} but the checkpoint says {dtype}"
            )
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            raise CheckpointError(
                f"{path}: {name!r} contains NaN or infinite values; use an earlier checkpoint"
            )


def _all_arrays(
    model_state: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray]
) -> Iterator[tuple[str, np.ndarray]]:
    yield from model_state.items()
    yield from extra.items()


def _fresh_model(
    architecture: str, dtype: np.dtype, path: Path | None, rng: np.random.Generator | None = None
):
    from scratchcnn.models import MODEL_NAMES, build_model

    if architecture not in MODEL_NAMES:
        raise CheckpointError(
            f"{path}: unknown architecture {architecture!r}; known: {', '.join(MODEL_NAMES)}"
        )
    return build_model(architecture, dtype=dtype, rng=rng or np.random.default_rng(0))


def _check_against_architecture(checkpoint: Checkpoint) -> None:
    path = checkpoint.path
    expected = _fresh_model(checkpoint.architecture, checkpoint.dtype, path).state_dict()
    check_state_matches(expected, checkpoint.model_state, f"{path}", checkpoint.architecture)
    # The classifier's last weight is (classes, features): one name per output, or predict
    # would name a class that is not there (or miss one).
    outputs = [array.shape[0] for array in expected.values() if array.ndim == 2][-1]
    if len(checkpoint.classes) != outputs:
        raise CheckpointError(
            f"{path}: {len(checkpoint.classes)} class names for a model with {outputs} outputs; "
            "the classes must match the model's last layer"
        )


def check_state_matches(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, Any],
    where: str,
    architecture: str,
) -> None:
    """Raise CheckpointError unless ``actual`` has exactly the keys and shapes of ``expected``
    (and the same dtype kind: floats where the model has floats)."""
    missing = [key for key in expected if key not in actual]
    unexpected = [key for key in actual if key not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match architecture {architecture!r}: missing keys "
            f"{missing}, unexpected keys {unexpected}"
        )
    for key, reference in expected.items():
        value = actual[key]
        shape = tuple(value.shape)
        if shape != reference.shape:
            raise CheckpointError(
                f"{where}: {key!r} has shape {shape} but {architecture!r} expects "
                f"{reference.shape}"
            )
        kind = np.dtype(str(value.dtype).replace("torch.", "")).kind
        if kind != reference.dtype.kind:
            raise CheckpointError(
                f"{where}: {key!r} has dtype {value.dtype}, expected {reference.dtype}"
            )
