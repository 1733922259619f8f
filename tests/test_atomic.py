"""scratchcnn.atomic: a write either completes or leaves the previous file untouched."""

import os
import stat

import pytest

from scratchcnn.atomic import atomic_write, atomic_write_text


def test_writes_new_file_with_normal_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "report.json", "{}\n")
    assert path.read_text() == "{}\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_previous_content_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(b"previous")

    def write_half_then_fail(file):
        file.write(b"half of the new")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, write_half_then_fail)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]
