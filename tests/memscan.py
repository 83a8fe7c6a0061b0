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
last large write stays there (research §4). The buffer is recognised by its
malloc chunk, not by the request header in front of the payload: by the time
of a scan, later requests (GETATTR, FLUSH, RELEASE) have overwritten that
header. envfs cannot reach the buffer from Python; tests report such hits as
the known gap and fail on any other.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field

MALLOC_CHUNK_HEADER = 16
#: libfuse's receive buffer size: FUSE_MAX_MAX_PAGES (256) pages + FUSE_BUFFER_HEADER_SIZE (4 KiB).
LIBFUSE_BUFSIZE = 256 * 4096 + 4096
_IS_MMAPPED = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


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


@dataclass
class KeyCopy:
    hit: Hit  # at the address where the key's first byte would be
    matched: int  # how many of its bytes are there


@dataclass
class KeyCount:
    copies: list[KeyCopy]
    length: int

    @property
    def full(self) -> int:
        return sum(1 for c in self.copies if c.matched == self.length)

    @property
    def partial(self) -> int:
        return len(self.copies) - self.full

    def summary(self) -> str:
        text = f"{self.full} full"
        partial = [f"{c.matched}/{self.length} bytes" for c in self.copies if c.matched < self.length]
        if partial:
            text += f" + {len(partial)} partial ({', '.join(partial)})"
        return text


def count_key(shot: Snapshot, key: bytes, *, least: int = 16) -> KeyCount:
    """Copies of a key, whole or partial: at least `least` of its bytes in place.

    Freed heap chunks keep most of what they held: glibc overwrites only the
    first 16 bytes with list pointers, so a freed key is found as a partial
    copy. Every 8-byte piece of the key is searched for; the hits are grouped
    by the address where the key would start and the matching bytes counted.
    """
    starts: dict[int, Hit] = {}
    for offset in range(0, len(key) - 7, 8):
        for hit in shot.find(key[offset : offset + 8]):
            start = hit.address - offset
            if start not in starts:
                starts[start] = Hit(start, hit.region, hit.libfuse)
    copies = []
    for start, hit in sorted(starts.items()):
        data = shot.read(start, len(key))
        if data is None:  # the key would straddle a region boundary: count what is in this one
            lo = max(start, hit.region.start)
            data = bytes(lo - start) + (shot.read(lo, start + len(key) - lo) or b"")
        matched = sum(1 for a, b in zip(data, key, strict=False) if a == b)
        if matched >= least:
            copies.append(KeyCopy(hit, matched))
    return KeyCount(copies, len(key))


# -- HMAC-SHA256 keys: what a live HMAC context holds -----------------------------

_K = [
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
]  # fmt: skip
_IV = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & 0xFFFFFFFF


def sha256_midstate(block: bytes) -> list[int]:
    """The SHA-256 state after compressing one 64-byte block (FIPS 180-4)."""
    w = list(struct.unpack(">16I", block))
    for i in range(16, 64):
        s0 = _rotr(w[i - 15], 7) ^ _rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
        s1 = _rotr(w[i - 2], 17) ^ _rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
        w.append((w[i - 16] + s0 + w[i - 7] + s1) & 0xFFFFFFFF)
    a, b, c, d, e, f, g, h = _IV
    for i in range(64):
        t1 = (h + (_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)) + ((e & f) ^ (~e & g)) + _K[i] + w[i]) & 0xFFFFFFFF
        t2 = ((_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) & 0xFFFFFFFF
        a, b, c, d, e, f, g, h = (t1 + t2) & 0xFFFFFFFF, a, b, c, (d + t1) & 0xFFFFFFFF, e, f, g
    return [(x + y) & 0xFFFFFFFF for x, y in zip(_IV, [a, b, c, d, e, f, g, h], strict=True)]


def hmac_midstates(key: bytes) -> list[bytes]:
    """The inner and outer SHA-256 midstates of HMAC-SHA256 under `key` (at most 64 bytes),
    as OpenSSL keeps them in memory (SHA256_CTX.h: eight native little-endian words).

    A live HMAC context holds these instead of the key; they are as good as
    the key for computing MACs.
    """
    padded = key.ljust(64, b"\0")
    return [struct.pack("<8I", *sha256_midstate(bytes(b ^ pad for b in padded))) for pad in (0x36, 0x5C)]


def drop_caches(filesystem: str | os.PathLike[str] | None = None) -> None:
    """Drop the kernel's page cache (and dentries and inodes): `sync; echo 3 > drop_caches`.

    Only clean pages can be dropped. envfs mounts without a writeback cache,
    so its pages are clean once a write returns; `filesystem` (its
    mountpoint) is synced with syncfs(2) all the same, and not at all once it
    is unmounted. A global sync(2) would wait for every dirty page of every
    filesystem, which on a busy shared machine can take minutes, so it is
    done only when no filesystem is named.
    """
    if filesystem is None:
        os.sync()
    elif os.path.ismount(filesystem):
        fd = os.open(filesystem, os.O_RDONLY)
        try:
            _libc.syncfs(fd)
        finally:
            os.close(fd)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
