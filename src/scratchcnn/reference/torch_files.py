"""Reading a PyTorch ``state_dict`` file safely: ``torch.load(..., weights_only=True)``, which
never unpickles Python objects, behind checks that turn whatever else a user may hand over (a text
file, a scratchcnn checkpoint, a whole pickled model, a wrapper dict, bfloat16, sparse or meta
tensors) into one-line CheckpointErrors that say what the file is and what to do.
``load_checked`` is what ``scratchcnn import-torch`` (cli/convert.py) reads a .pt file with;
``scratchcnn.formats.safetensors.load_checked`` reads a .safetensors file the same way."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from scratchcnn.formats.weights import common_float_dtype, finite_as, os_reason

# torch.save writes a zip archive; files from before PyTorch 1.6 are a pickle (protocol 2).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"
# The wrappers training scripts commonly save around a state_dict, e.g.
# {"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": ...}.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STATE_DICT = "a state_dict (a dict mapping parameter names such as '0.weight' to tensors)"
_SAVE_ADVICE = "save the weights with torch.save(model.state_dict(), path)"


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The tensors of a torch state_dict file (``torch.load`` with ``weights_only=True``,
    unwrapped from a ``{"state_dict": ...}``-style dict); CheckpointError for anything else."""
    import torch

    from scratchcnn.formats.checkpoint import CheckpointError

    path = Path(path)
    _check_torch_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, FileNotFoundError, IsADirectoryError) as error:
        raise CheckpointError(f"{path}: cannot read the file ({os_reason(error)})") from None
    except Exception as error:  # damaged files raise assorted errors (truncated ones: OSError)
        raise _not_loadable(path, error) from None
    if isinstance(loaded, Mapping) and not _is_state_dict(loaded):
        wrapped = [k for k in _WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)]
        if len(wrapped) > 1:
            raise CheckpointError(
                f"{path}: holds several candidate state_dicts ({', '.join(map(repr, wrapped))}); "
                "save the one to import by itself with torch.save(state_dict, path)"
            )
        if wrapped:
            loaded = loaded[wrapped[0]]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path}: expected {_STATE_DICT}, got {_describe(loaded)}; {_SAVE_ADVICE}"
        )
    if not loaded:
        raise CheckpointError(f"{path}: the file holds no tensors (an empty dict); {_SAVE_ADVICE}")
    if not _is_state_dict(loaded):
        keys = list(loaded)
        shown = ", ".join(map(repr, keys[:10])) + (f", ... ({len(keys)} in all)"
                                                   if len(keys) > 10 else "")
        others = [
            f"{key!r}: {_describe(value)}"
            for key, value in loaded.items()
            if not (isinstance(key, str) and isinstance(value, torch.Tensor))
        ]
        raise CheckpointError(
            f"{path}: expected {_STATE_DICT}, got a dict with keys [{shown}], not all of them "
            f"names of tensors ({'; '.join(others[:5])}); {_SAVE_ADVICE}"
        )
    return dict(loaded)


def _check_torch_file(path: Path) -> None:
    """Refuse what torch.load would misreport: a missing, unreadable, empty or non-torch file,
    and a .npz archive (a scratchcnn checkpoint is a zip archive too)."""
    import zipfile

    from scratchcnn.formats.checkpoint import METADATA_KEY, CheckpointError

    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a PyTorch weights file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with path.open("rb") as file:
            head = file.read(len(_ZIP_MAGIC))
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the file ({os_reason(error)})") from None
    if not head:
        raise CheckpointError(f"{path}: the file is empty (an interrupted copy?); {_SAVE_ADVICE}")
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise CheckpointError(
            f"{path}: not a PyTorch weights file (neither the zip archive nor the pickle that "
            f"torch.save writes); {_SAVE_ADVICE}"
        )
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return  # torch.load reports a damaged archive
        if f"{METADATA_KEY}.npy" in names:
            raise CheckpointError(
                f"{path}: is a scratchcnn checkpoint already, there is nothing to import; use it "
                "as it is (evaluate, predict, train --resume), or export-torch it to get a "
                "PyTorch file"
            )
        if names and all(name.endswith(".npy") for name in names):
            raise CheckpointError(
                f"{path}: is a NumPy .npz archive, not a PyTorch weights file; {_SAVE_ADVICE}"
            )


def _not_loadable(path: Path, error: BaseException) -> Exception:
    from scratchcnn.formats.checkpoint import CheckpointError

    text = _ANSI_ESCAPE.sub("", str(error))
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        name = refused.group(1)
        what = "a whole model" if name.startswith("torch.nn.modules.") else "Python objects"
        return CheckpointError(
            f"{path}: not a loadable PyTorch weights file: it holds {what} ({name}) besides "
            f"tensors, and such objects are never unpickled since that could run code; "
            f"{_SAVE_ADVICE}"
        )
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return CheckpointError(
        f"{path}: not a loadable PyTorch weights file (truncated or damaged? "
        f"{type(error).__name__}: {first_line}); {_SAVE_ADVICE}"
    )


def _is_state_dict(value: Mapping) -> bool:
    import torch

    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _describe(value: object) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def load_checked(
    path: str | os.PathLike, architecture: str, dtype: str | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """The state_dict of a torch file, checked against ``architecture`` key by key, shape by
    shape and dtype kind, with finite values, converted to ``dtype`` (float32 or float64;
    default: the file's floating dtype, which must then be one of those), and that dtype.
    A missing BatchNorm step counter is 0, as PyTorch takes it."""
    import torch

    from scratchcnn.formats.checkpoint import check_state_matches
    from scratchcnn.models import build_model

    tensors = load_torch_state_dict(path)
    for key, tensor in tensors.items():
        check_tensor_usable(path, key, tensor)
    dtype = dtype or common_float_dtype(
        path, [str(t.dtype).removeprefix("torch.") for t in tensors.values()
               if t.is_floating_point()])
    reference = build_model(architecture, dtype=dtype, rng=np.random.default_rng(0)).state_dict()
    for key, value in reference.items():
        if key.endswith(".num_batches_tracked") and key not in tensors:
            tensors[key] = torch.from_numpy(np.zeros_like(value))
    # Keys, shapes and kinds first, on stand-ins without memory: a sparse tensor is only made
    # dense once its shape is known to be the architecture's.
    check_state_matches(
        reference,
        {key: stand_in(tensor, reference.get(key)) for key, tensor in tensors.items()},
        str(path),
        architecture,
    )
    return {key: to_numpy(path, key, tensors[key], value.dtype)
            for key, value in reference.items()}, dtype


def check_tensor_usable(path: str | os.PathLike, key: str, tensor: Any) -> None:
    from scratchcnn.formats.checkpoint import CheckpointError

    if tensor.is_meta:
        raise CheckpointError(
            f"{path}: {key!r} is a meta tensor, a shape without values (saved from a model "
            "not yet materialised, e.g. built on device 'meta'); save a model holding real "
            "weights"
        )
    if tensor.is_quantized:
        raise CheckpointError(
            f"{path}: {key!r} is quantized ({tensor.dtype}); save the float model's state_dict"
        )
    if not tensor.is_floating_point() and _numpy_dtype(tensor) is None:
        raise CheckpointError(f"{path}: {key!r} has dtype {tensor.dtype}, which no model has")


def stand_in(tensor: Any, reference: np.ndarray | None) -> np.ndarray:
    """A zero-memory array with the tensor's shape and a NumPy dtype of the same kind."""
    if tensor.is_floating_point() and reference is not None and reference.dtype.kind == "f":
        dtype = reference.dtype  # what it will be converted to
    else:
        dtype = _numpy_dtype(tensor) or np.dtype(np.float32)  # floats NumPy lacks: bfloat16...
    return np.broadcast_to(np.zeros((), dtype=dtype), tuple(tensor.shape))


def _numpy_dtype(tensor: Any) -> np.dtype | None:
    try:
        return np.dtype(str(tensor.dtype).removeprefix("torch."))
    except TypeError:
        return None


def to_numpy(path: str | os.PathLike, key: str, tensor: Any, dtype: np.dtype) -> np.ndarray:
    """A NumPy copy of ``tensor`` in ``dtype`` (bfloat16, float16 and sparse tensors included);
    CheckpointError if it holds NaN or infinite values or does not fit ``dtype``."""
    import torch

    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float64)  # holds every value of every torch float dtype exactly
    return finite_as(path, key, tensor.numpy(), dtype)


