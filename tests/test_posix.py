"""POSIX behaviour through a real mount, driven with Python's os module."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import random
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Envfs, data_file_ids, without_next_file


def test_write_read_remount(store: Envfs) -> None:
    store.mount()
    data = os.urandom(3 * 4096 + 123)
    (store.mnt / "f").write_bytes(data)
    assert (store.mnt / "f").read_bytes() == data
    store.remount()
    assert (store.mnt / "f").read_bytes() == data


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 8192, 100_000])
def test_random_offsets(mounted: Path, size: int) -> None:
    path = mounted / "f"
    model = bytearray(os.urandom(size))
    path.write_bytes(model)
    rng = random.Random(size)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(60):
            off = rng.randrange(0, len(model) + 9000)
            chunk = os.urandom(rng.choice([1, 7, 4096, 5000, rng.randrange(1, 12000)]))
            os.pwrite(fd, chunk, off)
            if off > len(model):
                model += bytes(off - len(model))
            model[off : off + len(chunk)] = chunk
            ro = rng.randrange(0, len(model) + 10)
            assert os.pread(fd, 9000, ro) == bytes(model[ro : ro + 9000])
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(model)
    assert os.stat(path).st_size == len(model)


def test_append_and_trunc(mounted: Path) -> None:
    path = mounted / "log"
    for i in range(50):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, f"line {i}\n".encode())
        os.close(fd)
    assert path.read_text().splitlines()[-1] == "line 49"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert path.read_bytes() == b""


def test_writes_go_where_the_kernel_places_them_after_o_append_is_cleared(mounted: Path) -> None:
    """O_APPEND is the open file description's, and fcntl(F_SETFL) may clear it;
    a shared mapping of an O_APPEND descriptor writes its pages back in place."""
    path = mounted / "f"
    path.write_bytes(b"." * 8192)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)
        os.pwrite(fd, b"AT-ZERO", 0)
        os.lseek(fd, 100, os.SEEK_SET)
        os.write(fd, b"AT-100")
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 8192 and data[:7] == b"AT-ZERO" and data[100:106] == b"AT-100"

    path.write_bytes(b"." * 16384)
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        with mmap.mmap(fd, 16384, mmap.MAP_SHARED) as mapped:
            mapped[4096:4106] = b"MMAPWRITE!"
            mapped.flush()
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 16384 and data[4096:4106] == b"MMAPWRITE!"


def test_truncate_grow_shrink(mounted: Path) -> None:
    path = mounted / "t"
    data = os.urandom(10_000)
    path.write_bytes(data)
    os.truncate(path, 5000)
    assert path.read_bytes() == data[:5000]
    os.truncate(path, 20_000)
    assert path.read_bytes() == data[:5000] + bytes(15_000)
    os.truncate(path, 4096)
    assert path.read_bytes() == data[:4096]
    with open(path, "r+b") as f:
        f.seek(9000)
        f.write(b"end")
    assert path.read_bytes() == data[:4096] + bytes(9000 - 4096) + b"end"


def test_seek_data_and_seek_hole(mounted: Path) -> None:
    """SEEK_DATA and SEEK_HOLE find the holes of a sparse file at block granularity,
    exactly where a block is a hole, and cp keeps it sparse."""
    path = mounted / "sparse"
    first, second = os.urandom(4096), os.urandom(100)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, first, 0)
        os.pwrite(fd, second, 1 << 20)
        os.ftruncate(fd, 3 << 20)
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert hole == 4096
        data = os.lseek(fd, hole, os.SEEK_DATA)
        assert data == 1 << 20
        end_hole = os.lseek(fd, 1 << 20, os.SEEK_HOLE)
        assert end_hole == (1 << 20) + 4096
        assert os.lseek(fd, (2 << 20) + 5, os.SEEK_HOLE) == (2 << 20) + 5  # inside the last hole
        for offset in (end_hole + 4096, (3 << 20) - 1, 3 << 20, 5 << 20):
            with pytest.raises(OSError) as e:
                os.lseek(fd, offset, os.SEEK_DATA)  # only holes after it, or past the end
            assert e.value.errno == errno.ENXIO
        with pytest.raises(OSError) as e:
            os.lseek(fd, 3 << 20, os.SEEK_HOLE)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    copy = mounted / "copy"
    subprocess.run(["cp", "--sparse=always", str(path), str(copy)], check=True)
    assert copy.read_bytes() == path.read_bytes()
    assert os.stat(copy).st_blocks * 512 < 64 << 10


def test_tar_sparse_copies_of_copies_stay_as_small(mounted: Path) -> None:
    """tar --sparse stores what SEEK_DATA calls data: were a hole next to data
    reported as data, every copy of a copy would grow by those blocks."""
    (mounted / "g0").mkdir()
    with open(mounted / "g0" / "a", "wb") as f:
        f.truncate(1 << 20)
        f.seek(100 * 4096)
        f.write(os.urandom(4096))
    for generation in range(1, 4):
        (mounted / f"g{generation}").mkdir()
        subprocess.run(
            f"tar --sparse -C g{generation - 1} -cf - a | tar -C g{generation} -xf -",
            shell=True, check=True, cwd=mounted,
        )  # fmt: skip
    blocks = [os.stat(mounted / f"g{generation}" / "a").st_blocks for generation in range(4)]
    assert len(set(blocks)) == 1, blocks
    assert (mounted / "g3" / "a").read_bytes() == (mounted / "g0" / "a").read_bytes()


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_against_a_model(store: Envfs, seed: int) -> None:
    """Writes, reads, truncates, appends, hole punches, zeroed ranges and mmap writes through two
    descriptors, at offsets around block boundaries, checked against a bytearray after every
    read and every 50 operations, and once more after a remount."""
    rng = random.Random(seed)
    store.mount()
    path = store.mnt / "model"
    fds = [os.open(path, os.O_RDWR | os.O_CREAT, 0o644), os.open(path, os.O_RDWR)]
    model = bytearray()

    def offset() -> int:
        if model and rng.random() < 0.5:  # near a block boundary inside the file
            return max(0, rng.randrange(0, len(model) // 4096 + 2) * 4096 + rng.randint(-9, 9))
        return rng.randrange(0, len(model) + 20_000)

    def length() -> int:
        return rng.choice([rng.randint(1, 40), rng.randint(1, 9_000), rng.randint(1, 70_000)])

    def zero(start: int, stop: int) -> None:
        stop = min(stop, len(model))
        if start < stop:
            model[start:stop] = bytes(stop - start)

    try:
        for step in range(1500):
            fd = rng.choice(fds)
            kind = rng.random()
            if kind < 0.3:
                at, data = offset(), os.urandom(length())
                os.pwrite(fd, data, at)
                model.extend(bytes(max(0, at - len(model))))
                model[at : at + len(data)] = data
            elif kind < 0.45:
                at, n = offset(), length()
                assert os.pread(fd, n, at) == bytes(model[at : at + n]), f"step {step}: read at {at}"
            elif kind < 0.55:
                size = rng.choice([rng.randrange(0, len(model) + 1), rng.randrange(0, 300_000)])
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif kind < 0.62:
                appender = os.open(path, os.O_WRONLY | os.O_APPEND)
                data = os.urandom(length())
                os.write(appender, data)
                os.close(appender)
                model.extend(data)
            elif kind < 0.72:
                at, n = offset(), length()
                _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, at, n)
                zero(at, at + n)
            elif kind < 0.8:
                at, n = offset(), length()
                keep = rng.random() < 0.5
                _fallocate(fd, FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep else 0), at, n)
                zero(at, at + n)
                if not keep:
                    model.extend(bytes(max(0, at + n - len(model))))
            elif kind < 0.9 and model:
                at = rng.randrange(0, len(model))
                n = rng.randint(1, min(len(model) - at, 20_000))
                start = at // mmap.PAGESIZE * mmap.PAGESIZE
                data = os.urandom(n)
                with mmap.mmap(fd, at + n - start, offset=start) as mapped:
                    mapped[at - start : at - start + n] = data
                    mapped.flush()
                model[at : at + n] = data
            else:
                index = fds.index(fd)
                os.close(fd)
                fds[index] = os.open(path, os.O_RDWR)
            if step % 50 == 49:
                assert os.fstat(fds[0]).st_size == len(model), f"step {step}: size"
                assert os.pread(fds[0], len(model) + 1, 0) == bytes(model), f"step {step}: content"
    finally:
        for fd in fds:
            os.close(fd)
    store.remount()
    assert path.read_bytes() == bytes(model)


def test_size_beyond_the_limit_is_efbig(mounted: Path) -> None:
    """A size whose data file would not fit in an off_t (below the kernel's own limit of
    2**63 - 1) fails with EFBIG, as ext4 answers beyond its limit, and changes nothing."""
    path = mounted / "f"
    path.write_bytes(b"abc")
    too_big = 2**63 - 4096
    with pytest.raises(OSError) as e:
        os.truncate(path, too_big)
    assert e.value.errno == errno.EFBIG
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", too_big)
        assert e.value.errno == errno.EFBIG
        with pytest.raises(OSError) as e:
            os.posix_fallocate(fd, too_big, 4096)
        assert e.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc"


def test_sparse_terabyte_is_instant_and_small(store: Envfs) -> None:
    store.mount()
    path = store.mnt / "sparse"
    start = time.monotonic()
    os.truncate(path.as_posix() if path.exists() else _touch(path), 1 << 40)
    assert time.monotonic() - start < 5
    assert os.stat(path).st_size == 1 << 40
    used = sum(f.stat().st_blocks * 512 for f in (store.store / "data").rglob("*") if f.is_file())
    assert used < 1 << 20
    with open(path, "rb") as f:
        f.seek((1 << 40) - 10)
        assert f.read() == bytes(10)
        f.seek(12345678901)
        assert f.read(100) == bytes(100)


def _touch(path: Path) -> str:
    path.touch()
    return path.as_posix()


def test_o_direct(mounted: Path) -> None:
    import mmap

    path = mounted / "direct"
    buf = mmap.mmap(-1, 8192)
    buf.write(os.urandom(8192))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        assert os.write(fd, buf) == 8192
        out = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [out], 0) == 8192
        assert out[:] == buf[:]
    finally:
        os.close(fd)
    assert path.read_bytes() == buf[:]


def test_fsync_and_fdatasync(mounted: Path) -> None:
    fd = os.open(mounted / "s", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"durable")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    dfd = os.open(mounted, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)


def test_directories_thousands_of_entries(mounted: Path) -> None:
    d = mounted / "many"
    d.mkdir()
    names = {f"file-{i:05d}-{'x' * (i % 40)}" for i in range(3000)}
    for name in names:
        (d / name).write_bytes(b"")
    assert set(os.listdir(d)) == names
    entries = list(os.scandir(d))
    assert len({e.inode() for e in entries}) == len(names)
    for name in list(names)[:1000]:
        (d / name).unlink()
    assert len(os.listdir(d)) == 2000


def test_listing_follows_every_change_of_a_directory(mounted: Path) -> None:
    """A directory listed to its end and then changed, in every way entries
    change, lists the change; across a full batch of 256 entries too."""
    d, other = mounted / "d", mounted / "other"
    d.mkdir()
    other.mkdir()
    expected = {f"f{i}" for i in range(256)}
    for name in expected:
        (d / name).write_bytes(b"")

    def check() -> None:
        assert set(os.listdir(d)) == expected
        assert set(os.listdir(d)) == expected  # a second full listing, from the daemon's memo of its end

    check()
    changes: list[tuple[Callable[[], object], set[str], set[str]]] = [
        (lambda: (d / "new").write_bytes(b""), {"new"}, set()),
        (lambda: os.mkdir(d / "sub"), {"sub"}, set()),
        (lambda: os.symlink("f1", d / "link"), {"link"}, set()),
        (lambda: os.mkfifo(d / "fifo"), {"fifo"}, set()),
        (lambda: os.link(d / "f2", d / "hard"), {"hard"}, set()),
        (lambda: os.unlink(d / "f3"), set(), {"f3"}),
        (lambda: os.rmdir(d / "sub"), set(), {"sub"}),
        (lambda: os.rename(d / "f4", d / "f4-renamed"), {"f4-renamed"}, {"f4"}),
        (lambda: os.rename(d / "f5", other / "f5"), set(), {"f5"}),
        (lambda: os.rename(other / "f5", d / "back"), {"back"}, set()),
    ]
    for change, added, removed in changes:
        change()
        expected |= added
        expected -= removed
        check()


def test_listing_after_growth_at_every_size(mounted: Path) -> None:
    """Directories of 1 to 100 entries with 255-byte names, listed, grown by
    one, listed again: at some size a reply buffer ends exactly where the first
    listing ended, and the entry added after it must still be listed."""
    for n in range(1, 101):
        d = mounted / f"d{n:03d}"
        d.mkdir()
        names = {f"{i:03d}".ljust(255, "x") for i in range(n)}
        for name in names:
            (d / name).write_bytes(b"")
        assert set(os.listdir(d)) == names
        added = "new".ljust(255, "x")
        (d / added).write_bytes(b"")
        assert set(os.listdir(d)) == names | {added}, n


def test_readdir_dot_entries_and_nlink(mounted: Path) -> None:
    (mounted / "a" / "b").mkdir(parents=True)
    (mounted / "a" / "c").mkdir()
    assert os.stat(mounted / "a").st_nlink == 4
    os.rmdir(mounted / "a" / "c")
    assert os.stat(mounted / "a").st_nlink == 3
    assert os.stat(mounted / "a" / "b" / "..").st_ino == os.stat(mounted / "a").st_ino


def _dot_dot_inode(directory: Path) -> int:
    """The inode number readdir gives for '..' (os.stat and ls -i resolve '..' in the kernel instead)."""
    getdents64 = {"x86_64": 217, "aarch64": 61}[platform.machine()]
    buffer = ctypes.create_string_buffer(1 << 16)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while (length := ctypes.CDLL(None, use_errno=True).syscall(getdents64, fd, buffer, len(buffer))) > 0:
            offset = 0
            while offset < length:
                ino, _, reclen = struct.unpack_from("<QqH", buffer.raw, offset)
                if buffer.raw[offset + 19 : offset + reclen].split(b"\0")[0] == b"..":
                    return int(ino)
                offset += reclen
    finally:
        os.close(fd)
    raise AssertionError(f"no '..' in {directory}")


def test_readdir_dot_dot_follows_renames(mounted: Path) -> None:
    for name in ("a/moved", "b", "c/swapped"):
        (mounted / name).mkdir(parents=True)
    ino = {name: os.stat(mounted / name).st_ino for name in ("a", "b", "c")}
    assert _dot_dot_inode(mounted / "a" / "moved") == ino["a"]
    os.rename(mounted / "a" / "moved", mounted / "b" / "moved")
    assert _dot_dot_inode(mounted / "b" / "moved") == ino["b"]
    # RENAME_EXCHANGE of a/ and c/swapped/: each directory moves to the other's parent.
    assert _dot_dot_inode(mounted / "c" / "swapped") == ino["c"]
    renameat2 = __import__("ctypes").CDLL(None, use_errno=True).renameat2
    assert renameat2(-100, str(mounted / "a").encode(), -100, str(mounted / "c" / "swapped").encode(), 2) == 0
    assert _dot_dot_inode(mounted / "a") == 1
    assert _dot_dot_inode(mounted / "c" / "swapped") == ino["c"]
    assert os.stat(mounted / "c" / "swapped").st_ino == ino["a"]
    os.rename(mounted / "b" / "moved", mounted / "top")
    assert _dot_dot_inode(mounted / "top") == 1


def test_rename_semantics(mounted: Path) -> None:
    (mounted / "d1").mkdir()
    (mounted / "d2").mkdir()
    (mounted / "d1" / "f").write_text("one")
    (mounted / "d2" / "g").write_text("two")
    os.rename(mounted / "d1" / "f", mounted / "d2" / "g")
    assert (mounted / "d2" / "g").read_text() == "one"
    assert not (mounted / "d1" / "f").exists()
    # over an empty directory
    (mounted / "d3").mkdir()
    os.rename(mounted / "d1", mounted / "d3")
    assert not (mounted / "d1").exists()
    # over a non-empty directory
    with pytest.raises(OSError) as e:
        os.rename(mounted / "d3", mounted / "d2")
    assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    # dir over file and file over dir
    (mounted / "file").write_text("x")
    with pytest.raises(IsADirectoryError):
        os.rename(mounted / "file", mounted / "d2")
    with pytest.raises(NotADirectoryError):
        os.rename(mounted / "d3", mounted / "file")
    # a directory moves across parents: nlink of both parents changes
    (mounted / "p1" / "sub").mkdir(parents=True)
    (mounted / "p2").mkdir()
    os.rename(mounted / "p1" / "sub", mounted / "p2" / "sub")
    assert os.stat(mounted / "p1").st_nlink == 2
    assert os.stat(mounted / "p2").st_nlink == 3


def _renameat2(src: Path, dst: Path, flags: int) -> None:

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, bytes(src), at_fdcwd, bytes(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_rename_noreplace_and_exchange(mounted: Path) -> None:
    a, b = mounted / "a", mounted / "b"
    a.write_text("A")
    b.write_text("B")
    with pytest.raises(FileExistsError):
        _renameat2(a, b, 1)  # RENAME_NOREPLACE
    _renameat2(a, b, 2)  # RENAME_EXCHANGE
    assert a.read_text() == "B" and b.read_text() == "A"
    (mounted / "dir").mkdir()
    _renameat2(a, mounted / "dir", 2)
    assert (mounted / "a").is_dir() and (mounted / "dir").read_text() == "B"
    with pytest.raises(FileNotFoundError):
        _renameat2(b, mounted / "missing", 2)


def test_hard_links(mounted: Path) -> None:
    (mounted / "orig").write_text("shared")
    os.link(mounted / "orig", mounted / "link")
    assert os.stat(mounted / "orig").st_nlink == 2
    assert os.stat(mounted / "orig").st_ino == os.stat(mounted / "link").st_ino
    with open(mounted / "link", "a") as f:
        f.write("!")
    assert (mounted / "orig").read_text() == "shared!"
    os.unlink(mounted / "orig")
    assert os.stat(mounted / "link").st_nlink == 1
    assert (mounted / "link").read_text() == "shared!"
    (mounted / "adir").mkdir()
    with pytest.raises(PermissionError):
        os.link(mounted / "adir", mounted / "adir2")


def test_symlinks_up_to_path_max(mounted: Path) -> None:
    os.symlink("target/of/link", mounted / "l")
    assert os.readlink(mounted / "l") == "target/of/link"
    assert os.lstat(mounted / "l").st_size == len("target/of/link")
    long_target = "x" * 4095
    os.symlink(long_target, mounted / "long")
    assert os.readlink(mounted / "long") == long_target


def test_name_limits(mounted: Path) -> None:
    (mounted / ("n" * 255)).write_text("ok")
    assert (mounted / ("n" * 255)).read_text() == "ok"
    with pytest.raises(OSError) as e:
        (mounted / ("n" * 256)).write_text("no")
    assert e.value.errno == errno.ENAMETOOLONG
    assert os.statvfs(mounted).f_namemax == 255


def test_deep_path_max(mounted: Path) -> None:
    component = "d" * 200
    path = mounted
    depth = 0
    while len(str(path / component).encode()) < 4000:
        path = path / component
        path.mkdir()
        depth += 1
    (path / "leaf").write_text("deep")
    assert (path / "leaf").read_text() == "deep"
    assert depth >= 15


def test_special_files(mounted: Path) -> None:
    os.mkfifo(mounted / "fifo", 0o640)
    assert stat.S_ISFIFO(os.stat(mounted / "fifo").st_mode)
    os.mknod(mounted / "sock", 0o600 | stat.S_IFSOCK)
    assert stat.S_ISSOCK(os.stat(mounted / "sock").st_mode)
    os.mknod(mounted / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(mounted / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_chmod_chown_utimens(mounted: Path) -> None:
    path = mounted / "f"
    path.write_text("x")
    os.chmod(path, 0o4751)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o4751
    os.chown(path, 1234, 5678)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(path, ns=(1_000_000_001, 2_000_000_002))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    before = os.stat(path).st_ctime_ns
    time.sleep(0.01)
    os.chmod(path, 0o600)
    assert os.stat(path).st_ctime_ns > before


def test_times_beyond_64_bit_nanoseconds_are_clamped(store: Envfs) -> None:
    """Time stamps outside what a signed 64-bit nanosecond count holds are clamped to it,
    as ext4 clamps to its own range: the call succeeds, also after a remount."""
    store.mount()
    path = store.mnt / "f"
    path.write_text("x")
    for seconds, expected_ns in [(2**40, 2**63 - 1), (-(2**40), -(2**63)), (2**34 - 1, 2**63 - 1)]:
        os.utime(path, (seconds, seconds))
        st = os.stat(path)
        assert (st.st_atime_ns, st.st_mtime_ns) == (expected_ns, expected_ns)
    store.remount()
    assert os.stat(store.mnt / "f").st_mtime_ns == 2**63 - 1
    assert (store.mnt / "f").read_text() == "x"


def test_xattrs(mounted: Path) -> None:
    path = mounted / "f"
    path.write_text("x")
    os.setxattr(path, "user.color", b"blue")
    os.setxattr(path, "trusted.t", b"\x00\x01")
    os.setxattr(path, "security.s", b"")
    assert os.getxattr(path, "user.color") == b"blue"
    assert os.getxattr(path, "security.s") == b""
    assert set(os.listxattr(path)) == {"user.color", "trusted.t", "security.s"}
    with pytest.raises(OSError) as e:
        os.getxattr(path, "user.missing")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(FileExistsError):
        os.setxattr(path, "user.color", b"red", os.XATTR_CREATE)
    with pytest.raises(OSError) as e:
        os.setxattr(path, "user.none", b"red", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    both = os.XATTR_CREATE | os.XATTR_REPLACE  # must exist and must not: ext4 and tmpfs refuse
    with pytest.raises(OSError) as e:
        os.setxattr(path, "user.none", b"red", both)
    assert e.value.errno == errno.ENODATA
    with pytest.raises(FileExistsError):
        os.setxattr(path, "user.color", b"red", both)
    os.removexattr(path, "user.color")
    with pytest.raises(OSError) as e:
        os.removexattr(path, "user.color")
    assert e.value.errno == errno.ENODATA
    os.symlink("f", mounted / "l")
    with pytest.raises(PermissionError):
        os.setxattr(mounted / "l", "user.x", b"1", follow_symlinks=False)
    # No POSIX ACLs (the kernel would not enforce them without FUSE_POSIX_ACL): set and get say
    # so alike, as ext4 mounted with noacl does, and getfacl falls back to the mode bits.
    for name in ("system.posix_acl_access", "system.posix_acl_default"):
        with pytest.raises(OSError) as e:
            os.getxattr(path, name)
        assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as e:
        os.setxattr(path, "system.posix_acl_access", b"\x02\x00\x00\x00")
    assert e.value.errno == errno.EOPNOTSUPP
    getfacl = subprocess.run(["getfacl", "-c", str(path)], capture_output=True, text=True)  # Debian's acl
    assert getfacl.returncode == 0 and "user::rw-" in getfacl.stdout, getfacl.stderr
    for call in (lambda: os.setxattr(path, "user.", b"v"), lambda: os.getxattr(path, "trusted.")):
        with pytest.raises(OSError) as e:
            call()  # a bare namespace prefix names no attribute
        assert e.value.errno == errno.EINVAL


def test_xattrs_after_remount(store: Envfs) -> None:
    """After a mount the daemon knows which inodes have xattrs without asking the
    database per request; files with and without them, and new ones, still answer right."""
    store.mount()
    with_xattr, without = store.mnt / "with", store.mnt / "without"
    with_xattr.write_text("a")
    without.write_text("b")
    os.setxattr(with_xattr, "user.k", b"v")
    store.remount()
    assert os.getxattr(with_xattr, "user.k") == b"v"
    with pytest.raises(OSError) as e:
        os.getxattr(without, "user.k")
    assert e.value.errno == errno.ENODATA
    os.setxattr(without, "user.k", b"w")
    assert os.getxattr(without, "user.k") == b"w"
    os.removexattr(with_xattr, "user.k")
    with pytest.raises(OSError) as e:
        os.getxattr(with_xattr, "user.k")
    assert e.value.errno == errno.ENODATA


def test_xattr_small_buffer_erange(mounted: Path) -> None:

    path = mounted / "f"
    path.write_text("x")
    os.setxattr(path, "user.big", b"v" * 100)
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(10)
    assert libc.getxattr(bytes(path), b"user.big", buf, 10) == -1
    assert ctypes.get_errno() == errno.ERANGE
    assert libc.getxattr(bytes(path), b"user.big", None, 0) == 100


def test_unlinked_open_file_lives_until_close(store: Envfs) -> None:
    store.mount()
    path = store.mnt / "tmp"
    data = os.urandom(50_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    ino = os.fstat(fd).st_ino
    os.unlink(path)
    assert not path.exists()
    assert os.pread(fd, 60_000, 0) == data
    os.pwrite(fd, b"more", 50_000)
    assert os.fstat(fd).st_size == 50_004
    assert without_next_file(data_file_ids(store), {ino}) == {ino}
    os.close(fd)
    deadline = time.monotonic() + 10
    while ino in data_file_ids(store) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert without_next_file(data_file_ids(store), set()) == set()


def test_inode_numbers_are_ids_never_reused(store: Envfs) -> None:
    store.mount()
    seen = set()
    for i in range(20):
        p = store.mnt / f"f{i}"
        p.write_text("x")
        seen.add(os.stat(p).st_ino)
        p.unlink()
    p = store.mnt / "last"
    p.write_text("x")
    assert os.stat(p).st_ino not in seen
    assert os.stat(p).st_ino > max(seen)
    assert os.stat(store.mnt).st_ino == 1
    ino = os.stat(p).st_ino
    store.remount()
    assert os.stat(p).st_ino == ino


def test_statfs_reports_real_figures(mounted: Path) -> None:
    st = os.statvfs(mounted)
    assert st.f_bsize == 4096 and st.f_blocks > 0 and 0 < st.f_bavail <= st.f_blocks
    assert st.f_files > 0 and st.f_namemax == 255


def test_access(mounted: Path) -> None:
    path = mounted / "x"
    path.write_text("#!/bin/sh\n")
    os.chmod(path, 0o644)
    assert os.access(path, os.R_OK | os.W_OK)
    assert not os.access(path, os.X_OK)
    os.chmod(path, 0o755)
    assert os.access(path, os.X_OK)


def test_fallocate(mounted: Path) -> None:
    path = mounted / "alloc"
    path.write_bytes(b"head")
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
        assert os.pread(fd, 8, 0) == b"head" + bytes(4)
        assert os.pread(fd, 100, (1 << 20) - 100) == bytes(100)
        os.posix_fallocate(fd, 4096, 100)  # inside the file: no change of size or content
        assert os.fstat(fd).st_size == 1 << 20
        os.pwrite(fd, b"tail", (1 << 20) - 4)
    finally:
        os.close(fd)
    result = subprocess.run(["fallocate", "-l", "3M", str(mounted / "f2")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.stat(mounted / "f2").st_size == 3 << 20
    result = subprocess.run(["fallocate", "--keep-size", "-o", "0", "-l", "8M", str(path)], capture_output=True)
    assert result.returncode == 0 and os.stat(path).st_size == 1 << 20
    result = subprocess.run(["fallocate", "--collapse-range", "-o", "0", "-l", "4096", str(path)], capture_output=True)
    assert result.returncode != 0  # not supported: EOPNOTSUPP, and the file is unchanged
    assert path.read_bytes() == b"head" + bytes((1 << 20) - 8) + b"tail"


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if libc.fallocate(fd, mode, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def test_punch_hole_and_zero_range(store: Envfs) -> None:
    """Punched and zeroed ranges read as zeros, at any alignment and to the end of the file;
    whole blocks punched give their space back; the rest of the file is untouched, also
    after a remount."""
    store.mount()
    path = store.mnt / "f"
    model = bytearray(os.urandom(300 * 4096 + 1000))
    path.write_bytes(model)
    fd = os.open(path, os.O_RDWR)
    try:
        blocks_before = os.fstat(fd).st_blocks
        ranges = [
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 10),  # inside one block
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5000, 3 * 4096),  # partial, whole, partial
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 * 4096, 256 * 4096),  # aligned, 1 MiB
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 299 * 4096 + 7, 1 << 20),  # past the end
            (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 270 * 4096 - 3, 4102),
        ]
        for mode, offset, length in ranges:
            _fallocate(fd, mode, offset, length)
            end = min(offset + length, len(model))
            model[offset:end] = bytes(end - offset)
            assert os.fstat(fd).st_size == len(model)
            assert os.pread(fd, len(model) + 10, 0) == model
        assert os.fstat(fd).st_blocks < blocks_before - 2000  # 1 MiB and more punched
        _fallocate(fd, FALLOC_FL_ZERO_RANGE, len(model) - 10, 4106)  # without KEEP_SIZE: grows
        model[-10:] = bytes(10)
        model += bytes(4096)
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    store.remount()
    assert (store.mnt / "f").read_bytes() == model


# -- what ext4 does that the kernel leaves to a FUSE filesystem ------------------------------------


def _as_user(cwd: Path, uid: int, groups: list[int], action: Callable[[], object]) -> str:
    """Run `action` in a child process of `uid` (primary group groups[0], all of
    `groups` as supplementary ones) in `cwd`; 'ok' or the errno's name."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        outcome = "child failed"
        try:
            os.chdir(cwd)  # as root: pytest's own temporary root is 0700
            os.setgroups(groups)
            os.setgid(groups[0])
            os.setuid(uid)
            action()
            outcome = "ok"
        except OSError as e:
            outcome = errno.errorcode[e.errno]
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        outcome = answer.read().decode()
    os.waitpid(pid, 0)
    return outcome


def _owned_file(path: Path, mode: int, owner: int = 1000) -> Path:
    path.write_bytes(b"0123456789")
    os.chown(path, owner, owner)
    os.chmod(path, mode)
    return path


def _append(name: str) -> Callable[[], None]:
    def append() -> None:
        with open(name, "ab") as f:
            f.write(b"more")

    return append


def test_o_trunc_truncates_whatever_the_access_mode(mounted: Path) -> None:
    path = mounted / "f"
    path.write_bytes(b"0123456789")
    os.utime(path, (1000, 2000))
    os.close(os.open(path, os.O_RDONLY | os.O_TRUNC))
    st = os.stat(path)
    assert st.st_size == 0 and path.read_bytes() == b""
    assert st.st_mtime > 2000 and st.st_ctime > 2000


def test_the_kernel_leaves_clearing_setuid_and_setgid_to_the_daemon(store: Envfs) -> None:
    """The INIT reply carries FUSE_HANDLE_KILLPRIV_V2 (pyfuse3 patch 7): the
    kernel then neither asks for a file's attributes before a chown nor for
    its security.capability before every write, and the daemon clears the
    bits (test_against_ext4's battery compares what it leaves with ext4)."""
    store.mount()
    (store.mnt / "f").write_bytes(b"x")
    # The first counters may predate the INIT reply.
    deadline = time.monotonic() + 5
    while store.counters()["daemon_clears_setid"] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.counters()["daemon_clears_setid"] == 1


def test_changing_data_clears_setuid_and_setgid_as_ext4_does(store: Envfs) -> None:
    """Without CAP_FSETID a truncating open, a truncate, a write and fallocate
    clear set-user-ID, and set-group-ID where group-execute is set or the
    writer is not in the file's group (kernel 6.x, ext4); root keeps both."""
    store.mount("--allow-other")
    work = store.mnt / "work"
    work.mkdir(mode=0o777)
    work.chmod(0o777)

    def mode(name: str) -> int:
        return stat.S_IMODE(os.stat(work / name).st_mode)

    _owned_file(work / "trunc", 0o6777)
    assert _as_user(work, 1001, [1001], lambda: os.close(os.open("trunc", os.O_WRONLY | os.O_TRUNC))) == "ok"
    assert mode("trunc") == 0o777 and os.stat(work / "trunc").st_size == 0

    _owned_file(work / "own-trunc", 0o6777)
    assert _as_user(work, 1000, [1000], lambda: os.close(os.open("own-trunc", os.O_RDWR | os.O_TRUNC))) == "ok"
    assert mode("own-trunc") == 0o777

    for name, groups, expected in [("outsider", [1001], 0o767), ("member", [1001, 1000], 0o2767)]:
        _owned_file(work / name, 0o2767)
        assert _as_user(work, 1001, groups, _append(name)) == "ok"
        assert mode(name) == expected, name
        assert (work / name).read_bytes() == b"0123456789more"

    _owned_file(work / "truncate", 0o2767)
    assert _as_user(work, 1001, [1001], lambda: os.truncate("truncate", 3)) == "ok"
    assert mode("truncate") == 0o767 and (work / "truncate").read_bytes() == b"012"

    _owned_file(work / "fallocate", 0o2767)

    def fallocate() -> None:
        fd = os.open("fallocate", os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, 8192)
        finally:
            os.close(fd)

    assert _as_user(work, 1001, [1001], fallocate) == "ok"
    assert mode("fallocate") == 0o767

    _owned_file(work / "roots", 0o6777)
    with open(work / "roots", "ab") as f:
        f.write(b"root")
    os.truncate(work / "roots", 2)
    assert mode("roots") == 0o6777


def test_rename_whiteout_leaves_a_whiteout_device(mounted: Path) -> None:
    """renameat2(RENAME_WHITEOUT), which overlayfs uses on its upper layer."""
    libc = ctypes.CDLL(None, use_errno=True)
    (mounted / "a").write_text("moved")
    at_fdcwd, rename_whiteout = -100, 4
    if libc.renameat2(at_fdcwd, bytes(mounted / "a"), at_fdcwd, bytes(mounted / "b"), rename_whiteout) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
    assert (mounted / "b").read_text() == "moved"
    st = os.lstat(mounted / "a")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
    assert sorted(os.listdir(mounted)) == ["a", "b"]
    os.unlink(mounted / "a")
    assert os.listdir(mounted) == ["b"]


def test_trusted_xattr_names_are_listed_to_root_alone(store: Envfs) -> None:
    store.mount("--allow-other")
    path = store.mnt / "f"
    path.write_text("x")
    path.chmod(0o644)
    os.setxattr(path, "trusted.secret", b"1")
    os.setxattr(path, "user.plain", b"2")
    assert sorted(os.listxattr(path)) == ["trusted.secret", "user.plain"]
    read_end, write_end = os.pipe()

    def report() -> None:
        os.write(write_end, ",".join(sorted(os.listxattr("f"))).encode())

    assert _as_user(store.mnt, 1000, [1000], report) == "ok"
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        assert answer.read() == b"user.plain"


def test_listing_a_directory_updates_its_atime_as_relatime_does(mounted: Path) -> None:
    directory = mounted / "d"
    directory.mkdir()
    (directory / "f").write_text("x")
    os.utime(directory, (1000, 2000))
    os.listdir(directory)
    first = os.stat(directory).st_atime
    assert first > 2000
    os.listdir(directory)  # atime is now newer than mtime and ctime: relatime leaves it
    assert os.stat(directory).st_atime == first


def test_fallocate_changes_mtime_and_ctime(mounted: Path) -> None:
    path = mounted / "f"
    path.write_bytes(b"x")
    for mode in (0, 1):  # 1: FALLOC_FL_KEEP_SIZE
        os.utime(path, (1000, 2000))
        before = os.stat(path).st_ctime_ns
        time.sleep(0.01)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        fd = os.open(path, os.O_RDWR)
        try:
            assert libc.fallocate(fd, mode, 0, 8192) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(fd)
        st = os.stat(path)
        assert st.st_mtime > 2000 and st.st_ctime_ns > before, mode


def test_fallocate_keep_size_past_the_end_reserves_space(mounted: Path) -> None:
    """As on ext4: the blocks are reserved (st_blocks counts them), the size stays."""
    path = mounted / "kept"
    path.touch()
    subprocess.run(["fallocate", "--keep-size", "--length", "10MiB", str(path)], check=True)
    st = os.stat(path)
    assert st.st_size == 0 and st.st_blocks * 512 >= 10 << 20
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert path.read_bytes() == data


def _forget_names() -> None:
    """Have the kernel drop its dentries and inodes (not the page cache)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def _cached_lookups_rise(
    env: Envfs, before: int, by: int = 1, why: str = "no lookup was answered from the daemon's cache"
) -> int:
    """The daemon's count of lookups answered from memory, once it is `by` above `before`."""
    deadline = time.monotonic() + 5
    while (now := env.counters()["cached_lookups"]) < before + by:
        assert time.monotonic() < deadline, why
        time.sleep(0.1)
    return now


def _settled_cached_lookups(env: Envfs) -> int:
    """The daemon's count of lookups answered from memory, once two reads agree (the
    counters are published asynchronously)."""
    previous = env.counters()["cached_lookups"]
    while True:
        time.sleep(0.2)
        current = env.counters()["cached_lookups"]
        if current == previous:
            return current
        previous = current


def test_lookups_the_kernel_forgot_follow_every_change(store: Envfs) -> None:
    """A name the kernel looked up and forgot is answered from the daemon's memory;
    every change of a directory's entries (rename, create, unlink, link, rmdir,
    RENAME_EXCHANGE) drops what it remembered of that directory."""
    store.mount()
    d = store.mnt / "d"
    (d / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/x"):
        (d / name).write_text(name)
    ino = {name: os.stat(d / name).st_ino for name in ("a", "b", "sub", "sub/x")}
    _forget_names()
    assert {name: os.stat(d / name).st_ino for name in ino} == ino  # looked up from the database
    count = store.counters()["cached_lookups"]
    _forget_names()
    assert {name: os.stat(d / name).st_ino for name in ino} == ino  # from memory
    count = _cached_lookups_rise(store, count)

    os.rename(d / "a", d / "c")
    (d / "a").write_text("new a")
    os.unlink(d / "b")
    os.link(d / "c", d / "sub" / "l")
    _forget_names()
    assert os.stat(d / "c").st_ino == ino["a"] and (d / "a").read_text() == "new a"
    assert os.stat(d / "a").st_ino not in ino.values()
    assert not (d / "b").exists()
    assert os.stat(d / "sub" / "l").st_ino == ino["a"] and os.stat(d / "sub" / "x").st_ino == ino["sub/x"]
    _forget_names()
    assert os.stat(d / "sub" / "x").st_ino == ino["sub/x"]
    count = _cached_lookups_rise(store, count)

    os.unlink(d / "c")
    os.rename(d / "sub", d / "sub2")
    (d / "e").mkdir()
    _forget_names()
    os.rmdir(d / "e")
    _renameat2(d / "a", d / "sub2" / "x", 2)  # RENAME_EXCHANGE
    _forget_names()
    assert not (d / "c").exists() and not (d / "sub").exists() and not (d / "e").exists()
    assert os.stat(d / "sub2" / "l").st_ino == ino["a"] and os.stat(d / "sub2" / "l").st_nlink == 1
    assert (d / "a").read_text() == "sub/x" and (d / "sub2" / "x").read_text() == "new a"
    assert os.stat(d / "a").st_ino == ino["sub/x"]
    assert sorted(os.listdir(d)) == ["a", "sub2"]
    store.unmount()
    assert "damaged:   0 (clean)" in store.run("fsck", str(store.store)).stdout


def test_an_unlink_forgets_only_its_own_name(store: Envfs) -> None:
    """rm of one file keeps what the daemon remembers of its siblings' names (rm, find -delete
    and cleaners go file by file), and forgets that one name."""
    store.mount()
    d = store.mnt  # no directory on the way, whose own lookup the counter would count
    for name in "abcd":
        (d / name).write_text(name)
    ino = {name: os.stat(d / name).st_ino for name in "abcd"}
    _forget_names()
    for name in "abcd":
        os.stat(d / name)  # looked up from the database, and remembered
    os.unlink(d / "a")
    _forget_names()
    count = _settled_cached_lookups(store)
    assert {name: os.stat(d / name).st_ino for name in "bcd"} == {name: ino[name] for name in "bcd"}
    _cached_lookups_rise(store, count, by=3, why="the unlink made the daemon forget its siblings' names")
    assert not (d / "a").exists()
    (d / "a").write_text("new")
    _forget_names()
    assert os.stat(d / "a").st_ino not in ino.values() and (d / "a").read_text() == "new"


def test_a_new_directory_answers_missing_names_from_memory(store: Envfs) -> None:
    """In a directory made by the mount, a name the daemon does not know is not there (the
    lookup before each create of an untar); a rename into it ends that knowledge, and names
    that arrive any way are found."""
    store.mount()
    (store.mnt / "elsewhere").write_text("moved")
    new = store.mnt / "new"
    new.mkdir()
    count = _settled_cached_lookups(store)
    for i in range(5):
        assert not (new / f"missing-{i}").exists()
    assert _settled_cached_lookups(store) >= count + 5, "missing names were looked up in SQLite"
    (new / "created").write_text("c")
    os.mkdir(new / "sub")
    os.symlink("created", new / "link")
    os.link(new / "created", new / "hard")
    os.rename(store.mnt / "elsewhere", new / "moved")
    os.unlink(new / "hard")
    _forget_names()
    assert sorted(os.listdir(new)) == ["created", "link", "moved", "sub"]
    assert (new / "moved").read_text() == "moved" and (new / "link").read_text() == "c"
    assert not (new / "hard").exists() and not (new / "missing-0").exists()
    os.rmdir(new / "sub")
    os.mkdir(new / "sub")
    (new / "sub" / "x").write_text("x")
    _forget_names()
    assert os.listdir(new / "sub") == ["x"] and (new / "sub" / "x").read_text() == "x"


def test_st_blocks_follow_the_data_file(mounted: Path) -> None:
    """st_blocks (du) is the data file's, after creation, writes, attribute changes,
    truncation and a re-read of the attributes the kernel forgot."""
    f = mounted / "f"
    f.write_bytes(b"")
    assert os.stat(f).st_blocks == 0
    with open(f, "r+b") as out:
        out.write(os.urandom(1 << 20))
    grown = os.stat(f).st_blocks
    assert grown * 512 >= 1 << 20
    os.chmod(f, 0o600)  # attribute changes leave the data file, and its blocks, as they were
    os.utime(f, (1, 1))
    assert os.stat(f).st_blocks == grown
    os.truncate(f, 4096)
    assert os.stat(f).st_blocks * 512 < 64 << 10
    with open(f, "ab") as out:
        out.write(os.urandom(1 << 20))
    _forget_names()
    assert os.stat(f).st_blocks * 512 >= 1 << 20
