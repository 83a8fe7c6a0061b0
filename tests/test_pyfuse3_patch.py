"""The venv's pyfuse3 is the build with envfs's patches (scripts/build-pyfuse3, patches/pyfuse3/).

Besides the markers, a tiny pyfuse3 filesystem (not envfs) is mounted to check that fallocate
requests reach Python, that a write's plaintext does not stay in libfuse's receive buffer (with
one worker and with several), that the single worker's loop keeps trio's other tasks running
under a steady stream of requests, from one client or several, and that it calls the idle hook
while the hook is armed.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from helpers import process_gone

# A filesystem of empty files that keeps only sizes: every write payload is wiped in place (the
# bytes object pyfuse3 hands over) and dropped, so any copy left in the process is pyfuse3's or
# libfuse's. It logs fallocate calls to argv[2], and "tick" every 10 ms from a trio task beside
# pyfuse3.main(max_tasks=argv[3]).
TINY_FS = r"""
import ctypes, errno, logging, os, stat, sys
import pyfuse3, trio

log = open(sys.argv[2], "a", buffering=1)
logging.basicConfig(stream=log, level=logging.WARNING)

class FS(pyfuse3.Operations):
    def __init__(self):
        super().__init__()
        self.inodes = {}
        self.sizes = {}

    def attr(self, ino):
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFDIR | 0o755, 2, 0
        else:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o644, 1, self.sizes[ino]
        e.attr_timeout = e.entry_timeout = 0
        return e

    async def getattr(self, ino, ctx=None):
        if ino != pyfuse3.ROOT_INODE and ino not in self.sizes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attr(ino)

    async def lookup(self, parent, name, ctx=None):
        if name not in self.inodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attr(self.inodes[name])

    async def create(self, parent, name, mode, flags, ctx):
        ino = self.inodes.setdefault(name, pyfuse3.ROOT_INODE + 1 + len(self.inodes))
        self.sizes.setdefault(ino, 0)
        pyfuse3.arm_idle_hook()
        return pyfuse3.FileInfo(fh=ino), self.attr(ino)

    async def open(self, ino, flags, ctx):
        return pyfuse3.FileInfo(fh=ino)

    async def setattr(self, ino, attr, fields, fh, ctx):
        if fields.update_size:
            self.sizes[ino] = attr.st_size
        return self.attr(ino)

    async def write(self, fh, off, buf):
        self.sizes[fh] = max(self.sizes[fh], off + len(buf))
        ctypes.memset(id(buf) + bytes.__basicsize__ - 1, 0, len(buf))
        return len(buf)

    async def fallocate(self, fh, mode, offset, length):
        log.write(f"fallocate {mode} {offset} {length}\n")
        if not mode & 1:  # FALLOC_FL_KEEP_SIZE
            self.sizes[fh] = max(self.sizes[fh], offset + length)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass

idle_calls = 0

def idle():
    # Armed by each create: stays armed after its first call, fails at its second.
    global idle_calls
    idle_calls += 1
    log.write(f"idle {idle_calls}\n")
    if idle_calls == 2:
        raise RuntimeError("idle hook test failure")
    return idle_calls == 1

pyfuse3.set_idle_hook(idle)

async def tick():
    while True:
        await trio.sleep(0.01)
        log.write("tick\n")

async def main(max_tasks):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        await pyfuse3.main(max_tasks=max_tasks)
        nursery.cancel_scope.cancel()

pyfuse3.init(FS(), sys.argv[1], set(pyfuse3.default_options) | {"fsname=envfs-pyfuse3-test"})
log.write("mounted\n")
try:
    trio.run(main, int(sys.argv[3]))
finally:
    pyfuse3.close(unmount=True)
"""


def test_operations_has_fallocate() -> None:
    assert hasattr(pyfuse3.Operations, "fallocate")


def test_envfs_patches_reported() -> None:
    patches = {
        "fallocate", "zero-recv-buf", "single-worker-loop", "poll-before-park", "lseek", "xattr-create-replace",
        "spin-before-poll", "killpriv-v2", "idle-hook",
    }  # fmt: skip
    assert patches <= set(getattr(pyfuse3, "ENVFS_PATCHES", ()))


@pytest.mark.parametrize("microseconds", [-1, 1_000_001])
def test_spin_out_of_range_is_refused(microseconds: int) -> None:
    with pytest.raises(ValueError):
        pyfuse3.set_single_worker_spin(microseconds)


def test_default_fallocate_is_eopnotsupp() -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        trio.run(pyfuse3.Operations().fallocate, 1, 0, 0, 4096)
    assert caught.value.errno == errno.EOPNOTSUPP


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture(params=[1, 99], ids=["one-worker", "workers"])
def tiny_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    mnt, log, script = tmp_path / "mnt", tmp_path / "fs.log", tmp_path / "tiny_fs.py"
    mnt.mkdir()
    script.write_text(TINY_FS)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(mnt), str(log), str(request.param)], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while not _mounted(mnt):
            assert proc.poll() is None, f"tiny FS exited with {proc.returncode}"
            assert time.monotonic() < deadline, "tiny FS did not mount"
            time.sleep(0.05)
        yield proc, mnt, log
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert process_gone(proc.pid)


def test_fallocate_reaches_the_filesystem(tiny_fs: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    _, mnt, log = tiny_fs
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
    finally:
        os.close(fd)
    # posix_fallocate would emulate a refused fallocate by writing, so check that the request arrived.
    assert f"fallocate 0 0 {1 << 20}" in log.read_text().splitlines()


def _copies_in_memory(pid: int, needle: bytes) -> int:
    count = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or fields[-1] in ("[vvar]", "[vsyscall]"):
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(low)
                count += len(re.findall(re.escape(needle), mem.read(high - low)))
            except OSError:
                continue
    return count


@pytest.mark.parametrize("size", [200, 65536])
def test_write_payload_not_left_in_receive_buffer(
    tiny_fs: tuple[subprocess.Popen[bytes], Path, Path], size: int
) -> None:
    proc, mnt, _ = tiny_fs
    marker = os.urandom(32)
    with open(mnt / "f", "wb", buffering=0) as f:
        assert f.write(os.urandom(100) + marker + os.urandom(size - 132)) == size
    time.sleep(0.2)  # let the worker finish the request
    assert _copies_in_memory(proc.pid, marker) == 0


def _fuse_fd_flags(pid: int) -> int:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                fdinfo = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                return int(re.search(r"^flags:\s+([0-7]+)$", fdinfo, re.M).group(1), 8)  # type: ignore[union-attr]
        except FileNotFoundError:
            continue
    raise AssertionError("no /dev/fuse descriptor")


@pytest.mark.parametrize("clients", [1, 4])
def test_single_worker_serves_a_stream_of_requests_and_trio_keeps_running(
    tiny_fs: tuple[subprocess.Popen[bytes], Path, Path], request: pytest.FixtureRequest, clients: int
) -> None:
    proc, mnt, log = tiny_fs
    one_worker = request.node.callspec.params["tiny_fs"] == 1
    # The single worker reads until EAGAIN; several workers keep the blocking fd.
    assert bool(_fuse_fd_flags(proc.pid) & os.O_NONBLOCK) == one_worker
    (mnt / "f").touch()
    stop = time.monotonic() + 1.5
    errors: list[BaseException] = []

    def stat_loop() -> None:
        try:
            while time.monotonic() < stop:
                os.stat(mnt / "f")  # attr_timeout 0: every stat is a request
        except BaseException as e:
            errors.append(e)

    ticks_before = log.read_text().count("tick")
    # One client finds the fd empty after every reply (the worker waits in poll());
    # several keep requests queued (the worker reads on without waiting).
    threads = [threading.Thread(target=stat_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    # The ticker (every 10 ms) ran all along: about 150 ticks; a starved loop would log none.
    assert log.read_text().count("tick") - ticks_before >= 30
    assert proc.poll() is None


def test_the_single_worker_calls_the_idle_hook_while_it_is_armed(
    tiny_fs: tuple[subprocess.Popen[bytes], Path, Path], request: pytest.FixtureRequest
) -> None:
    """The tiny FS's create arms the hook; the hook asks to stay armed after its first
    call and fails at its second, which is logged and disarms it."""
    proc, mnt, log = tiny_fs
    one_worker = request.node.callspec.params["tiny_fs"] == 1

    def requests_with_gaps() -> None:
        for _ in range(5):
            os.stat(mnt)  # attr_timeout 0: a request, then a gap the worker sees
            time.sleep(0.02)

    def idle_lines() -> list[str]:
        return [line for line in log.read_text().splitlines() if line.startswith("idle ")]

    requests_with_gaps()
    assert idle_lines() == []  # not armed yet
    (mnt / "f").touch()  # a create
    requests_with_gaps()
    if not one_worker:
        assert idle_lines() == []  # several workers never call it
        return
    assert idle_lines() == ["idle 1", "idle 2"]
    assert "the idle hook failed" in log.read_text() and "idle hook test failure" in log.read_text()
    (mnt / "g").touch()  # armed again
    requests_with_gaps()
    assert idle_lines() == ["idle 1", "idle 2", "idle 3"]
    assert proc.poll() is None
