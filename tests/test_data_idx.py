"""read_idx: every element type and rank, raw and gzip, and hostile files that must fail fast
with a DatasetError naming the file, in bounded time and memory."""

from __future__ import annotations

import gzip
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchcnn.data import DatasetError, read_idx, read_idx_header, write_idx
from scratchcnn.data.idx import IDX_DTYPES

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused; each example overwrites
TYPE_CODES = {code: dtype.newbyteorder("=") for code, dtype in IDX_DTYPES.items()}


def idx_bytes(type_code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file built by hand, independently of write_idx."""
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def write(tmp_path, name: str, data: bytes, compress: bool = False):
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# ------------------------------------------------------------------------------- valid files


def test_reads_hand_built_big_endian_values(tmp_path):
    int16 = idx_bytes(0x0B, (3,), bytes.fromhex("0102 fffe 8000"))
    assert read_idx(write(tmp_path, "a", int16)).tolist() == [258, -2, -32768]
    float32 = idx_bytes(0x0D, (2,), bytes.fromhex("3fc00000 c0200000"))
    assert read_idx(write(tmp_path, "b", float32)).tolist() == [1.5, -2.5]
    int32 = idx_bytes(0x0C, (1, 1), bytes.fromhex("00010000"))
    assert read_idx(write(tmp_path, "c", int32)).tolist() == [[65536]]
    int8 = idx_bytes(0x09, (2,), bytes.fromhex("ff7f"))
    assert read_idx(write(tmp_path, "d", int8)).tolist() == [-1, 127]
    float64 = idx_bytes(0x0E, (1,), bytes.fromhex("c000000000000000"))
    assert read_idx(write(tmp_path, "e", float64, compress=True)).tolist() == [-2.0]


def test_uint8_images_gzip_and_raw_agree_and_are_native_writeable(tmp_path, rng):
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    payload = idx_bytes(0x08, images.shape, images.tobytes())
    raw = read_idx(write(tmp_path, "x-idx3-ubyte", payload))
    packed = read_idx(write(tmp_path, "x-idx3-ubyte.gz", payload, compress=True))
    for result in (raw, packed):
        np.testing.assert_array_equal(result, images)
        assert result.dtype == np.uint8 and result.flags.writeable
        result[0, 0, 0] = 1  # must not raise: callers may modify what they load


def test_multibyte_results_are_native_endian(tmp_path):
    data = np.arange(6, dtype=">i4").reshape(2, 3)
    result = read_idx(write(tmp_path, "f", idx_bytes(0x0C, (2, 3), data.tobytes())))
    assert result.dtype == np.dtype(np.int32) and result.dtype.isnative
    np.testing.assert_array_equal(result, np.arange(6).reshape(2, 3))


def test_raw_idx_under_a_gz_name_reads(tmp_path):
    # Browsers that decompress downloads but keep the name produce exactly this.
    np.testing.assert_array_equal(read_idx(write(tmp_path, "x.gz", VALID)),
                                  np.arange(36, dtype=np.uint8).reshape(4, 3, 3))


def test_header_only_read(tmp_path):
    path = write(tmp_path, "h.gz", idx_bytes(0x08, (5, 2, 3), bytes(30)), compress=True)
    header = read_idx_header(path)
    assert header.shape == (5, 2, 3) and header.dtype.itemsize == 1 and header.header_bytes == 16


def test_empty_dimension_is_an_empty_array(tmp_path):
    result = read_idx(write(tmp_path, "z", idx_bytes(0x08, (0, 28, 28), b"")))
    assert result.shape == (0, 28, 28)


shapes = st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(code=st.sampled_from(sorted(TYPE_CODES)), shape=shapes, compress=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_round_trip_every_type_rank_and_compression(tmp_path, code, shape, compress, seed):
    dtype = TYPE_CODES[code]
    generator = np.random.default_rng(seed)
    if dtype.kind == "f":
        array = generator.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = generator.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    path = tmp_path / ("r.gz" if compress else "r")
    write_idx(path, array, compress=compress)
    result = read_idx(path)
    assert result.dtype == dtype and result.shape == shape
    np.testing.assert_array_equal(result, array)


# ----------------------------------------------------------------------------- hostile files

VALID = idx_bytes(0x08, (4, 3, 3), bytes(range(36)))
ABSURD = idx_bytes(0x08, (2**31, 2**31, 2**31), bytes(64))

HOSTILE = {
    "empty": (b"", False, "empty"),
    "not gzip despite .gz": (b"<html>404 Not Found</html>", "name.gz", "neither gzip"),
    "wrong magic": (b"\x08\x03" + VALID[2:], False, "not an IDX file"),
    "unknown type code": (VALID[:2] + b"\x0a" + VALID[3:], False, "unknown IDX type code"),
    "rank zero": (b"\x00\x00\x08\x00", False, "rank 0"),
    "truncated header": (VALID[:10], False, "truncated IDX dimensions"),
    "truncated payload": (VALID[:-5], False, "truncated payload"),
    "truncated payload gz": (VALID[:-5], True, "truncated payload"),
    "trailing bytes": (VALID + b"\x00", False, "trailing bytes"),
    "trailing bytes gz": (VALID + b"\x00\x01", True, "trailing bytes"),
    "absurd dimensions": (ABSURD, False, "truncated payload"),
    "absurd dimensions gz": (ABSURD, True, "more than a"),
    "labels for more images than exist": (idx_bytes(0x08, (60000,), bytes(10)), False, "truncated"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_fails_fast_with_bounded_memory(tmp_path, case):
    data, compress, message = HOSTILE[case]
    name = compress if isinstance(compress, str) else "hostile"
    path = write(tmp_path, name, data, compress=compress is True)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(DatasetError, match=message) as caught:
            read_idx(path)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 1 << 20, f"{case}: peak memory {peak} bytes"
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_truncated_gzip_stream(tmp_path):
    pixels = np.arange(50 * 28 * 28).astype(np.uint8).tobytes()
    whole = gzip.compress(idx_bytes(0x08, (50, 28, 28), pixels))
    path = write(tmp_path, "cut.gz", whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="truncated gzip stream"):
        read_idx(path)


def test_gzip_with_bad_crc(tmp_path):
    whole = bytearray(gzip.compress(VALID))
    whole[-8] ^= 0xFF  # CRC32 in the trailer
    with pytest.raises(DatasetError, match="corrupt gzip"):
        read_idx(write(tmp_path, "crc.gz", bytes(whole)))


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_idx(tmp_path / "nowhere.gz")


def test_gzip_bomb_header_within_ratio_is_bounded_by_actual_content(tmp_path):
    # 100 MB declared (a 300 kB gzip file could hold that much), 300 kB actually there.
    noise = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    data = idx_bytes(0x08, (100, 1000, 1000), noise)
    path = write(tmp_path, "bomb.gz", data, compress=True)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match="truncated payload"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(compress=st.booleans(), data=st.data())
def test_random_corruption_raises_dataset_error_or_reads(tmp_path, compress, data):
    original = gzip.compress(VALID, mtime=0) if compress else VALID
    corrupted = bytearray(original)
    action = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    if action == "flip":
        for position in data.draw(st.lists(st.integers(0, len(corrupted) - 1), min_size=1,
                                           max_size=4)):
            corrupted[position] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        corrupted = corrupted[: data.draw(st.integers(0, len(corrupted) - 1))]
    else:
        appended = data.draw(st.binary(min_size=1, max_size=20))
        corrupted += appended
    path = tmp_path / ("fuzz.gz" if compress else "fuzz")
    path.write_bytes(bytes(corrupted))
    try:
        result = read_idx(path)
    except DatasetError as error:
        assert str(path) in str(error)
        return
    # Only a flip, or zero padding after a gzip stream (which gzip itself ignores), can leave a
    # readable file: in a gzip file the CRC guarantees the original content; in a raw file the
    # result must account for every byte of the file.
    assert action == "flip" or (compress and action == "append" and not any(appended))
    if compress:
        np.testing.assert_array_equal(result, np.arange(36, dtype=np.uint8).reshape(4, 3, 3))
    else:
        assert result.nbytes + 4 + 4 * result.ndim == len(corrupted)
