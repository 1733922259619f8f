"""safetensors weights: a state_dict as a ``.safetensors`` file, and back, without torch.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range (``data_offsets``, relative to the end of the header) plus optional
string ``__metadata__``, then the tensors' raw little-endian bytes. Nothing in it can run code,
and PyTorch, JAX and the model hubs all read it. The keys are the state_dict's, which are the
PyTorch twin's (``0.weight``, ``1.num_batches_tracked`` ...), so with ``model`` a scratchcnn model
and ``twin`` its ``scratchcnn.reference.torch_models`` twin::

    save_state_dict(model.state_dict(), "w.safetensors")
    model.load_state_dict(load_state_dict("w.safetensors"))
    twin.load_state_dict(safetensors.torch.load_file("w.safetensors"))  # strict, as PyTorch's

and a file written by ``safetensors.torch.save_file(twin.state_dict(), path)`` loads here.

The ``safetensors`` package writes and parses the files. Before it sees a file, the header is
checked here too, so that a damaged one is named in one line by what is wrong with it
(truncated, not a safetensors file, a header that is not JSON, byte ranges that do not match the
shapes) rather than by the package's parser error. NumPy has no bfloat16: such tensors load as
float32, which holds every bfloat16 value exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from scratchcnn.atomic import atomic_write_bytes
from scratchcnn.formats.checkpoint import Checkpoint, CheckpointError
from scratchcnn.formats.weights import common_float_dtype, finite_as, os_reason

SAFETENSORS_INSTALL = "pip install 'scratchcnn[safetensors]'"
SUFFIX = ".safetensors"
METADATA_KEY = "__metadata__"
# Metadata keys of the checkpoint's settings, as formats.onnx names them in metadata_props.
ARCHITECTURE_KEY, DATASET_KEY, MEAN_KEY, STD_KEY = "architecture", "dataset", "mean", "std"
# The header is at most this long in the safetensors package (100 MB): a longer "length" is not
# a header length at all, but the first bytes of some other kind of file.
_HEADER_LIMIT = 100_000_000
_LENGTH_BYTES = 8
# safetensors dtype codes NumPy holds as they are (little-endian, as the format stores them).
_NUMPY_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
}
_BFLOAT16 = "BF16"
# Floating codes by the names torch (and import-torch's messages) give them.
_FLOAT_NAMES = {"F16": "float16", _BFLOAT16: "bfloat16", "F32": "float32", "F64": "float64"}
_ITEM_SIZES = {**{code: dtype.itemsize for code, dtype in _NUMPY_DTYPES.items()}, _BFLOAT16: 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1}
# Sub-byte floats: known to the format, held by no model (their sizes are not checked here).
_KNOWN_DTYPES = {*_ITEM_SIZES, "F4", "F6_E2M3", "F6_E3M2"}
_SAVE_ADVICE = ("save the weights with safetensors.torch.save_file(model.state_dict(), path) or "
                "scratchcnn export-torch CHECKPOINT OUT.safetensors")


def is_safetensors_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a safetensors file (its suffix, in any case, is .safetensors)."""
    return Path(path).suffix.lower() == SUFFIX


def require_safetensors() -> Any:
    """The ``safetensors`` module, or an ImportError that says how to install it."""
    try:
        import safetensors
    except ImportError:
        raise ImportError("the safetensors package is not installed; install it with "
                          f"{SAFETENSORS_INSTALL}") from None
    return safetensors


# -- writing --------------------------------------------------------------------------------------


def save_state_dict(
    state_dict: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` (names to arrays, e.g. ``model.state_dict()``) as a safetensors file,
    atomically: ``path`` ends up with the whole new file or keeps what it held. ``metadata`` is
    stored as the header's string ``__metadata__``. Returns ``path``."""
    safetensors = require_safetensors()
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or key == METADATA_KEY:
            raise ValueError(f"save_state_dict: a tensor name must be a string other than "
                             f"{METADATA_KEY!r}, got {key!r}")
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise ValueError(f"save_state_dict: {key!r} is not an array of numbers (dtype "
                             f"{array.dtype})")
        # safetensors.numpy writes a transposed or strided array's memory, not its values.
        tensors[key] = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("save_state_dict: metadata must map strings to strings")
    from safetensors.numpy import save

    try:
        data = save(tensors, metadata=None if metadata is None else dict(metadata))
    except safetensors.SafetensorError as error:
        raise ValueError(f"save_state_dict: {error}") from None
    return atomic_write_bytes(path, data)


def checkpoint_metadata(checkpoint: Checkpoint) -> dict[str, str]:
    """The string metadata export-torch writes beside a checkpoint's weights: its architecture,
    dataset, classes (JSON), normalisation, dtype and epoch, and ``format: pt`` (the tensors are
    a PyTorch state_dict, as the Hugging Face libraries expect it said)."""
    return {
        "format": "pt",
        ARCHITECTURE_KEY: checkpoint.architecture,
        DATASET_KEY: checkpoint.metadata["dataset"],
        "classes": json.dumps(list(checkpoint.classes)),
        MEAN_KEY: repr(checkpoint.mean),
        STD_KEY: repr(checkpoint.std),
        "dtype": str(checkpoint.dtype),
        "epoch": str(checkpoint.epoch),
    }


def import_settings(
    path: str | os.PathLike,
    *,
    architecture: str | None,
    dataset: str | None,
    mean: float | None,
    std: float | None,
) -> tuple[str | None, str | None, float | None, float | None]:
    """The settings given (None: not given), each missing one taken from the file's metadata
    when it has it (as ``checkpoint_metadata`` writes it); CheckpointError for a value there
    that scratchcnn cannot use."""
    from scratchcnn.data.datasets import CLASS_NAMES
    from scratchcnn.models import MODEL_NAMES

    path = Path(path)
    stored = read_metadata(path)

    def known(key: str, given: str | None, names: Any, option: str) -> str | None:
        if given is not None or key not in stored:
            return given
        if stored[key] not in names:
            raise CheckpointError(f"{path}: its metadata names the {key} {stored[key]!r}, which "
                                  f"scratchcnn does not know; pass {option}")
        return stored[key]

    def number(key: str, given: float | None, positive: bool) -> float | None:
        if given is not None or key not in stored:
            return given
        try:
            value = float(stored[key])
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 <= value <= 1 and (value > 0 or not positive)):
            raise CheckpointError(f"{path}: its metadata gives the {key} {stored[key]!r}, not a "
                                  f"number on the [0, 1] scale of pixel / 255; pass --{key}")
        return value

    return (known(ARCHITECTURE_KEY, architecture, MODEL_NAMES, "--model"),
            known(DATASET_KEY, dataset, CLASS_NAMES, "--dataset"),
            number(MEAN_KEY, mean, positive=False), number(STD_KEY, std, positive=True))


# -- reading --------------------------------------------------------------------------------------


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as NumPy arrays, in the file's order (bfloat16 as
    float32). CheckpointError, naming the file and the problem, for anything else."""
    tensors, _ = _read(Path(path))
    return tensors


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (``{}`` if it has none); reads the
    header only."""
    path = Path(path)
    with _open(path) as file:
        header, _ = _read_header(path, file)
    return dict(header.get(METADATA_KEY, {}))


def load_checked(
    path: str | os.PathLike, architecture: str, dtype: str | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """The state_dict of a safetensors file, checked against ``architecture`` key by key, shape
    by shape and dtype kind, with finite values, converted to ``dtype`` (float32 or float64;
    default: the file's floating dtype, which must then be one of those), and that dtype.
    A missing BatchNorm step counter is 0, as PyTorch takes it. As import-torch reads .pt files
    (``scratchcnn.reference.torch_files``)."""
    from scratchcnn.formats.checkpoint import check_state_matches
    from scratchcnn.models import build_model

    path = Path(path)
    tensors, codes = _read(path)
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors; {_SAVE_ADVICE}")
    dtype = dtype or common_float_dtype(
        path, [_FLOAT_NAMES[code] for code in codes.values() if code in _FLOAT_NAMES])
    reference = build_model(architecture, dtype=dtype, rng=np.random.default_rng(0)).state_dict()
    for key, value in reference.items():
        if key.endswith(".num_batches_tracked") and key not in tensors:
            tensors[key] = np.zeros_like(value)
    check_state_matches(reference, tensors, str(path), architecture)
    return {key: finite_as(path, key, tensors[key], value.dtype)
            for key, value in reference.items()}, dtype


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The file's tensors as arrays and their safetensors dtype codes, after checking the header
    against the file."""
    safetensors = require_safetensors()
    with _open(path) as file:
        header, data_size = _read_header(path, file)
        _check_byte_ranges(path, header, data_size)
        file.seek(0)
        data = file.read()
    try:
        entries = safetensors.deserialize(data)
    except safetensors.SafetensorError as error:  # what the checks here leave to the package
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise CheckpointError(f"{path}: not a valid safetensors file ({reason}); "
                              f"{_SAVE_ADVICE}") from None
    tensors = {}
    codes = {}
    for key, entry in entries:
        code = entry["dtype"]
        if code == _BFLOAT16:
            # A bfloat16 is the upper half of a float32: shifted up, its bits are that float32.
            bits = np.frombuffer(entry["data"], dtype="<u2").astype("<u4") << 16
            array = bits.view("<f4")
        elif code in _NUMPY_DTYPES:
            array = np.frombuffer(entry["data"], dtype=_NUMPY_DTYPES[code])
        else:
            raise CheckpointError(f"{path}: {key!r} has dtype {code}, which NumPy cannot hold; "
                                  "save it as float32 or float64")
        # Native byte order, and a copy that owns writable memory.
        tensors[key] = array.astype(array.dtype.newbyteorder("=")).reshape(entry["shape"])
        codes[key] = code
    return tensors, codes


def _open(path: Path) -> BinaryIO:
    """``path`` opened for reading; CheckpointError if it is missing or unreadable."""

    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a safetensors file")
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the file ({os_reason(error)})") from None


def _read_header(path: Path, file: BinaryIO) -> tuple[dict[str, Any], int]:
    """The JSON header of ``file``, checked to be an object of tensor entries (a known dtype, a
    shape, two data_offsets) and string metadata, and the size of the data after it."""
    size = os.fstat(file.fileno()).st_size
    head = file.read(_LENGTH_BYTES)
    if not head:
        raise CheckpointError(f"{path}: the file is empty (an interrupted copy?); {_SAVE_ADVICE}")
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(
            f"{path}: not a safetensors file but a zip archive (what torch.save writes, or a "
            "scratchcnn .npz checkpoint); a torch.save file is imported under a .pt name")
    if len(head) < _LENGTH_BYTES:
        raise CheckpointError(f"{path}: truncated: {size} bytes, too short for a safetensors "
                              "file (8 bytes of header length, then the header)")
    (length,) = struct.unpack("<Q", head)
    text = file.read(min(length, _HEADER_LIMIT))
    if length > _HEADER_LIMIT or (text and not text.startswith(b"{")):
        raise CheckpointError(f"{path}: not a safetensors file (its first 8 bytes are not the "
                              f"length of a JSON header that follows them); {_SAVE_ADVICE}")
    if len(text) < length:
        raise CheckpointError(f"{path}: truncated: the header alone should take {length} bytes, "
                              f"but the file ends {len(text)} bytes into it (an interrupted "
                              "copy?)")
    try:
        header = json.loads(text.decode("utf-8"))  # an object: the text starts with {
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a safetensors file: its header is not JSON "
                              f"({error}); {_SAVE_ADVICE}") from None
    metadata = header.get(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the header's {METADATA_KEY} is not a map of strings to "
                              "strings; the file is damaged")
    for key, entry in header.items():
        if key == METADATA_KEY:
            continue
        if not (isinstance(entry, dict) and _whole_numbers(entry.get("shape"))
                and _whole_numbers(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2):
            raise CheckpointError(f"{path}: the header's entry for {key!r} is not a tensor's "
                                  "(a dtype, a shape and two data_offsets); the file is damaged")
        if entry.get("dtype") not in _KNOWN_DTYPES:
            raise CheckpointError(f"{path}: the header gives {key!r} the dtype "
                                  f"{entry.get('dtype')!r}, which safetensors does not have; "
                                  "the file is damaged")
    return header, size - _LENGTH_BYTES - length


def _whole_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)


def _check_byte_ranges(path: Path, header: Mapping[str, Any], data_size: int) -> None:
    """Each tensor's byte range must hold its dtype and shape exactly, and the ranges must follow
    one another from 0 to the ``data_size`` bytes after the header, without gap or overlap; a
    shorter file is a truncated one. (The package refuses all of these, in words that name
    neither the tensor nor the problem.)"""
    ranges = []
    for key, entry in header.items():
        if key == METADATA_KEY:
            continue
        if entry["dtype"] not in _ITEM_SIZES:
            return  # sub-byte floats: left to the package
        begin, stop = entry["data_offsets"]
        needed = math.prod(entry["shape"]) * _ITEM_SIZES[entry["dtype"]]
        if stop - begin != needed:
            raise CheckpointError(
                f"{path}: the header does not match the data: {key!r} is {entry['dtype']} of "
                f"shape {entry['shape']} ({needed} bytes), but its data_offsets "
                f"[{begin}, {stop}] span {stop - begin} bytes; the file is damaged")
        ranges.append((begin, stop, key))
    position, previous = 0, None
    for begin, stop, key in sorted(ranges):
        if begin != position:
            what = "overlap" if begin < position else "leave a gap"
            between = (f"{previous!r} and {key!r}" if previous is not None
                       else f"the start and {key!r}")
            raise CheckpointError(f"{path}: the header's byte ranges of {between} {what}; the "
                                  "file is damaged")
        position, previous = stop, key
    if position > data_size:
        raise CheckpointError(f"{path}: truncated: the header describes {position} bytes of "
                              f"tensor data but the file holds {data_size} (an interrupted "
                              "copy?)")
    if position < data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes follow the last tensor the "
                              "header describes, which a safetensors file may not have; the "
                              "file is damaged")
