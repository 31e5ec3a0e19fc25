"""deeplab_keras.files: atomic writes (nothing half written, even on a full disk)."""
import errno
import os

import pytest

from deeplab_keras.files import atomic_write, atomic_write_bytes


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith(".tmp-"))


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_bytes(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_disk_full_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "b.bin"
    atomic_write_bytes(target, b"kept")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"x" * 1000)
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"kept" and leftovers(tmp_path) == []


def test_atomic_write_no_overwrite(tmp_path):
    target = tmp_path / "c.bin"
    atomic_write_bytes(target, b"first", overwrite=False)
    with pytest.raises(FileExistsError, match="c.bin exists"):
        atomic_write_bytes(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first" and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass
