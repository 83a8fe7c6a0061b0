"""Scan another process's memory for secrets and plaintext (tests only; needs root).

The method of shared/research/hsm-and-memory.md §3-§4: read every readable
mapping of /proc/PID/maps through /proc/PID/mem (root may do so even when
the target set PR_SET_DUMPABLE to 0) and count copies of known byte strings.

A plaintext *canary* is made of 32-byte records, each a per-run marker, its
index and random bytes, so that fragments are counted as well as whole
copies ("records found / records in the canary" = canary-equivalents).

A hit can be classified as lying in libfuse's per-worker receive buffer
(`fuse_buf.mem`): the buffer is `malloc(1 MiB + 4 KiB)` (bufsize of libfuse
3.x), which glibc serves with its own anonymous mmap: a 16-byte chunk header
whose size field is the chunk size with the IS_MMAPPED bit (2) set, then
the buffer. A request is read to the start of the buffer: fuse_in_header
(40 bytes), for WRITE fuse_write_in (40 bytes), then the payload, so a
64 KiB write's payload sits at offset 96 of the chunk. Later, shorter
requests overwrite only the first bytes, which is why the payload of the
last large write stays there (research §4). envfs cannot reach that buffer
from Python; tests report such hits as the known gap and fail on any other.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

FUSE_IN_HEADER = 40
FUSE_WRITE_IN = 40
FUSE_WRITE = 16
MALLOC_CHUNK_HEADER = 16
#: libfuse's receive buffer size: FUSE_MAX_MAX_PAGES (256) pages + FUSE_BUFFER_HEADER_SIZE (4 KiB).
LIBFUSE_BUFSIZE = 256 * 4096 + 4096
_IS_MMAPPED = 0x2


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    perms: str
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def anonymous(self) -> bool:
        return self.path == "" or self.path.startswith("[anon")

    def describe(self) -> str:
        name = self.path or "anonymous"
        return f"{name} {self.perms} {self.start:#x}-{self.end:#x} ({self.size // 1024} KiB)"


@dataclass(frozen=True)
class Hit:
    address: int
    region: Region
    #: set when the hit lies in a libfuse receive buffer: (chunk address, offset of the hit in the chunk)
    libfuse: tuple[int, int] | None = None

    @property
    def offset(self) -> int:
        return self.address - self.region.start

    def describe(self) -> str:
        where = f"{self.address:#x} (offset {self.offset} of {self.region.describe()})"
        if self.libfuse:
            chunk, offset = self.libfuse
            where += f" = offset {offset} of the libfuse receive buffer chunk at {chunk:#x}"
        return where


def regions(pid: int) -> list[Region]:
    found = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.append(Region(start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return found


@dataclass
class Snapshot:
    """The readable memory of one process at one moment."""

    pid: int
    chunks: list[tuple[Region, bytes]] = field(default_factory=list)
    unreadable: list[Region] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(data) for _, data in self.chunks)

    def find(self, needle: bytes) -> list[Hit]:
        """Every occurrence of `needle` (overlapping ones included)."""
        hits = []
        for region, data in self.chunks:
            pos = data.find(needle)
            while pos >= 0:
                hits.append(self._hit(region, data, region.start + pos))
                pos = data.find(needle, pos + 1)
        return hits

    def count(self, needle: bytes) -> int:
        return len(self.find(needle))

    def _hit(self, region: Region, data: bytes, address: int) -> Hit:
        return Hit(address, region, self._libfuse_chunk(region, data, address))

    def _libfuse_chunk(self, region: Region, data: bytes, address: int) -> tuple[int, int] | None:
        """(chunk, offset) if `address` lies in an mmapped malloc chunk the size of libfuse's buffer."""
        if not region.anonymous or region.size < LIBFUSE_BUFSIZE:
            return None
        page = 4096
        # An mmapped chunk starts on a page; look back at most one buffer size.
        candidate = (address - region.start) // page * page
        lowest = max(0, address - region.start - LIBFUSE_BUFSIZE - 2 * page)
        while candidate >= lowest:
            prev_size, size = struct.unpack_from("<QQ", data, candidate)
            chunk_size = size & ~0x7
            if (
                size & _IS_MMAPPED
                and prev_size == 0
                and LIBFUSE_BUFSIZE + MALLOC_CHUNK_HEADER <= chunk_size <= LIBFUSE_BUFSIZE + 3 * page
                and candidate + chunk_size > address - region.start
            ):
                return region.start + candidate, address - region.start - candidate
            candidate -= page
        return None

    def header_before(self, hit: Hit, payload_offset: int = 0) -> tuple[int, int, int] | None:
        """(len, opcode, nodeid) of the fuse_in_header that would precede a WRITE payload at the hit."""
        address = hit.address - payload_offset - FUSE_WRITE_IN - FUSE_IN_HEADER
        data = self.read(address, FUSE_IN_HEADER)
        if data is None:
            return None
        length, opcode, _unique, nodeid = struct.unpack_from("<IIQQ", data)
        return length, opcode, nodeid

    def read(self, address: int, length: int) -> bytes | None:
        for region, data in self.chunks:
            if region.start <= address and address + length <= region.start + len(data):
                return data[address - region.start : address - region.start + length]
        return None


def snapshot(pid: int, *, skip_file_backed_readonly: bool = False) -> Snapshot:
    """Read every readable mapping of `pid` (vvar and the like are skipped if unreadable)."""
    shot = Snapshot(pid)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for region in regions(pid):
            if region.perms[0] != "r" or region.path == "[vvar]":
                continue
            if skip_file_backed_readonly and not region.anonymous and "w" not in region.perms:
                continue
            try:
                data = _read_region(fd, region)
            except OSError:
                shot.unreadable.append(region)
                continue
            shot.chunks.append((region, data))
    finally:
        os.close(fd)
    return shot


def _read_region(fd: int, region: Region) -> bytes:
    parts = []
    address = region.start
    while address < region.end:
        chunk = os.pread(fd, min(region.end - address, 8 << 20), address)
        if not chunk:
            break
        parts.append(chunk)
        address += len(chunk)
    return b"".join(parts)


# -- canaries -----------------------------------------------------------------

RECORD = 32


@dataclass
class Canary:
    """`records` records of 32 bytes: marker (8) || index (u32 BE) || random (20)."""

    data: bytes
    marker: bytes

    @classmethod
    def make(cls, size: int = 64 * 1024) -> Canary:
        marker = os.urandom(8)
        records = [marker + struct.pack(">I", i) + os.urandom(RECORD - 12) for i in range(size // RECORD)]
        return cls(b"".join(records), marker)

    @property
    def records(self) -> int:
        return len(self.data) // RECORD

    def record(self, index: int) -> bytes:
        return self.data[index * RECORD : (index + 1) * RECORD]

    def record_hits(self, shot: Snapshot) -> list[tuple[int, Hit]]:
        """Every intact record in memory, as (record index, hit)."""
        found = []
        for hit in shot.find(self.marker):
            data = shot.read(hit.address, RECORD)
            if data is None:
                continue
            index = struct.unpack_from(">I", data, 8)[0]
            if index < self.records and data == self.record(index):
                found.append((index, hit))
        return found


@dataclass
class CanaryCount:
    full: list[Hit]
    records: list[tuple[int, Hit]]
    total_records: int

    @property
    def equivalents(self) -> float:
        return len(self.records) / self.total_records

    def split(self) -> tuple[CanaryCount, CanaryCount]:
        """(hits in libfuse receive buffers, hits anywhere else)."""
        inside = CanaryCount(
            [h for h in self.full if h.libfuse], [r for r in self.records if r[1].libfuse], self.total_records
        )
        outside = CanaryCount(
            [h for h in self.full if not h.libfuse], [r for r in self.records if not r[1].libfuse], self.total_records
        )
        return inside, outside

    def summary(self) -> str:
        return f"{len(self.full)} full / {self.equivalents:.2f} rec"


def count_canary(shot: Snapshot, canary: Canary) -> CanaryCount:
    return CanaryCount(shot.find(canary.data), canary.record_hits(shot), canary.records)


def count_key(shot: Snapshot, key: bytes) -> dict[str, int]:
    """Copies of a 32-byte key: whole, and 16-byte halves found without the other half."""
    full = shot.find(key)
    full_at = {h.address for h in full}
    lo = [h for h in shot.find(key[:16]) if h.address not in full_at]
    hi = [h for h in shot.find(key[16:]) if h.address - 16 not in full_at]
    return {"full": len(full), "lo16": len(lo), "hi16": len(hi)}


def drop_caches() -> None:
    """Flush dirty pages and drop the kernel's page, dentry and inode caches."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
