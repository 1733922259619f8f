"""The IDX file format (the one MNIST and Fashion-MNIST ship in), read defensively.

Layout: a 4-byte magic number ``00 00 TT RR`` (TT: element type code, RR: rank), then RR big-endian
uint32 dimensions, then the elements in big-endian, C order. Files may be gzip-compressed.

Every problem raises :class:`DatasetError` naming the file. Memory is bounded by what the file
really contains: a raw file's size must match its header exactly before anything is allocated, and
a gzip file is decompressed in chunks that stop at the declared size, after a check that the
declared size is achievable at all from the compressed size (deflate cannot expand beyond ~1032:1).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from scratchcnn.atomic import atomic_write_bytes


class DatasetError(ValueError):
    """A dataset file or directory is missing, corrupt or inconsistent (the message says which)."""


# IDX type code -> big-endian element dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
# Deflate's best case is 1032:1; the margin covers gzip's own header and trailer.
MAX_GZIP_RATIO = 1032
GZIP_OVERHEAD = 1024
CHUNK_BYTES = 1 << 22


class IdxHeader(NamedTuple):
    dtype: np.dtype  # big-endian, as stored
    shape: tuple[int, ...]
    header_bytes: int

    @property
    def payload_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


def _read_exactly(stream: BinaryIO, size: int, path: Path, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise DatasetError(
            f"{path}: truncated {what}: expected {size} bytes, found {len(data)}; "
            "the file is incomplete, delete it and download it again"
        )
    return data


def _parse_header(stream: BinaryIO, path: Path) -> IdxHeader:
    magic = _read_exactly(stream, 4, path, "IDX header")
    if magic[0] != 0 or magic[1] != 0:
        raise DatasetError(
            f"{path}: not an IDX file (magic number {magic.hex()} should start with 0000)"
        )
    type_code, rank = magic[2], magic[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise DatasetError(f"{path}: unknown IDX type code 0x{type_code:02X} (known: {known})")
    if not 1 <= rank <= 32:
        raise DatasetError(f"{path}: IDX rank {rank} is not supported (expected 1 to 32)")
    dims = _read_exactly(stream, 4 * rank, path, "IDX dimensions")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    return IdxHeader(IDX_DTYPES[type_code], shape, 4 + 4 * rank)


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            start = stream.read(2)
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the file ({error})") from None
    if not start:
        raise DatasetError(f"{path}: the file is empty; delete it and download it again")
    # Some browsers decompress downloads but keep the .gz name: raw IDX under that name is fine.
    if path.suffix == ".gz" and start not in (GZIP_MAGIC, b"\x00\x00"):
        raise DatasetError(
            f"{path}: named .gz but neither gzip-compressed nor IDX (starts with {start.hex()}); "
            "delete it and download it again"
        )
    return start == GZIP_MAGIC


def read_idx_header(path: str | os.PathLike) -> IdxHeader:
    """The element dtype and shape of an IDX file, reading only its header."""
    path = Path(path)
    _check_is_file(path)
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as stream:
            return _parse_header(stream, path)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: cannot read the IDX header ({error})") from None


def _check_is_file(path: Path) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")


def _read_raw_payload(
    stream: BinaryIO, header: IdxHeader, file_size: int, path: Path
) -> bytearray:
    expected = header.header_bytes + header.payload_bytes
    if file_size < expected:
        raise DatasetError(
            f"{path}: truncated payload: header declares shape {header.shape} "
            f"({expected} bytes in all) but the file has {file_size} bytes"
        )
    if file_size > expected:
        raise DatasetError(
            f"{path}: {file_size - expected} trailing bytes after the payload of shape "
            f"{header.shape}; the file is corrupt"
        )
    payload = bytearray(header.payload_bytes)
    if stream.readinto(payload) != len(payload):
        raise DatasetError(f"{path}: the file changed while it was being read")
    return payload


def _read_gzip_payload(
    stream: BinaryIO, header: IdxHeader, file_size: int, path: Path
) -> bytearray:
    capacity = file_size * MAX_GZIP_RATIO + GZIP_OVERHEAD
    if header.payload_bytes > capacity:
        raise DatasetError(
            f"{path}: header declares shape {header.shape} ({header.payload_bytes} bytes), "
            f"more than a {file_size}-byte gzip file can hold; the file is corrupt"
        )
    # Chunks stop at the declared size, so memory never exceeds what the stream really holds.
    chunks = []
    remaining = header.payload_bytes
    while remaining > 0:
        chunk = stream.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    if remaining:
        raise DatasetError(
            f"{path}: truncated payload: header declares shape {header.shape} "
            f"({header.payload_bytes} bytes) but the data ends after "
            f"{header.payload_bytes - remaining} bytes"
        )
    if stream.read(1):
        raise DatasetError(
            f"{path}: trailing bytes after the payload of shape {header.shape}; the file is corrupt"
        )
    return bytearray().join(chunks)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a native-endian array of its declared shape.

    Raises DatasetError, naming the file, for anything wrong: missing, empty, not gzip, bad magic,
    unknown type code, truncated or trailing data, or dimensions the file cannot hold.
    """
    path = Path(path)
    _check_is_file(path)
    file_size = path.stat().st_size
    compressed = _is_gzip(path)
    try:
        if compressed:
            with gzip.open(path, "rb") as stream:
                header = _parse_header(stream, path)
                payload = _read_gzip_payload(stream, header, file_size, path)
        else:
            with open(path, "rb") as stream:
                header = _parse_header(stream, path)
                payload = _read_raw_payload(stream, header, file_size, path)
    except EOFError as error:
        raise DatasetError(
            f"{path}: truncated gzip stream ({error}); delete the file and download it again"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DatasetError(
            f"{path}: corrupt gzip data ({error}); delete the file and download it again"
        ) from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the file ({error})") from None
    big_endian = np.frombuffer(payload, dtype=header.dtype).reshape(header.shape)
    native = header.dtype.newbyteorder("=")
    if header.dtype.itemsize == 1:
        return big_endian.view(native)  # the bytearray is ours: no copy needed
    return big_endian.astype(native)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress`` or the name ends .gz).

    Used by tests and tools; the write is atomic (temporary file, then rename).
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"write_idx: dtype {array.dtype} has no IDX type code")
    if not 1 <= array.ndim <= 32:
        raise ValueError(f"write_idx: rank {array.ndim} is not supported (1 to 32)")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    data = header + payload
    if compress or (compress is None and path.suffix == ".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)
