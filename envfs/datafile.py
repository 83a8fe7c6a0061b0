"""One file's data file: plaintext ranges in, authenticated slots out.

The plaintext size comes from the (MACed) metadata; this class is told it and
never trusts the data file's length for it. Its rules keep every state that a
crash between two system calls can leave readable:

- the data file is at least `min_data_length(size)` long (shorter: blocks
  are missing, reads of them fail with IntegrityError) and is cut back to at
  most `max_data_length(size)`;
- the last block is stored either exactly (n + 28 bytes) or as a full slot
  whose plaintext is zero beyond the file size; when growing, plaintext
  beyond the old size is always written as zeros, so leftovers never resurface.

Plaintext scratch buffers are zeroed after use; callers own and zero the
buffers they pass in.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from .blocks import (
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    SLOT_SIZE,
    BlockCipher,
    block_count,
    is_hole,
    max_data_length,
    min_data_length,
)
from .errors import IntegrityError
from .fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from .secret import zero_buffer


class _SlotBuffer:
    """The one buffer for the slots of a request, read or about to be written.

    A fresh buffer per request (up to 1 MiB) costs a heap extension, a page
    fault per page and, with the daemon's malloc settings, two overwrites;
    ciphertext needs no wiping, so all data files share one, grown on demand.
    Data files are used from one thread, and no view of it outlives a call.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def view(self, length: int) -> memoryview:
        if len(self._buf) < length:
            self._buf = bytearray(length)
        return memoryview(self._buf)[:length]


_slots = _SlotBuffer()

# Blocks re-encrypted per read and write by `copy_to` (1 MiB of plaintext).
_COPY_BLOCKS = 256


def _no_space() -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _zero_bytes_of(fd: int, start: int, length: int) -> None:
    """Zero a byte range of a file, giving its space back where the filesystem
    can punch holes, writing zeros where it cannot."""
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, length):
        return
    zeros = bytes(min(length, 1 << 20))
    while length:
        written = os.pwrite(fd, zeros[:length], start) or _no_space()
        start, length = start + written, length - written


def open_data_file(cipher: BlockCipher, open_fd: Callable[[], int], size: int) -> DataFile:
    """The data file `open_fd` opens, with `cipher`, for a plaintext of `size`
    bytes. The cipher is closed if the file cannot be opened; a missing file is
    an integrity error (a size above 0 promises one)."""
    try:
        fd = open_fd()
    except FileNotFoundError:
        cipher.close()
        raise IntegrityError(f"inode {cipher.inode_id}: data file missing") from None
    except BaseException:
        cipher.close()
        raise
    return DataFile(fd, cipher, size)


class DataFile:
    """An open data file and the cipher of its current key epoch."""

    def __init__(self, fd: int, cipher: BlockCipher, size: int) -> None:
        self.fd = fd
        self.cipher = cipher
        self.length = os.fstat(fd).st_size
        self._scratch = bytearray(BLOCK_SIZE)
        if self.length > max_data_length(size):
            try:
                self._set_length(max_data_length(size))
            except OSError as e:
                if e.errno not in (errno.EBADF, errno.EINVAL, errno.EROFS):
                    raise
                # Opened read-only: the bytes past the end stay, and are never read.
                self.length = max_data_length(size)

    @property
    def inode_id(self) -> int:
        return self.cipher.inode_id

    def close(self) -> None:
        self.cipher.close()
        zero_buffer(self._scratch)
        os.close(self.fd)

    def _set_length(self, length: int) -> None:
        os.ftruncate(self.fd, length)
        self.length = length

    # -- reading -----------------------------------------------------------

    def read_into(self, offset: int, out: memoryview, size: int) -> int:
        """Read plaintext [offset, offset+len(out)) clipped to `size`; return bytes read."""
        end = min(offset + len(out), size)
        if offset >= end:
            return 0
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        start = first * SLOT_SIZE
        ciphertext = _slots.view(max(0, min((last + 1) * SLOT_SIZE, self.length) - start))
        ciphertext = ciphertext[: os.preadv(self.fd, [ciphertext], start)]
        # Blocks wanted whole (4096 bytes long, or the file's last block read
        # to its end and stored exactly as long as it is): authenticated and
        # decrypted in one pass straight into `out`.
        run_start = first if offset == first * BLOCK_SIZE else first + 1
        last_stored_exactly = len(ciphertext) == (last - first) * SLOT_SIZE + end - last * BLOCK_SIZE + BLOCK_OVERHEAD
        run_stop = last + 1 if end == (last + 1) * BLOCK_SIZE or (end == size and last_stored_exactly) else last
        run_start = min(run_start, run_stop)
        pos = 0
        try:
            for index in range(first, run_start):
                pos += self._read_part(index, offset, end, size, ciphertext[(index - first) * SLOT_SIZE :], out[pos:])
            if run_stop > run_start:
                slots = ciphertext[(run_start - first) * SLOT_SIZE : (run_stop - first) * SLOT_SIZE]
                count = min(run_stop * BLOCK_SIZE, end) - run_start * BLOCK_SIZE
                if len(slots) < count + (run_stop - run_start) * BLOCK_OVERHEAD:
                    index = run_start + len(slots) // SLOT_SIZE
                    self._check_slot(index, slots[(index - run_start) * SLOT_SIZE :], BLOCK_SIZE)
                pos += self.cipher.decrypt_blocks_into(run_start, slots, out[pos : pos + count])
            for index in range(run_stop, last + 1):
                pos += self._read_part(index, offset, end, size, ciphertext[(index - first) * SLOT_SIZE :], out[pos:])
        finally:
            zero_buffer(self._scratch)
        return pos

    def _read_part(self, index: int, offset: int, end: int, size: int, slot: memoryview, out: memoryview) -> int:
        """Put the wanted part of block `index` (its slot starts `slot`) at the
        start of `out`; return its length."""
        slot = slot[:SLOT_SIZE]
        n = min(BLOCK_SIZE, size - index * BLOCK_SIZE)
        lo = max(offset, index * BLOCK_SIZE) - index * BLOCK_SIZE
        hi = min(end, index * BLOCK_SIZE + n) - index * BLOCK_SIZE
        self._check_slot(index, slot, n)
        if is_hole(slot):
            out[: hi - lo] = bytes(hi - lo)
        elif lo == 0 and hi - lo >= len(slot) - BLOCK_OVERHEAD:
            # The whole block goes to the caller: decrypt in place there.
            self.cipher.decrypt_into(index, slot, out[: len(slot) - BLOCK_OVERHEAD])
        else:
            scratch = memoryview(self._scratch)
            got = self.cipher.decrypt_into(index, slot, scratch)
            if got < n:
                raise IntegrityError(f"inode {self.inode_id} block {index}: {got} bytes, expected {n}")
            out[: hi - lo] = scratch[lo:hi]
        return hi - lo

    def _slot(self, index: int) -> memoryview:
        """The stored bytes of block `index` (shorter or empty if the file ends early)."""
        start = index * SLOT_SIZE
        return memoryview(os.pread(self.fd, max(0, min(start + SLOT_SIZE, self.length) - start), start))

    def _check_slot(self, index: int, slot: memoryview, n: int) -> None:
        if len(slot) < n + BLOCK_OVERHEAD:
            raise IntegrityError(
                f"inode {self.inode_id} block {index}: data file cut short ({len(slot)} of {n + BLOCK_OVERHEAD} bytes)"
            )

    def _read_block(self, index: int, size: int, into: memoryview) -> None:
        """Plaintext of one existing block into `into` (4096 bytes), zero beyond `size`."""
        n = min(BLOCK_SIZE, size - index * BLOCK_SIZE)
        zero_buffer(into)
        if n <= 0:
            return
        slot = self._slot(index)
        self._check_slot(index, slot, n)
        if is_hole(slot):
            return
        got = self.cipher.decrypt_into(index, slot, into)
        if got < n:
            raise IntegrityError(f"inode {self.inode_id} block {index}: {got} bytes, expected {n}")
        zero_buffer(into[n:])

    # -- writing -----------------------------------------------------------

    def write(self, offset: int, data: memoryview, size: int) -> tuple[int, int]:
        """Write `data` at `offset` of a file of `size` bytes.

        Returns (new size, number of blocks encrypted).
        """
        if not len(data):
            return size, 0
        end = offset + len(data)
        new_size = max(size, end)
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        writes = 0
        # A partial last block that ends up before the written range grows to a full block.
        old_last = (size - 1) // BLOCK_SIZE if size else -1
        if size % BLOCK_SIZE and old_last < first:
            writes += self._pad_block(old_last, size)
        out_view = _slots.view((last - first + 1) * SLOT_SIZE)
        # The blocks the data covers whole are encrypted straight from it in one
        # pass; only a first and a last block that it covers in part are read,
        # patched and encrypted on their own.
        run_start = first if self._whole(first, offset, end, new_size) else first + 1
        run_stop = last + 1 if self._whole(last, offset, end, new_size) else last
        length = 0
        try:
            if run_start > first:
                length = self._patch_block(first, first, offset, data, size, new_size, out_view)
            if run_stop > run_start:
                at = (run_start - first) * SLOT_SIZE
                run = data[run_start * BLOCK_SIZE - offset : run_stop * BLOCK_SIZE - offset]
                length = at + self.cipher.encrypt_blocks_into(run_start, run, out_view[at:])
            if run_stop <= last and last > first:
                length = self._patch_block(last, first, offset, data, size, new_size, out_view)
        finally:
            zero_buffer(self._scratch)
        writes += last - first + 1
        self._store(out_view[:length], first * SLOT_SIZE)
        return new_size, writes

    def zero_range(self, offset: int, end: int, size: int) -> int:
        """Make plaintext [offset, end) of a file of `size` bytes read as zeros;
        return the number of blocks encrypted.

        Blocks the range covers whole become holes (all-zero slots, FORMAT.md
        4.5), so their backing space can be given back; a block it covers in
        part is rewritten with zeros in that part. The last block counts as
        covered whole when the range reaches the end of the file.
        """
        end = min(end, size)
        if offset >= end:
            return 0
        first_whole = -(-offset // BLOCK_SIZE)
        stop_whole = block_count(size) if end == size else end // BLOCK_SIZE
        writes = 0
        if first_whole > stop_whole:  # inside one block
            return self.write(offset, memoryview(bytes(end - offset)), size)[1]
        if offset < first_whole * BLOCK_SIZE:
            writes += self.write(offset, memoryview(bytes(first_whole * BLOCK_SIZE - offset)), size)[1]
        if stop_whole * BLOCK_SIZE < end:
            writes += self.write(stop_whole * BLOCK_SIZE, memoryview(bytes(end - stop_whole * BLOCK_SIZE)), size)[1]
        start, stop = first_whole * SLOT_SIZE, min(stop_whole * SLOT_SIZE, self.length)
        if stop > start:
            _zero_bytes_of(self.fd, start, stop - start)
        return writes

    def _store(self, slots: memoryview, start: int) -> None:
        """Write `slots` at `start`, all of them or raise (ENOSPC: the disk is full).

        Where the write replaces stored bytes, it gets its backing space first:
        a disk that fills up then fails the write before any byte of a block
        that was there is overwritten (a block half old, half new would fail
        authentication for good). What a write past the end wrote before it
        failed is cut off again: no size on record covers it, but a later
        growth of the file (a truncate, a write further on) would read it as
        data where there must be holes.
        """
        if start < self.length:
            fallocate(self.fd, FALLOC_FL_KEEP_SIZE, start, len(slots))  # where unsupported, no better way
        written = 0
        try:
            while written < len(slots):
                written += os.pwrite(self.fd, slots[written:], start + written) or _no_space()
        except BaseException:
            if start + written > self.length:
                self._set_length(self.length)
            raise
        self.length = max(self.length, start + written)

    def reserve(self, offset: int, end: int) -> None:
        """Give the slots of plaintext [offset, end) backing space, past the end
        of the file too (fallocate's FALLOC_FL_KEEP_SIZE), so that writing them
        later cannot fail for lack of it; the data file's length stays.
        Where the backing filesystem cannot keep the size, only the slots
        inside the data file get space."""
        start = offset // BLOCK_SIZE * SLOT_SIZE
        stop = -(-end // BLOCK_SIZE) * SLOT_SIZE
        if stop <= start or fallocate(self.fd, FALLOC_FL_KEEP_SIZE, start, stop - start):
            return
        stop = min(stop, self.length)
        if stop > start:
            os.posix_fallocate(self.fd, start, stop - start)

    def seek_data(self, offset: int, size: int) -> int | None:
        """The first plaintext offset at or after `offset` in a block that is not a
        hole, None if there is none before `size`.

        The backing filesystem's holes say where blocks are holes. Its pages
        and the slots do not line up, so the slot where its data starts is
        read: all zeros, it is a hole whose page a neighbour's data shares.
        A block stored as zeros (where holes cannot be punched) counts as
        data, as lseek(2) allows.
        """
        index = offset // BLOCK_SIZE
        while True:
            try:
                found = os.lseek(self.fd, index * SLOT_SIZE, os.SEEK_DATA) // SLOT_SIZE
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but holes after it
                    return None
                raise
            if found * BLOCK_SIZE >= size:
                return None
            if not is_hole(self._slot(found)):
                return max(offset, found * BLOCK_SIZE)
            index = found + 1

    def seek_hole(self, offset: int, size: int) -> int:
        """The first plaintext offset at or after `offset` in a block that is a hole
        (its slot, where a hole of the backing filesystem starts or lies, holds
        only zeros), or `size`: every file ends in a hole. A lone hole block
        between two data blocks has no backing hole of its own (both pages of
        its slot hold data too) and counts as data, as lseek(2) allows."""
        index = offset // BLOCK_SIZE
        while index * BLOCK_SIZE < size:
            if index * SLOT_SIZE >= self.length:  # past the data file: holes to the end
                return max(offset, index * BLOCK_SIZE)
            try:
                hole = os.lseek(self.fd, index * SLOT_SIZE, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return size
                raise
            index = max(index, hole // SLOT_SIZE)  # the slot in which the hole starts
            if index * BLOCK_SIZE >= size:
                break
            if is_hole(self._slot(index)):
                return max(offset, index * BLOCK_SIZE)
            index += 1
        return size

    def _whole(self, index: int, offset: int, end: int, new_size: int) -> bool:
        """Whether the write covers block `index` whole, as it is to be stored."""
        block_start = index * BLOCK_SIZE
        n = min(BLOCK_SIZE, new_size - block_start)
        return offset <= block_start and end >= block_start + n and self._stored_length(index, n) == n

    def _patch_block(
        self, index: int, first: int, offset: int, data: memoryview, size: int, new_size: int, out: memoryview
    ) -> int:
        """Encrypt block `index` as its old plaintext with the written part put in;
        into its slot of `out` (which starts at block `first`). Returns the slot's end."""
        block_start = index * BLOCK_SIZE
        lo = max(offset, block_start) - block_start
        hi = min(offset + len(data), block_start + BLOCK_SIZE) - block_start
        stored = self._stored_length(index, min(BLOCK_SIZE, new_size - block_start))
        scratch = memoryview(self._scratch)
        self._read_block(index, size, scratch)
        scratch[lo:hi] = data[block_start + lo - offset : block_start + hi - offset]
        at = (index - first) * SLOT_SIZE
        return at + self.cipher.encrypt_into(index, scratch[:stored], out[at:])

    def _stored_length(self, index: int, n: int) -> int:
        """How much plaintext to store for block `index` holding `n` bytes.

        Exactly `n` when that slot would end the data file; a full block
        (zero-padded) when stale bytes of a longer slot follow it.
        """
        if n >= BLOCK_SIZE or index * SLOT_SIZE + n + BLOCK_OVERHEAD >= self.length:
            return n
        return BLOCK_SIZE

    def _pad_block(self, index: int, size: int) -> int:
        """Rewrite block `index` as a full block, zero beyond `size`."""
        scratch = memoryview(self._scratch)
        start = index * SLOT_SIZE
        try:
            if is_hole(self._slot(index)):
                if self.length < start + SLOT_SIZE:
                    self._set_length(start + SLOT_SIZE)
                return 0
            self._read_block(index, size, scratch)
            out = bytearray(SLOT_SIZE)
            self.cipher.encrypt_into(index, scratch, memoryview(out))
        finally:
            zero_buffer(self._scratch)
        self._store(memoryview(out), start)
        return 1

    def truncate(self, size: int, new_size: int) -> int:
        """Change the plaintext size; return the number of blocks encrypted.

        Growing: call before the metadata records the new size. Shrinking:
        call after it does, so every intermediate state stays readable.
        """
        writes = 0
        if new_size > size:
            if size % BLOCK_SIZE:
                writes += self._pad_block((size - 1) // BLOCK_SIZE, size)
            if self.length < min_data_length(new_size):
                self._set_length(min_data_length(new_size))
            return writes
        if new_size % BLOCK_SIZE:
            index = new_size // BLOCK_SIZE
            slot = self._slot(index)
            if len(slot) and not is_hole(slot):
                writes += self._rewrite_tail(index, new_size)
        self._set_length(min(self.length, max_data_length(new_size)))
        return writes

    def _rewrite_tail(self, index: int, new_size: int) -> int:
        """Zero the plaintext of block `index` beyond `new_size`, stored as a full slot."""
        scratch = memoryview(self._scratch)
        try:
            self._read_block(index, new_size, scratch)
            out = bytearray(SLOT_SIZE)
            self.cipher.encrypt_into(index, scratch, memoryview(out))
        finally:
            zero_buffer(self._scratch)
        self._store(memoryview(out), index * SLOT_SIZE)
        return 1

    def copy_to(self, other: DataFile, size: int) -> int:
        """Re-encrypt every non-hole block under `other`'s cipher (re-key,
        rotation), durably (`other` is fsynced); return the blocks encrypted.
        Works through runs of up to _COPY_BLOCKS blocks: one read, AES-GCM of
        the run in C, one write."""
        count = block_count(size)
        run = min(count, _COPY_BLOCKS)  # buffers no larger than the file: most files are small
        slots, plain, out = bytearray(run * SLOT_SIZE), bytearray(run * BLOCK_SIZE), bytearray(run * SLOT_SIZE)
        writes = 0
        index = 0
        try:
            while index < count:
                # The backing file's holes are skipped: a sparse terabyte is not read.
                following = self.seek_data(index * BLOCK_SIZE, size)
                if following is None:
                    # Holes to the end: the data file must still reach the last block.
                    last = count - 1
                    self._check_slot(last, self._slot(last), size - last * BLOCK_SIZE)
                    break
                index = following // BLOCK_SIZE
                stop = min(count, index + run)
                start = index * SLOT_SIZE
                view = memoryview(slots)[: max(0, min(stop * SLOT_SIZE, self.length) - start)]
                view = view[: os.preadv(self.fd, [view], start)]
                writes += self._copy_run(other, index, stop, size, view, memoryview(plain), memoryview(out))
                index = stop
        finally:
            zero_buffer(plain)
        other._set_length(min_data_length(size))
        os.fsync(other.fd)
        return writes

    def _copy_run(
        self, other: DataFile, first: int, stop: int, size: int, slots: memoryview, plain: memoryview, out: memoryview
    ) -> int:
        """Re-encrypt the non-hole blocks among [first, stop), read into `slots`."""
        writes = 0
        run = first  # the first block of the current run of non-hole blocks
        for index in range(first, stop + 1):
            if index < stop:
                n = min(BLOCK_SIZE, size - index * BLOCK_SIZE)
                slot = slots[(index - first) * SLOT_SIZE : (index - first + 1) * SLOT_SIZE]
                self._check_slot(index, slot, n)
                if not is_hole(slot):
                    continue
            if run < index:  # blocks [run, index) hold data
                length = min(index * BLOCK_SIZE, size) - run * BLOCK_SIZE
                part = plain[: (index - run) * BLOCK_SIZE]
                got = self.cipher.decrypt_blocks_into(
                    run, slots[(run - first) * SLOT_SIZE : (index - first) * SLOT_SIZE], part
                )
                if got < length:
                    raise IntegrityError(f"inode {self.inode_id} block {index - 1}: {length - got} bytes short")
                sealed = other.cipher.encrypt_blocks_into(run, part[:length], out)
                other._store(out[:sealed], run * SLOT_SIZE)
                writes += index - run
            run = index + 1
        return writes
