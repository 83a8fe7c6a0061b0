"""A full backing filesystem: ENOSPC to the writer, nothing lost, the mount keeps serving."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Envfs


@pytest.fixture
def small_store(envfs: Envfs) -> Iterator[Envfs]:
    """A store on a 24 MiB tmpfs of its own."""
    backing = envfs.root / "backing"
    backing.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "envfs-test", str(backing)], check=True)
    try:
        envfs.store = backing / "store"
        envfs.init()
        envfs.mount()
        yield envfs
    finally:
        envfs.cleanup()
        subprocess.run(["umount", "-l", str(backing)], capture_output=True)


def _fill(path: Path) -> int:
    """Write 1 MiB chunks until the filesystem refuses; return the errno."""
    chunk = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(100):
            os.write(fd, chunk)
            os.fsync(fd)
    except OSError as e:
        return e.errno or 0
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return 0


def test_full_disk_gives_enospc_and_loses_nothing(small_store: Envfs) -> None:
    mnt = small_store.mnt
    keep = os.urandom(300_000)
    (mnt / "keep").write_bytes(keep)
    (mnt / "dir").mkdir()
    assert _fill(mnt / "filler") == errno.ENOSPC
    # Everything written before is intact, and metadata operations fail cleanly or work.
    assert (mnt / "keep").read_bytes() == keep
    for i in range(50):
        try:
            (mnt / "dir" / f"small{i}").write_bytes(b"x" * 5000)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    pid = small_store.daemon_pid()
    assert os.path.exists(f"/proc/{pid}")
    os.unlink(mnt / "filler")
    (mnt / "after").write_bytes(b"space again" * 1000)
    assert (mnt / "after").read_bytes() == b"space again" * 1000
    small_store.remount()
    assert (mnt / "keep").read_bytes() == keep
    assert (mnt / "after").read_bytes() == b"space again" * 1000
    for name in os.listdir(mnt / "dir"):
        data = (mnt / "dir" / name).read_bytes()
        assert data in (b"x" * 5000, b""), f"{name}: {len(data)} bytes"
