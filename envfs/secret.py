"""The only owner of key bytes, and the helpers that shred plaintext.

A `Secret` lives in anonymous mappings made for secrets only: locked in RAM
where the RLIMIT allows, excluded from core dumps, wiped in a forked child,
and zeroed by `wipe()`. Nothing here has a repr that shows contents.

`zero_bytes` overwrites an immutable `bytes` object in place. That is only
sound for a object nobody else can see: CPython shares the empty and 1-byte
objects process-wide, and a hashed object sits in dicts by its hash. Callers
pass only request payloads that pyfuse3 created for them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import threading
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mlockall.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

_MADV_DONTDUMP = 16
_MADV_WIPEONFORK = 18
_PR_SET_DUMPABLE = 4
_PR_SET_PDEATHSIG = 1
_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4

# memset called with the GIL held. ctypes.memset lets the GIL go, and taking
# it back can wait for any other thread that holds it: a stall of the request.
_memset = ctypes.PyDLL(None).memset
_memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_memset.restype = ctypes.c_void_p

# Layout of a CPython bytes object: header, ob_shash (-1 until hashed), ob_sval.
_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1
_BYTES_HASH_OFFSET = _BYTES_DATA_OFFSET - ctypes.sizeof(ctypes.c_ssize_t)


class _SlotArena:
    """Fixed-size slots for small secrets in locked, non-dumpable pages.

    Setting up a mapping of its own (mmap, mlock, two madvise, munmap) costs
    about 30 µs, more than deriving a key is worth spending on memory; keys
    are 32 or 64 bytes. So small secrets share pages set up once, a chunk at a
    time, and a freed slot is zeroed before it goes back on the free list.
    Chunks are never unmapped: at most as many slots exist as keys were alive
    at once.
    """

    SLOT = 64
    CHUNK = 16 * mmap.PAGESIZE

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[memoryview] = []
        self._chunks: list[mmap.mmap] = []

    def take(self) -> memoryview:
        with self._lock:
            if not self._free:
                chunk = _locked_mapping(self.CHUNK)
                self._chunks.append(chunk)
                whole = memoryview(chunk)
                self._free.extend(whole[i : i + self.SLOT] for i in range(self.CHUNK - self.SLOT, -1, -self.SLOT))
            return self._free.pop()

    def give_back(self, slot: memoryview) -> None:
        zero_buffer(slot)
        with self._lock:
            self._free.append(slot)


def _locked_mapping(length: int) -> mmap.mmap:
    """An anonymous mapping locked in RAM where the RLIMIT allows, left out of
    core dumps and wiped in a forked child."""
    mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    _libc.mlock(address, length)
    _libc.madvise(address, length, _MADV_DONTDUMP)
    _libc.madvise(address, length, _MADV_WIPEONFORK)
    return mapping


_arena = _SlotArena()


class Secret:
    """A fixed-size buffer of key material in locked, non-dumpable memory.

    Use `view` to let a library write into or read from it, then `wipe()`.
    Up to `_SlotArena.SLOT` bytes it is a slot in shared pages; larger
    secrets get a mapping of their own.
    """

    __slots__ = ("_slot", "_map", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._map: mmap.mmap | None = None
        if size <= _SlotArena.SLOT:
            self._slot: memoryview | None = _arena.take()
        else:
            self._map = _locked_mapping(-(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
            self._slot = memoryview(self._map)

    @property
    def view(self) -> memoryview:
        if self._slot is None:
            raise ValueError("secret already wiped")
        return self._slot[: self._size]

    def build(self, factory: Callable[[bytearray], T]) -> T:
        """Hand the key to a constructor that copies it (an AEAD, an HMAC).

        `cryptography` copies the key into OpenSSL contexts but keeps a
        reference to the buffer it was given; it gets a private copy that is
        zeroed at once, so this Secret can still be wiped and unmapped.
        """
        key_copy = bytearray(self.view)
        try:
            return factory(key_copy)
        finally:
            zero_buffer(key_copy)

    def __len__(self) -> int:
        return self._size

    def wipe(self) -> None:
        """Zero and release the memory; safe to call twice."""
        slot, self._slot = self._slot, None
        if slot is None:
            return
        mapping, self._map = self._map, None
        if mapping is None:
            _arena.give_back(slot)
            return
        zero_buffer(slot)
        slot.release()
        mapping.close()

    def __enter__(self) -> Secret:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __del__(self) -> None:
        self.wipe()

    def __repr__(self) -> str:
        state = "wiped" if self._slot is None else f"{self._size} bytes"
        return f"<Secret {state}>"


# Block-sized buffers are zeroed by copying from here: a slice assignment costs
# a third of the ctypes calls that larger buffers go through.
_ZEROS = memoryview(bytes(1 << 16))


def zero_buffer(buf: bytearray | memoryview) -> None:
    """Zero a writable buffer without allocating a same-size temporary."""
    view = memoryview(buf).cast("B")
    length = len(view)
    if length <= len(_ZEROS):
        view[:] = _ZEROS[:length]
    else:
        _memset(ctypes.addressof(ctypes.c_char.from_buffer(view)), 0, length)


class BufferPool:
    """Plaintext buffers for read replies: zeroed when given back, then reused.

    A fresh 1 MiB buffer per request costs a heap extension, a page fault per
    page and, with the daemon's malloc settings, two full overwrites; a
    reused one is also still in the CPU's cache. Buffers are `size` bytes;
    a larger request gets one of its own that is zeroed and dropped.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []

    def take(self, length: int) -> memoryview:
        """A zeroed buffer of `length` bytes."""
        if length > self.size:
            return memoryview(bytearray(length))
        buf = self._free.pop() if self._free else bytearray(self.size)
        return memoryview(buf)[:length]

    def give_back(self, view: memoryview) -> None:
        """Zero what `take` handed out and keep its buffer for the next request."""
        zero_buffer(view)
        buf = view.obj
        view.release()
        if isinstance(buf, bytearray) and len(buf) == self.size and len(self._free) < self._keep:
            self._free.append(buf)


def zero_bytes(data: bytes) -> None:
    """Overwrite the payload of a private `bytes` object in place.

    Objects of length 0 or 1 may be interpreter-wide singletons, and a hashed
    object may be a dict key: both are left alone, as is anything that is not
    exactly `bytes`.
    """
    if type(data) is not bytes or len(data) < 2:
        return
    if ctypes.c_ssize_t.from_address(id(data) + _BYTES_HASH_OFFSET).value != -1:
        return
    _memset(id(data) + _BYTES_DATA_OFFSET, 0, len(data))


def harden_process() -> None:
    """Refuse core dumps and ptrace attach by other same-uid processes, and keep
    the process out of swap where allowed.

    Locking all memory (which needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK) also
    covers what envfs cannot place itself: OpenSSL's key schedules of open
    files and plaintext in flight. Pages are locked as they are touched
    (MCL_ONFAULT), so nothing is populated in advance.
    """
    if _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
    if _libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) != 0:
        log.info(
            "mlockall failed (errno %d): key schedules of open files may reach swap; "
            "run without swap or with encrypted swap", ctypes.get_errno(),
        )  # fmt: skip


def die_with_parent(signal_number: int) -> None:
    """In a forked child: get `signal_number` when the parent thread exits."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal_number, 0, 0, 0)
