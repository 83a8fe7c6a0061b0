"""An fsx for envfs: random operations on one file, each checked against a model.

Writes and reads (cached and O_DIRECT), truncates, every fallocate mode,
copy_file_range within the file, writes and reads through mmap, fsync,
dropping the file's clean pages so that reads reach the daemon, and reopening,
at offsets and lengths drawn around block boundaries; the model is the bytes
the file must hold. A read that differs from the model, or an unexpected
error, raises `Mismatch` with the seed, the operation and the operations
before it, and the command that replays them.

`Exerciser.snapshots` keeps the model as of every operation since the last
fsync, for checking what a file may hold after its daemon was killed.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import mmap
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

BLOCK = 4096  # envfs's plaintext block; also the page size the offsets aim around

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class Mismatch(AssertionError):
    """The file disagreed with the model, or an operation failed."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Exerciser:
    """Random operations on `path` (made empty), checked against a bytearray."""

    def __init__(self, path: Path, seed: int, max_size: int = 1 << 20, *, mapped: bool = True) -> None:
        """Without `mapped`, no operation uses mmap: a mapped page of a mount whose
        daemon dies faults with SIGBUS, which ends the whole process."""
        self.path = path
        self.seed = seed
        self.mapped = mapped
        # Set where the disk may fill up: an operation may then fail with ENOSPC,
        # and must then leave the file as it was.
        self.full_disk = False
        self.rng = random.Random(seed)
        self.max_size = max_size
        self.model = bytearray()
        self.done = 0
        self.recent: collections.deque[str] = collections.deque(maxlen=30)
        self.unsupported: set[str] = set()
        self.counts: collections.Counter[str] = collections.Counter()
        self.snapshots: list[bytes] = [b""]  # the model after the last fsync and after each operation since
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.operations: list[tuple[int, Callable[[], str]]] = [
            (20, self.write),
            (16, self.read),
            (6, self.map_write),
            (6, self.map_read),
            (4, self.direct_write),
            (4, self.direct_read),
            (7, self.truncate),
            (8, self.falloc),
            (5, self.copy),
            (3, self.fsync),
            (3, self.drop_pages),
            (2, self.reopen),
            (2, self.check_all),
        ]
        if not mapped:
            self.operations = [(w, op) for w, op in self.operations if op not in (self.map_write, self.map_read)]

    # -- driving ---------------------------------------------------------------

    def run(self, count: int) -> None:
        weights = [w for w, _ in self.operations]
        for _ in range(count):
            (operation,) = self.rng.choices([op for _, op in self.operations], weights)
            self.step(operation)

    def step(self, operation: Callable[[], str]) -> None:
        self.done += 1
        name = operation.__name__
        try:
            what = operation()
        except Mismatch:
            raise
        except OSError as e:
            if not (self.full_disk and e.errno == errno.ENOSPC):
                self.fail(f"{name} raised {e!r}")
            # Refused for lack of room: the file must be as it was.
            what = f"{name} refused: ENOSPC"
            name = "refused"
        self.counts[name] += 1
        self.recent.append(f"{self.done}: {what}")
        if name == "fsync":
            self.snapshots = [bytes(self.model)]
        else:
            self.snapshots.append(bytes(self.model))

    def fail(self, message: str) -> None:
        history = "\n  ".join(self.recent)
        raise Mismatch(
            f"fsx seed {self.seed}, operation {self.done}: {message}\n"
            f"replay: python tests/fsx.py FILE --seed {self.seed} --ops {self.done} --max-size {self.max_size}"
            f"{'' if self.mapped else ' --no-mmap'}\nbefore it:\n  {history}"
        )

    def close(self) -> None:
        os.close(self.fd)

    def reopen_after_remount(self) -> None:
        """After the filesystem was mounted again: open the file, check all of it."""
        self.fd = os.open(self.path, os.O_RDWR)
        self.recent.append(f"{self.done}: remounted")
        self.check_all()

    # -- drawing offsets and lengths -------------------------------------------

    def offset(self, limit: int) -> int:
        """An offset in [0, limit]: on, near or between block boundaries."""
        if limit <= 0:
            return 0
        kind = self.rng.random()
        if kind < 0.3:
            value = self.rng.randrange(0, limit // BLOCK + 1) * BLOCK
        elif kind < 0.6:
            value = self.rng.randrange(0, limit // BLOCK + 1) * BLOCK + self.rng.randint(-3, 3)
        else:
            value = self.rng.randrange(0, limit + 1)
        return min(max(value, 0), limit)

    def length(self) -> int:
        kind = self.rng.random()
        if kind < 0.3:
            return self.rng.randint(1, 4) * BLOCK
        if kind < 0.5:
            return self.rng.randint(1, 4) * BLOCK + self.rng.randint(-3, 3)
        if kind < 0.8:
            return self.rng.randint(1, 300)
        return self.rng.randint(1, 40 * BLOCK)

    def expect(self, offset: int, got: bytes, what: str) -> None:
        want = bytes(self.model[offset : offset + len(got)])
        if len(got) != len(want) or got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            self.fail(
                f"{what}: {len(got)} bytes read, {len(want)} expected; first difference at file offset "
                f"{offset + at} (block {(offset + at) // BLOCK}): got {got[at : at + 16].hex()}, "
                f"expected {want[at : at + 16].hex()}"
            )

    def resize(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    # -- operations ------------------------------------------------------------

    def write(self) -> str:
        offset = self.offset(self.max_size - 1)
        data = self.rng.randbytes(min(self.length(), self.max_size - offset))
        written = os.pwrite(self.fd, data, offset)
        self.wrote(offset, data, written)
        return f"write {offset} +{len(data)}" + ("" if written == len(data) else f" (wrote {written})")

    def wrote(self, offset: int, data: bytes | memoryview, written: int) -> None:
        """Put what a write wrote into the model. Short only on a full disk: the
        kernel sends a partial page that it does not cache on its own, and a
        later part of the write may then fail for lack of room."""
        if written != len(data) and not (self.full_disk and 0 < written < len(data)):
            self.fail(f"a write of {len(data)} bytes at {offset} wrote {written}")
        if offset + written > len(self.model):
            self.resize(offset + written)
        self.model[offset : offset + written] = data[:written]

    def read(self) -> str:
        offset = self.offset(len(self.model) + BLOCK)
        length = self.length()
        what = f"read {offset} +{length} (size {len(self.model)})"
        self.expect(offset, os.pread(self.fd, length, offset), what)
        return what

    def map_write(self) -> str:
        offset = self.offset(self.max_size - 1)
        length = min(self.length(), self.max_size - offset)
        what = f"mmap write {offset} +{length}"
        if offset + length > len(self.model):
            os.ftruncate(self.fd, offset + length)
            self.resize(offset + length)
            what += " (after ftruncate)"
        data = self.rng.randbytes(length)
        with mmap.mmap(self.fd, len(self.model)) as mapping:
            mapping[offset : offset + length] = data
            if self.rng.random() < 0.5:
                mapping.flush()
                what += ", msync"
        self.model[offset : offset + length] = data
        return what

    def map_read(self) -> str:
        if not self.model:
            return "mmap read of an empty file: skipped"
        offset = self.offset(len(self.model) - 1)
        length = min(self.length(), len(self.model) - offset)
        what = f"mmap read {offset} +{length}"
        with mmap.mmap(self.fd, len(self.model), prot=mmap.PROT_READ) as mapping:
            self.expect(offset, bytes(mapping[offset : offset + length]), what)
        return what

    def direct_write(self) -> str:
        """A write through a second descriptor opened with O_DIRECT, which must see
        and be seen by the cached one; whole blocks from a page-aligned buffer, as
        ext4 requires."""
        offset = self.offset(self.max_size - BLOCK) // BLOCK * BLOCK
        length = min(self.rng.randint(1, 16), (self.max_size - offset) // BLOCK) * BLOCK
        data = self.rng.randbytes(length)
        with mmap.mmap(-1, length) as buffer:
            buffer[:] = data
            fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
            try:
                written = os.pwritev(fd, [buffer], offset)
            finally:
                os.close(fd)
        self.wrote(offset, data, written)
        return f"O_DIRECT write {offset} +{length}" + ("" if written == length else f" (wrote {written})")

    def direct_read(self) -> str:
        offset = self.offset(len(self.model) + BLOCK) // BLOCK * BLOCK
        length = self.rng.randint(1, 16) * BLOCK
        what = f"O_DIRECT read {offset} +{length} (size {len(self.model)})"
        with mmap.mmap(-1, length) as buffer:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            try:
                got = os.preadv(fd, [buffer], offset)
            finally:
                os.close(fd)
            self.expect(offset, bytes(buffer[:got]), what)
        return what

    def truncate(self) -> str:
        size = self.offset(self.max_size)
        os.ftruncate(self.fd, size)
        old = len(self.model)
        self.resize(size)
        return f"truncate {old} -> {size}"

    def falloc(self) -> str:
        modes = {
            "allocate": 0,
            "allocate, keep size": FALLOC_FL_KEEP_SIZE,
            "punch hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            "zero range": FALLOC_FL_ZERO_RANGE,
            "zero range, keep size": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
        }
        name = self.rng.choice(sorted(modes))
        offset = self.offset(self.max_size - 1)
        length = min(self.length(), self.max_size - offset)
        what = f"fallocate {name} {offset} +{length} (size {len(self.model)})"
        if name in self.unsupported:
            return what + ": unsupported"
        try:
            fallocate(self.fd, modes[name], offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.unsupported.add(name)
            return what + ": unsupported"
        end = offset + length
        if modes[name] & FALLOC_FL_KEEP_SIZE:
            end = min(end, len(self.model))
        elif end > len(self.model):
            self.resize(end)
        if modes[name] & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) and end > offset:
            self.model[offset:end] = bytes(end - offset)
        return what

    def copy(self) -> str:
        """copy_file_range within the file, between ranges that do not overlap (as the call requires)."""
        if not self.model:
            return "copy from an empty file: skipped"
        source = self.offset(len(self.model) - 1)
        length = min(self.length(), len(self.model) - source)
        for _ in range(20):
            target = self.offset(self.max_size - length)
            if target + length <= source or source + length <= target:
                break
        else:
            return "copy: no range apart from the source; skipped"
        copied = os.copy_file_range(self.fd, self.fd, length, source, target)
        data = bytes(self.model[source : source + copied])
        if target + copied > len(self.model):
            self.resize(target + copied)
        self.model[target : target + copied] = data
        return f"copy {source} +{length} -> {target} (copied {copied})"

    def fsync(self) -> str:
        if self.rng.random() < 0.5:
            os.fdatasync(self.fd)
            return "fdatasync"
        os.fsync(self.fd)
        return "fsync"

    def drop_pages(self) -> str:
        """Write back and drop the file's cached pages: the next reads come from the daemon."""
        os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return "fdatasync and drop cached pages"

    def reopen(self) -> str:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)
        return "close and reopen"

    def check_all(self) -> str:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            self.fail(f"size {size}, expected {len(self.model)}")
        self.expect(0, os.pread(self.fd, len(self.model) + 1, 0), "read of the whole file")
        return f"check all {size} bytes"


def possible_after_crash(content: bytes, snapshots: list[bytes]) -> str | None:
    """Why `content` cannot be what a file holds after its daemon was killed, or None.

    `snapshots` are the file's contents as of its last fsync and after every
    operation since. Its size must be within theirs (the kernel writes an
    extending write back a page at a time), and every block, up to that size,
    one of theirs at that block (an operation may have reached some of its
    blocks, and the size be older than a block): no block of anything never
    written, nor of garbage.
    """
    sizes = [len(s) for s in snapshots]
    if not min(sizes) <= len(content) <= max(sizes):
        return f"size {len(content)} is outside the sizes since the last fsync, {min(sizes)} to {max(sizes)}"
    for start in range(0, len(content), BLOCK):
        block = content[start : start + BLOCK]
        candidates = {s[start : start + len(block)].ljust(len(block), b"\0") for s in snapshots}
        if block not in candidates:
            return f"block {start // BLOCK} matches no state since the last fsync"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--max-size", type=int, default=1 << 20)
    parser.add_argument("--no-mmap", action="store_true", help="no operation through mmap")
    args = parser.parse_args()
    exerciser = Exerciser(args.file, args.seed, args.max_size, mapped=not args.no_mmap)
    try:
        exerciser.run(args.ops)
        exerciser.check_all()
    except Mismatch as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        exerciser.close()
    print(f"{args.ops} operations, seed {args.seed}: {dict(exerciser.counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
