"""A full backing filesystem: ENOSPC to the writer, nothing lost, the mount keeps serving."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from fsx import Exerciser
from helpers import ROOT_CTX, Envfs, new_file, operations_in_process, process_gone, setattr_fields

from envfs.fs import Operations
from envfs.metadata import ROOT_INODE
from envfs.store import CHECKPOINT_ROOM_BYTES, COMMIT_ROOM_BYTES, RESERVE


@contextlib.contextmanager
def store_on_tmpfs(envfs: Envfs, options: str, mounted: bool = True) -> Iterator[Envfs]:
    """`envfs` with its store on a tmpfs of its own (mount `options`), mounted unless not `mounted`."""
    backing = envfs.root / "backing"
    backing.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "envfs-test", str(backing)], check=True)
    try:
        envfs.store = backing / "store"
        envfs.init()
        if mounted:
            envfs.mount()
        yield envfs
    finally:
        envfs.cleanup()
        subprocess.run(["umount", "-l", str(backing)], capture_output=True)


@pytest.fixture
def small_store(envfs: Envfs) -> Iterator[Envfs]:
    """A store on a 24 MiB tmpfs of its own."""
    with store_on_tmpfs(envfs, "size=24m") as store:
        yield store


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


def _fill_outside(path: Path) -> None:
    """Fill the backing filesystem from outside envfs, as another program on the disk would."""
    chunk = bytes(1 << 16)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)  # the last partial page too
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_full_disk_keeps_what_was_acknowledged(small_store: Envfs) -> None:
    """Files made just before the disk fills, and every byte a write acknowledged, stay,
    without a commit timer or an fsync; on the full disk, reads and unlink work."""
    mnt = small_store.mnt
    (mnt / "small").write_bytes(b"hello\n")
    (mnt / "d").mkdir()
    chunk = os.urandom(100_000)  # not block-aligned
    acknowledged = 0
    fd = os.open(mnt / "fill", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            acknowledged += os.write(fd, chunk)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    size = os.stat(mnt / "fill").st_size
    assert size == acknowledged
    assert (mnt / "small").read_bytes() == b"hello\n"  # a read on the full disk (its atime too)
    (mnt / "d" / "more").mkdir()  # metadata has room even now
    small_store.remount()
    assert (mnt / "small").read_bytes() == b"hello\n"
    assert (mnt / "d" / "more").is_dir()
    with open(mnt / "fill", "rb") as f:
        for offset in range(0, size, len(chunk)):
            assert f.read(len(chunk)) == chunk[: size - offset]
    os.unlink(mnt / "fill")


def test_disk_filled_from_outside_spares_stored_blocks(small_store: Envfs) -> None:
    """Another program fills the backing disk: an append that needs space fails with ENOSPC
    before it overwrites any byte of the file's stored last block, so what was fsynced
    stays readable, now and after a remount."""
    mnt = small_store.mnt
    keep = os.urandom(10_001)  # the last block is short: an append rewrites it
    fd = os.open(mnt / "keep", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, keep)
    os.fsync(fd)
    os.close(fd)
    filler = small_store.store.parent / "filler"
    _fill_outside(filler)
    try:
        fd = os.open(mnt / "keep", os.O_WRONLY | os.O_APPEND)
        try:
            with pytest.raises(OSError) as e:
                for _ in range(30):  # more than the space reserve, which envfs gives up on the full disk
                    os.write(fd, os.urandom(300_000))
                    os.fsync(fd)
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert (mnt / "keep").read_bytes()[:10_001] == keep
    finally:
        filler.unlink()
    data = (mnt / "keep").read_bytes()
    assert data[:10_001] == keep
    small_store.remount()
    assert (mnt / "keep").read_bytes() == data


def test_mount_after_a_crash_on_a_full_disk(small_store: Envfs) -> None:
    """A daemon killed while another program has filled the disk: the next mount, which must
    write to the metadata (recovery, the mounted flag), gives up the space reserve to do it."""
    mnt = small_store.mnt
    keep = os.urandom(50_000)
    (mnt / "keep").write_bytes(keep)
    fd = os.open(mnt / "keep", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    filler = small_store.store.parent / "filler"
    _fill_outside(filler)
    try:
        pid = small_store.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        small_store.mount()  # clears the dead mount, recovers, records the mount
        assert (mnt / "keep").read_bytes() == keep
        assert not (small_store.store / "reserve").exists()  # given up for the mount
    finally:
        filler.unlink()


def test_mount_on_a_disk_filled_after_a_clean_unmount(small_store: Envfs) -> None:
    """A clean unmount empties the lock record; the next mount needs a block for it again,
    and on a disk another program filled meanwhile the space reserve gives it."""
    keep = os.urandom(50_000)
    (small_store.mnt / "keep").write_bytes(keep)
    small_store.unmount()
    filler = small_store.store.parent / "filler"
    _fill_outside(filler)
    try:
        small_store.mount()
        assert (small_store.mnt / "keep").read_bytes() == keep
        os.unlink(small_store.mnt / "keep")  # and space can be freed through the mount
    finally:
        filler.unlink()


def test_store_on_a_read_only_filesystem(small_store: Envfs) -> None:
    """A store on read-only media (a snapshot, a backup): mount and rotate refuse in one
    line, fsck reads and checks it without the lock, a read-only mount serves it, and
    nothing of it changes."""
    keep = os.urandom(50_000)
    (small_store.mnt / "keep").write_bytes(keep)
    small_store.unmount()
    backing = small_store.store.parent
    subprocess.run(["mount", "-o", "remount,ro", str(backing)], check=True)
    try:
        before = sorted((p.name, p.stat().st_size) for p in small_store.store.rglob("*"))
        for command in (["mount", str(small_store.store), str(small_store.mnt)], ["rotate", str(small_store.store)]):
            result = small_store.run(*command, check=False)
            assert result.returncode == 26, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and "read-only" in result.stderr
            assert "--read-only" in result.stderr or command[0] != "mount"
        result = small_store.run("fsck", str(small_store.store), check=False)
        assert result.returncode == 0, result.stderr + result.stdout
        assert "damaged:   0" in result.stdout
        small_store.mount("--read-only")
        try:
            assert (small_store.mnt / "keep").read_bytes() == keep
        finally:
            small_store.unmount()
        assert sorted((p.name, p.stat().st_size) for p in small_store.store.rglob("*")) == before
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(backing)], check=True)
    small_store.mount()
    assert (small_store.mnt / "keep").read_bytes() == keep


def test_backing_filesystem_out_of_inodes(envfs: Envfs) -> None:
    """A backing filesystem with no inode left for a data file: the create fails with
    ENOSPC and leaves no name behind, listings and fsck stay clean, and creates work
    again once inodes are free."""
    with store_on_tmpfs(envfs, "size=64m,nr_inodes=96"):
        (envfs.mnt / "d").mkdir()
        made, refused = [], 0
        for i in range(200):
            try:
                (envfs.mnt / "d" / f"f{i}").write_bytes(b"x")
                made.append(f"f{i}")
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                refused += 1
        assert made and refused
        assert sorted(os.listdir(envfs.mnt / "d")) == sorted(made)
        for name in made[: len(made) // 2]:
            os.unlink(envfs.mnt / "d" / name)
        (envfs.mnt / "d" / "again").write_bytes(b"y")
        assert (envfs.mnt / "d" / "again").read_bytes() == b"y"
        assert "integrity" not in envfs.log_text()
        envfs.unmount()
        result = envfs.run("fsck", str(envfs.store), check=False)
        assert result.returncode == 0, result.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 4, 5])
def test_random_operations_on_a_filling_disk_fail_whole(small_store: Envfs, seed: int) -> None:
    """fsx (without mmap) while a filler file leaves 0 to 8 MiB free: an operation
    refused with ENOSPC leaves the file as it was (a write may stop short), and
    the file matches its model through a remount; fsck finds nothing wrong."""
    mnt = small_store.mnt
    rng = random.Random(seed)
    exerciser = Exerciser(mnt / "f", seed, max_size=4 << 20, mapped=False)
    exerciser.full_disk = True
    filler = mnt / "filler"
    for _ in range(8):
        filler.unlink(missing_ok=True)
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            f.write(b"\1" * max(0, free - rng.choice([0, 256 << 10, 1 << 20, 3 << 20, 8 << 20])))
        exerciser.run(300)
    filler.unlink()
    exerciser.check_all()
    exerciser.close()
    assert exerciser.counts["refused"] >= 5, exerciser.counts  # the disk did fill
    small_store.remount()
    exerciser.reopen_after_remount()
    exerciser.close()
    small_store.unmount()
    result = small_store.run("fsck", str(small_store.store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_room_kept_for_sqlite_leaves_its_locks(small_store: Envfs) -> None:
    """The daemon keeps room allocated in meta.db-wal and past the end of meta.db, through
    descriptors it keeps open: closing one would drop SQLite's POSIX lock on meta.db."""
    (small_store.mnt / "f").write_bytes(b"x")
    time.sleep(2.5)  # the housekeeping has run twice since
    wal = os.stat(small_store.store / "meta.db-wal")
    assert wal.st_blocks * 512 >= COMMIT_ROOM_BYTES > wal.st_size
    database = os.stat(small_store.store / "meta.db")
    assert database.st_blocks * 512 >= database.st_size + CHECKPOINT_ROOM_BYTES
    pid = small_store.daemon_pid()
    locks = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
    assert any(
        fields[1] == "POSIX" and fields[4] == str(pid) and fields[5].endswith(f":{database.st_ino}") for fields in locks
    ), "the daemon holds no lock on meta.db"


def _take_every_byte(env: Envfs) -> list[Path]:
    """Fill the backing disk from outside; once envfs has given up its space reserve (at the
    commit a change of metadata brings, within a second), fill it again: every byte is taken.
    Returns the filler files."""
    fillers = [env.store.parent / "filler", env.store.parent / "filler2"]
    _fill_outside(fillers[0])
    with contextlib.suppress(OSError):
        (env.mnt / "made-on-a-full-disk").mkdir()
    deadline = time.monotonic() + 10
    while (env.store / RESERVE).exists():
        assert time.monotonic() < deadline, "envfs kept its space reserve"
        time.sleep(0.05)
    _fill_outside(fillers[1])
    assert os.statvfs(env.store).f_bavail == 0
    return fillers


def test_metadata_commits_on_a_disk_filled_to_the_last_byte_from_outside(small_store: Envfs) -> None:
    """Another program takes every free byte, the space reserve included once envfs gave it
    up: files closed before stay, and changes of metadata still commit (into the room kept
    in SQLite's log, `Store.keep_commit_room`), then stay after a remount."""
    mnt = small_store.mnt
    contents = {f"before-{i}": os.urandom(3000) for i in range(20)}
    for name, data in contents.items():
        (mnt / name).write_bytes(data)
    fillers = _take_every_byte(small_store)
    try:
        for i in range(100):  # more frames than the log held before the disk filled
            os.chmod(mnt / "before-0", 0o600 + i % 8)
            os.utime(mnt / "before-1", ns=(i, i))
            os.setxattr(mnt / "before-2", "user.n", str(i).encode())
            os.rename(*[mnt / "before-3", mnt / "renamed"][:: 1 if i % 2 == 0 else -1])
            os.symlink("before-5", mnt / f"link-{i}")
    finally:
        for filler in fillers:
            filler.unlink()
    small_store.remount()
    assert not (mnt / "renamed").exists()
    for name, data in contents.items():
        assert (mnt / name).read_bytes() == data, name
    assert stat.S_IMODE(os.stat(mnt / "before-0").st_mode) == 0o600 + 99 % 8
    assert os.stat(mnt / "before-1").st_mtime_ns == 99
    assert os.getxattr(mnt / "before-2", "user.n") == b"99"
    assert sorted(p.name for p in mnt.glob("link-*")) == sorted(f"link-{i}" for i in range(100))


@contextlib.contextmanager
def operations_on_tmpfs(envfs: Envfs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Operations]:
    """`Operations` in this process on a store on a 24 MiB tmpfs of its own, without a FUSE
    mount and without the mount's housekeeping (which keeps room in SQLite's files)."""
    with store_on_tmpfs(envfs, "size=24m", mounted=False), operations_in_process(envfs, monkeypatch) as ops:
        yield ops


def _read(ops: Operations, fh: int, size: int) -> bytes:
    async def read() -> bytes:
        return bytes(await ops.read(fh, 0, size))  # before its buffer is reused

    return trio.run(read)


def test_a_read_answers_when_no_commit_finds_room(envfs: Envfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read whose atime is due, where the commit after it fails (a disk full to its last
    byte and no room kept in SQLite's files), returns its data; the atime is let go."""
    with operations_on_tmpfs(envfs, monkeypatch) as ops:
        data = os.urandom(50_000)
        inode_id, fh = new_file(ops, b"f", data)
        times = SimpleNamespace(st_atime_ns=1_000_000_000, st_mtime_ns=2_000_000_000)
        changed = setattr_fields(update_atime=True, update_mtime=True)
        trio.run(ops.setattr, inode_id, times, changed, None, ROOT_CTX)  # the next read moves atime
        ops.commit()
        fillers = [envfs.store.parent / "filler", envfs.store.parent / "filler2"]
        _fill_outside(fillers[0])
        ops.store.release_reserve()
        _fill_outside(fillers[1])
        ops.commit()  # finds the disk full: every request commits from now on
        assert _read(ops, fh, len(data)) == data
        trio.run(ops.release, fh)
        for filler in fillers:
            filler.unlink()


def test_a_write_retried_after_a_commit_writes_its_data(envfs: Envfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that finds the disk full while a deleted file's data waits for the group
    commit is retried after that commit, which frees the space: the retry writes the
    caller's bytes (the first attempt must not have wiped them yet)."""
    with operations_on_tmpfs(envfs, monkeypatch) as ops:
        big, big_fh = new_file(ops, b"big", os.urandom(6 << 20))
        trio.run(ops.release, big_fh)
        inode_id, fh = new_file(ops, b"f", b"")
        ops.commit()
        ops.store.keep_commit_room()  # as the mount does: the commit before the retry needs it
        filler = envfs.store.parent / "filler"
        _fill_outside(filler)
        trio.run(ops.unlink, ROOT_INODE, b"big", ROOT_CTX)
        trio.run(ops.forget, [(big, 1)])  # the kernel lets go: the data file goes at the next commit
        data = os.urandom(100_000)
        assert trio.run(ops.write, fh, 0, bytes(bytearray(data))) == len(data)
        assert _read(ops, fh, len(data)) == data
        trio.run(ops.release, fh)
        filler.unlink()


def test_reads_work_on_a_disk_filled_to_the_last_byte_from_outside(small_store: Envfs) -> None:
    """Another program takes every byte, the space reserve included once envfs gave it
    up: a read whose atime is due still returns its data (the atime is let go, as no
    commit can be written), and nothing else is lost."""
    mnt = small_store.mnt
    data = os.urandom(50_000)
    (mnt / "f").write_bytes(data)
    os.utime(mnt / "f", ns=(1_000_000_000, 2_000_000_000))  # relatime: the next read moves atime
    fillers = _take_every_byte(small_store)
    try:
        for _ in range(3):
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
            assert (mnt / "f").read_bytes() == data
            os.utime(mnt / "f", ns=(1_000_000_000, 2_000_000_000))  # commits into the room kept for it
    finally:
        for filler in fillers:
            filler.unlink()
    small_store.remount()
    assert (mnt / "f").read_bytes() == data
