"""`envfs mount --read-only`: the store and its anchor stay exactly as they were,
every change is refused with EROFS, and an older copy of the store (a backup)
can be read with --copy without disturbing the store the anchor follows. A
store on read-only media is in test_full_disk.py."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Envfs, anchor_objects, envfs_mounts

from envfs import errors


def _store_files(env: Envfs) -> dict[str, tuple[int, int, str]]:
    """Every file of the store but the lock: mode, mtime and SHA-256."""
    found = {}
    for path in sorted(env.store.rglob("*")):
        if path.is_file() and path.name != "lock":
            st = path.stat()
            found[str(path.relative_to(env.store))] = (
                st.st_mode,
                st.st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return found


def _fill(root: Path) -> None:
    (root / "file").write_bytes(os.urandom(20_000))
    (root / "empty").touch()
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "deep").write_text("deep")
    os.symlink("dir/sub/deep", root / "link")
    os.setxattr(root / "file", "user.k", b"v")
    with open(root / "sparse", "wb") as f:
        f.truncate(10 << 20)
        f.seek(5 << 20)
        f.write(b"island")


CHANGES: list[tuple[str, Callable[[Path], object]]] = [
    ("create", lambda m: os.open(m / "new", os.O_WRONLY | os.O_CREAT, 0o644)),
    ("open for writing", lambda m: os.open(m / "file", os.O_WRONLY)),
    ("truncating open", lambda m: os.open(m / "file", os.O_RDONLY | os.O_TRUNC)),
    ("truncate", lambda m: os.truncate(m / "file", 0)),
    ("mkdir", lambda m: os.mkdir(m / "d2")),
    ("unlink", lambda m: os.unlink(m / "file")),
    ("rmdir", lambda m: os.rmdir(m / "dir" / "sub")),
    ("rename", lambda m: os.rename(m / "file", m / "moved")),
    ("link", lambda m: os.link(m / "file", m / "hard")),
    ("symlink", lambda m: os.symlink("x", m / "link2")),
    ("mkfifo", lambda m: os.mkfifo(m / "fifo")),
    ("chmod", lambda m: os.chmod(m / "file", 0o600)),
    ("chown", lambda m: os.chown(m / "file", 1, 1)),
    ("utime", lambda m: os.utime(m / "file", (0, 0))),
    ("setxattr", lambda m: os.setxattr(m / "file", "user.k", b"w")),
    ("removexattr", lambda m: os.removexattr(m / "file", "user.k")),
]


def test_read_only_mount_changes_nothing(store: Envfs) -> None:
    store.mount()
    _fill(store.mnt)
    data = (store.mnt / "file").read_bytes()
    store.unmount()
    files, anchor = _store_files(store), anchor_objects(store)

    store.mount("--read-only")
    mnt = store.mnt
    assert os.statvfs(mnt).f_flag & os.ST_RDONLY
    before = os.stat(mnt / "file")
    assert (mnt / "file").read_bytes() == data
    assert (mnt / "empty").read_bytes() == b""
    assert (mnt / "dir" / "sub" / "deep").read_text() == "deep"
    assert os.readlink(mnt / "link") == "dir/sub/deep" and (mnt / "link").read_text() == "deep"
    assert os.getxattr(mnt / "file", "user.k") == b"v"
    with open(mnt / "sparse", "rb") as f:
        f.seek(5 << 20)
        assert f.read(6) == b"island"
    assert sorted(os.listdir(mnt)) == ["dir", "empty", "file", "link", "sparse"]
    for what, change in CHANGES:
        with pytest.raises(OSError) as e:
            change(mnt)
        assert e.value.errno == errno.EROFS, what
    # No access time moves, in the mount or the store.
    assert os.stat(mnt / "file").st_atime_ns == before.st_atime_ns
    store.unmount()
    assert _store_files(store) == files
    assert anchor_objects(store) == anchor

    store.mount()  # read-write again, as if nothing had happened
    (store.mnt / "after").write_text("written")
    assert (store.mnt / "file").read_bytes() == data
    store.unmount()
    assert "damaged:   0 (clean)" in store.run("fsck", str(store.store)).stdout


def test_read_only_mount_holds_the_store(store: Envfs) -> None:
    """Nothing writes the store while a read-only mount reads it."""
    store.mount("--read-only")
    other = store.root / "mnt2"
    other.mkdir()
    for command in (["mount", str(store.store), str(other)], ["rotate", str(store.store)]):
        result = store.run(*command, check=False)
        assert result.returncode == errors.StoreBusy.exit_code, result.stderr
    assert store.status()["mounted"] is True
    store.unmount()
    assert str(other) not in envfs_mounts()


def test_older_copy_is_read_with_copy(store: Envfs, tmp_path: Path) -> None:
    store.mount()
    (store.mnt / "f").write_text("in the backup")
    store.unmount()
    backup = tmp_path / "backup"
    shutil.copytree(store.store, backup, symlinks=True)
    store.mount()
    (store.mnt / "f").write_text("after the backup")
    store.unmount()
    anchor = anchor_objects(store)

    result = store.run("mount", "--copy", str(backup), str(store.mnt), check=False)
    assert result.returncode == errors.UsageError.exit_code and "--read-only" in result.stderr
    result = store.run("mount", "--read-only", str(backup), str(store.mnt), check=False)
    assert result.returncode == errors.StoreRolledBack.exit_code
    assert result.stderr.count("\n") == 1 and "--read-only --copy" in result.stderr, result.stderr

    copy = Envfs.__new__(Envfs)
    copy.__dict__.update(store.__dict__, store=backup)
    copy.mount("--read-only", "--copy")
    try:
        assert (copy.mnt / "f").read_text() == "in the backup"
    finally:
        copy.unmount()
    # The store the anchor follows is untouched by it.
    assert anchor_objects(store) == anchor
    store.mount()
    assert (store.mnt / "f").read_text() == "after the backup"
    store.unmount()


def test_read_only_mount_after_a_crash(store: Envfs) -> None:
    """A store a killed daemon left: the read-only mount serves what was committed,
    what is still in meta.db-wal included (a file deleted after the last checkpoint is
    gone), deletes no orphan, changes no file of the store, and the next read-write
    mount recovers as usual."""
    store.mount()
    (store.mnt / "kept").write_text("kept")
    victim = store.mnt / "victim"
    victim.write_bytes(os.urandom(10_000))
    fd = os.open(victim, os.O_RDONLY)
    os.fsync(fd)  # committed and checkpointed into meta.db
    os.close(fd)
    os.unlink(victim)  # committed within 0.1 s into meta.db-wal only; its data file goes
    fd = os.open(store.mnt / "orphan", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"o" * 5000)
    os.unlink(store.mnt / "orphan")
    time.sleep(0.5)
    os.kill(store.daemon_pid(), signal.SIGKILL)
    store.cleanup()  # waits for the daemon to die, detaches the dead mount
    try:
        os.close(fd)
    except OSError:
        pass
    files = _store_files(store)
    assert files["meta.db-wal"][2] != hashlib.sha256(b"").hexdigest()
    store.mount("--read-only")
    assert sorted(os.listdir(store.mnt)) == ["kept"]
    assert (store.mnt / "kept").read_text() == "kept"
    assert stat.S_ISDIR(os.stat(store.mnt).st_mode)
    store.unmount()
    assert _store_files(store) == files
    store.mount()
    assert (store.mnt / "kept").read_text() == "kept"
    store.unmount()
    assert "damaged:   0 (clean)" in store.run("fsck", str(store.store)).stdout
