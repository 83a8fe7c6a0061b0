"""FUSE operations: the glue between pyfuse3 requests and the store.

This module never sees key bytes: it gets a `KeyRing` that hands out ciphers.
Every handler runs to completion without awaiting, so handlers never
interleave and need no locks (trio runs one task at a time).

Every error a handler meets becomes an errno: integrity failures are EIO
with a log line naming the inode (and block); anything unexpected is logged
with its traceback and answered with EIO. No request can end the mount.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import sqlite3
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from .blocks import BLOCK_SIZE, MAX_FILE_SIZE, SLOT_SIZE, BlockCipher
from .datafile import DataFile, open_data_file
from .errors import CorruptStore, EnvfsError, IntegrityError
from .fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from .keys import PREFETCH_DEPTH, KeyRing
from .metadata import ROOT_INODE, Dentry, Inode, Metadata, NextFile, WalkPosition, inode_values, restore_inode
from .names import NAME_MAX, NameCipher
from .secret import BufferPool, zero_bytes
from .store import RESERVE_BYTES, Store

log = logging.getLogger(__name__)

SYMLINK_MAX = 4095  # PATH_MAX - 1, as the kernel allows
# renameat2's flag for a whiteout at the old name (linux/fs.h; pyfuse3 lacks it).
RENAME_WHITEOUT = 1 << 2
# Every change reaches the store through this mount's kernel, which updates or
# drops what it cached as it forwards the change (the store is locked to one
# daemon), so the kernel may keep names and attributes as long as it likes;
# the timeouts only bound how long a stale entry could live if that ever failed.
ATTR_TIMEOUT = 60.0
ENTRY_TIMEOUT = 60.0
_RELATIME_WINDOW_NS = 24 * 3600 * 10**9
# Below this much free space on the backing filesystem, every request commits.
LOW_SPACE_BYTES = 4 * RESERVE_BYTES
# Data files may not take the backing filesystem's last this many bytes: the
# metadata must always have room to record what was acknowledged, and unlink
# room to free space.
METADATA_ROOM = RESERVE_BYTES
_XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# Inodes the kernel has forgotten, and the names it looked up or made, stay
# cached for its next lookup of them (after it dropped its caches, or an entry
# timed out), up to this many of each: such a lookup then needs no query or MAC.
LOOKUP_CACHE_SIZE = 16384
# A key derived ahead (of a create, of an open in listing order) is wiped when
# unused for this long: an idle mount holds no key of a file nobody opened.
PREFETCH_MAX_AGE = 5.0
# Up to this many inodes with xattrs, the daemon keeps their ids in memory.
XATTR_INODES_IN_MEMORY = 65536
# Failures the user caused (a full disk, a file too large, a read-only store) are
# logged at most this often.
USAGE_WARNING_SECONDS = 10.0
# Directory entries fetched per query by readdir.
_READDIR_BATCH = 256
# The largest read the kernel sends (FUSE's limit of 256 pages).
READ_BUFFER_SIZE = 1 << 20

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handler(method: F | None = None, *, frees_space: bool = False, reads: bool = False) -> Any:
    """Map every exception of a request handler to an errno reply.

    A request that ran out of space while deleted files' data files wait for
    the group commit is retried once after that commit. With `frees_space`, a
    request that ran out of space (SQLite needs room even to delete a row) is
    retried once after the store's space reserve is given up: a full disk must
    not stop the user from freeing space. A handler therefore leaves its
    arguments as it found them (`write` wipes its buffer around the retries,
    not inside them). With `reads`, the request changes
    nothing but access times, which are let go where they cannot be written:
    a commit that fails after it (a disk full to its last byte, where SQLite
    finds no room for its log) is logged, with the changes it loses, and is
    not the request's error.
    """

    def decorate(method: F) -> F:
        request = method.__name__.lstrip("_")  # `_write` serves `write`

        @functools.wraps(method)
        async def wrapper(self: Operations, *args: Any) -> Any:
            committed = released = False  # each remedy for a lack of space is tried once
            while True:
                try:
                    result = await method(self, *args)
                    self._defer_saves()
                    if self._low_space or self.md.commit_due():
                        if reads:
                            self.commit_if_due(now=True)
                        else:
                            self.commit()
                    return result
                except FUSEError:
                    raise
                except Exception as e:
                    code = self.failed(request, e)
                    if code == errno.ENOSPC and not committed and self.md.actions_waiting():
                        # The data files of deleted inodes go at the next commit:
                        # they may be the room this request needs.
                        committed = True
                        self.commit_if_due(now=True)
                        continue
                    if code == errno.ENOSPC and frees_space and not released and self.store.release_reserve():
                        released = True
                        log.warning("%s: out of space; released the store's reserve and retrying", request)
                        continue
                    if code in (errno.ENOSPC, errno.EDQUOT):
                        # What earlier requests were told is done must not wait for a
                        # timer commit that may find even less room.
                        self.commit_if_due(now=True)
                    raise FUSEError(code) from None

        return wrapper  # type: ignore[return-value]

    return decorate if method is None else decorate(method)


@dataclass
class OpenFile:
    """Per-inode state while at least one handle is open."""

    data: DataFile
    handles: int = 0


class Caller(Protocol):
    """Who asks for a change: a request's context, or a handle's opener."""

    uid: int
    gid: int
    pid: int


@dataclass
class Handle:
    inode: int
    # Who opened it: writes through the handle count as that process's where
    # they clear set-user-ID and set-group-ID (`_clear_setid`).
    uid: int = 0
    gid: int = 0
    pid: int = 0


class Listing(NamedTuple):
    """A directory listing under way, for the check of its entry set digest
    at the end: the readdir offset it reached, and the XOR of the elements
    of the entries it listed."""

    offset: int
    digest: int


def _now() -> int:
    return time.time_ns()


def _check_xattr_namespace(name: bytes) -> None:
    """EOPNOTSUPP for a name outside the namespaces envfs keeps, for get, set
    and remove alike, as ext4 mounted without ACLs answers for
    system.posix_acl_*: coreutils then stops asking for the device (ls -l
    asks for the ACL of every entry otherwise). EINVAL for a bare prefix
    ("user."), as the kernel answers for local filesystems."""
    if not name.startswith(_XATTR_NAMESPACES):
        raise FUSEError(errno.EOPNOTSUPP)
    if name in _XATTR_NAMESPACES:
        raise FUSEError(errno.EINVAL)


def _clamp_time(ns: int) -> int:
    """A time stamp as envfs stores it: signed 64-bit nanoseconds (years 1677 to 2262).
    Times beyond are clamped, as ext4 clamps to the range it can store."""
    return min(max(ns, -(2**63)), 2**63 - 1)


def _in_group(pid: int, gid: int, group: int) -> bool:
    """Whether the process `pid`, of primary group `gid`, is a member of `group`
    (its supplementary groups, from /proc; gone or unreadable: not a member)."""
    if gid == group:
        return True
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Groups:"):
                    return str(group).encode() in line.split()[1:]
    except OSError:
        pass
    return False


def _mode_after_data_change(mode: int, uid: int, gid: int, pid: int, group: int) -> int:
    """The mode of a file after a process (`uid`, `gid`, `pid`) changed its data,
    as Linux has it for a process without CAP_FSETID: set-user-ID goes, and
    set-group-ID too where group-execute is set (else it marks mandatory
    locking) or where the process is not in the file's group (`group`)."""
    if uid == 0 or not mode & (stat.S_ISUID | stat.S_ISGID):
        return mode
    mode &= ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not _in_group(pid, gid, group)):
        mode &= ~stat.S_ISGID
    return mode


def _sets_nothing(fields: pyfuse3.SetattrFields) -> bool:
    return not (
        fields.update_atime or fields.update_mtime or fields.update_ctime or fields.update_mode
        or fields.update_uid or fields.update_gid or fields.update_size
    )  # fmt: skip


def _mode_after_chown(mode: int, uid: int, gid: int, pid: int, group: int) -> int:
    """The mode of a file other than a directory after a process (`uid`, `gid`,
    `pid`) changed its owner or group, as Linux has it: as after a data
    change, but set-user-ID goes whoever asks, and root keeps set-group-ID
    only where group-execute is not set."""
    if uid != 0:
        return _mode_after_data_change(mode, uid, gid, pid, group)
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


class ThrottledWarning:
    """A warning logged at most once per `interval` seconds, with the count of
    those held back: a program that goes on writing to a full disk gets its
    ENOSPC every time, and the log a line now and then."""

    def __init__(self, interval: float, logger: logging.Logger = log) -> None:
        self.interval = interval
        self._logger = logger
        self._last = -interval
        self._held = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held += 1
            return
        if self._held:
            message += " (and %d more such failures since the last warning)"
            args = (*args, self._held)
        self._logger.warning(message, *args)
        self._last, self._held = now, 0


def _negative_entry() -> pyfuse3.EntryAttributes:
    """A lookup reply for a missing name: the kernel caches the absence (inode 0)."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = 0
    attrs.entry_timeout = ENTRY_TIMEOUT
    return attrs


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    # Without the kernel's writeback cache a write's error (ENOSPC, EFBIG, EIO)
    # is that write's: with it, write() succeeds into the page cache and a full
    # disk shows only at close or fsync, as EIO, after the data is gone.
    enable_writeback_cache = False
    # The daemon clears set-user-ID and set-group-ID after data changes and
    # chowns (`_clear_setid`), so the kernel need not ask for a file's
    # attributes before each chown, nor for its security.capability before
    # every write (pyfuse3 patch 7): a ninth of an untar's requests.
    handle_killpriv_v2 = True

    def __init__(
        self,
        store: Store,
        metadata: Metadata,
        keys: KeyRing,
        names: NameCipher,
        *,
        rekey_after: int,
        wake_after_reply: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.md = metadata
        self.keys = keys
        self.names = names
        self.rekey_after = rekey_after
        # A file holds at most half a key's budget of blocks, so that a re-key
        # (which encrypts every block) leaves room for the writes after it, and
        # no more than a data file can hold (FORMAT.md, sections 4.4 and 6).
        self.max_file_size = min(MAX_FILE_SIZE, rekey_after // 2 * BLOCK_SIZE)
        # Read buffers whose replies go out after their handler returns; they
        # are zeroed and reused in `replies_sent`. `wake_after_reply` tells the
        # daemon that some wait, for when no next request comes to do it.
        self._replied_buffers: list[memoryview] = []
        self._wake_after_reply = wake_after_reply or (lambda: None)
        self._read_buffers = BufferPool(READ_BUFFER_SIZE, keep=2)
        self._inodes: dict[int, Inode] = {}
        # Cached inodes nothing held when last let go (`_release_cache`), oldest
        # first; a listing may have handed one out again since (`_evict` checks).
        self._forgotten: dict[int, None] = {}
        # Names looked up or made, by directory: encrypted name -> inode id;
        # a directory's go with any change of its entries but an addition
        # (`_touch_dir`).
        self._names: dict[int, dict[bytes, int]] = {}
        self._names_count = 0
        # Directories whose every name is in `_names`: made by this mount and
        # changed since only by additions and removals. A name not there is
        # not in the directory (the lookups before each create of an untar).
        self._complete_dirs: set[int] = set()
        # Cached inodes' st_blocks, with the (ctime, key epoch) it is for.
        self._st_blocks: dict[int, tuple[tuple[int, int], int]] = {}
        # The kernel asks for security.capability before a file's first write
        # and each chown, ls -l for security.selinux: both sets answer most of
        # these without a query.
        # Every inode that has xattrs (a superset, never shrunk), if there are
        # few enough of them to keep in memory; else None.
        self._xattr_inodes = metadata.inodes_with_xattrs(XATTR_INODES_IN_MEMORY)
        # Inodes known to have none, learned one by one.
        self._without_xattrs: set[int] = set()
        # Where the last complete listing of a directory ended (a readdir
        # offset), until its entries change: the kernel's call for more after
        # the last entry is answered without a query.
        self._listing_ends: dict[int, int] = {}
        # The listings under way, by directory: one that reads every entry
        # while the directory does not change checks its entry set digest
        # (a change drops the directory's listing).
        self._listings: dict[int, Listing] = {}
        # The parent of each cached directory, as its listing or lookup found
        # it: a walk then answers '..' without a query. Renames and removals
        # drop the directory's entry.
        self._dir_parents: dict[int, int] = {}
        # Cached inodes whose atime a read changed since their last save: written
        # with the inode's next save or the next group commit (`_save_atimes`).
        self._unsaved_atimes: set[int] = set()
        # Inode changes are written at the next group commit, so that tar's
        # chown, chmod and utimens of a file and its writes, or a directory's
        # touch per entry added, become one row write. `_deferred` holds each
        # inode's values as the last request that changed it left them;
        # `_request_saves` the inodes the request being served saved, and
        # `_transaction_saves` those saved inside its open transaction, which
        # count only if that transaction does.
        self._deferred: dict[int, tuple[int, ...]] = {}
        self._request_saves: dict[int, Inode] = {}
        self._transaction_saves: dict[int, Inode] | None = None
        self._lookups: dict[int, int] = {}
        self._open: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._low_space = False
        # How much data files may still grow before free space is looked up again.
        self._room = 0
        # The next file `create` makes, allocated by the create before it: its
        # key is being prefetched, and `idle` makes its data file and cipher.
        self._next_file: FileAhead | None = None
        # The files whose keys first opens prefetched and no first open has
        # reached yet, in walk order; where the walk that guessed them stands;
        # and how many first opens in a row missed the guesses.
        self._guessed: list[int] = []
        self._guessed_at: WalkPosition = ()
        self._guess_misses = 0
        self.rekeys = 0
        self.data_opens = 0
        # Creates that found their data file, or their cipher, made by `idle`.
        self.creates_with_data_file_ahead = 0
        self.creates_with_cipher_ahead = 0
        self.cached_lookups = 0
        self.integrity_errors = 0
        self._usage_warnings = ThrottledWarning(USAGE_WARNING_SECONDS)
        self._kernel_attached = False  # serving a mount's kernel (`init`), not called in-process

    def init(self) -> None:
        self._kernel_attached = True

    def failed(self, operation: str, error: Exception) -> int:
        """Log a handler's error and return the errno to answer with."""
        # The request may have changed cached inodes and then failed: put them
        # back as the requests before it left them; or, where SQLite rolled the
        # whole group back (a full disk), forget what the group deferred too.
        if self.md.group_rolled_back():
            self._drop_caches()
        else:
            self._undo_request()
        if isinstance(error, IntegrityError):
            self.integrity_errors += 1
            log.error("integrity: %s", error)
            return errno.EIO
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                self._low_space = True  # commit per request until a commit finds room again
            self._usage_warnings.warn("%s: %s", operation, error)
            return error.errno
        if isinstance(error, sqlite3.DatabaseError) and "full" in str(error):
            self._low_space = True
            self._usage_warnings.warn("%s: metadata database: %s", operation, error)
            return errno.ENOSPC
        if isinstance(error, OSError | sqlite3.Error | EnvfsError):
            log.error("%s: %s", operation, error)
        else:
            log.exception("%s: unexpected error", operation)
        return errno.EIO

    def commit(self) -> None:
        """Commit the metadata changes of the requests so far.

        A commit that fails loses its whole group of changes (SQLite rolls it
        back), so it must not run out of space: when the disk is nearly full
        the space reserve is given up first, and from then on every request
        commits its own changes, so that a failure is that request's error.
        """
        free = self.store.free_bytes()
        self._low_space = free < LOW_SPACE_BYTES
        if free < RESERVE_BYTES:
            self.store.release_reserve()
        try:
            self._write_deferred()
            self._save_atimes()
            self.md.commit()
        except BaseException:
            # The caches go, and the group with them where it is still open
            # (a row that could not be written): the database must not keep
            # entry rows whose directories' digests and link counts are gone.
            self.md.abandon_group()
            self._drop_caches()
            raise

    def _write_deferred(self) -> None:
        """Write the deferred inode changes, and those of the request being
        served (a commit in the middle of a request must include them: a
        shrink commits the new size before it cuts the data file); where the
        request saved an inode, its object is newer than the deferred values."""
        if not self._deferred and not self._request_saves:
            return
        for inode_id, values in self._deferred.items():
            if inode_id not in self._request_saves:
                self.md.save_values(values)
        for inode in self._request_saves.values():
            self.md.save_inode(inode)
        self._deferred.clear()
        self._request_saves.clear()

    @contextlib.contextmanager
    def _transaction(self, *, one_statement: bool = False) -> Iterator[None]:
        """`md.transaction()` for rows that change together, whose inode saves
        are deferred once it commits: a rolled-back transaction's changes to
        cached inodes are undone with the request's failure. `one_statement`:
        one row statement and deferred saves, which a nearly full disk writes
        at once (`_save`): several statements then."""
        one_statement = one_statement and not self._low_space
        if self._transaction_saves is not None:
            with self.md.transaction(one_statement=one_statement):
                yield
            return
        saves: dict[int, Inode] = {}
        self._transaction_saves = saves
        try:
            with self.md.transaction(one_statement=one_statement):
                yield
        finally:
            self._transaction_saves = None
        # Its rows stay in the group whatever the rest of the request does (a
        # failure after the transaction, in the reply's preparation): its
        # inode changes count from here, as a finished request's do, so that
        # a later failure undoes only what came after, and a directory's
        # digest stays in step with its entry rows.
        for inode_id, inode in saves.items():
            self._deferred[inode_id] = inode_values(inode)
            self._request_saves.pop(inode_id, None)

    def _defer_saves(self) -> None:
        """After a request succeeded: what it saved without writing is deferred,
        with the values the request left."""
        if not self._request_saves:
            return
        for inode_id, inode in self._request_saves.items():
            self._deferred[inode_id] = inode_values(inode)
        self._request_saves.clear()

    def _undo_request(self) -> None:
        """After a request failed: cached inodes go back to their deferred
        values, or are forgotten (the database holds them), and the caches
        derived from rows are dropped. The database's own changes of the
        request were rolled back with its transaction, if it had one."""
        self._request_saves.clear()
        self._forgotten.clear()
        self._names.clear()
        self._names_count = 0
        self._complete_dirs.clear()
        self._st_blocks.clear()
        for inode_id, inode in list(self._inodes.items()):
            values = self._deferred.get(inode_id)
            if values is None:
                del self._inodes[inode_id]
            else:
                restore_inode(inode, values)
        self._without_xattrs.clear()
        self._listing_ends.clear()
        self._listings.clear()
        self._dir_parents.clear()
        self._unsaved_atimes.clear()

    def _drop_caches(self) -> None:
        """Forget everything kept in memory about inodes (`_uncache` for all),
        deferred changes included: for when the database lost them too. With
        nothing deferred, undoing the request forgets every cached inode."""
        self._deferred.clear()
        self._undo_request()

    def commit_if_due(self, *, now: bool = False) -> None:
        """For the daemon's timers: commit a group that has waited long enough
        (or any, `now`), and atimes that reads changed."""
        try:
            if self.md.commit_due() or now or self._unsaved_atimes or self._deferred:
                self.commit()
        except Exception as e:
            self.failed("commit", e)

    def quiet_for(self) -> float:
        """Seconds since the metadata last changed; 0 while changes wait to be written."""
        if self._deferred or self._unsaved_atimes or self._request_saves:
            return 0.0
        return self.md.quiet_for()

    def counters(self) -> dict[str, int]:
        """Figures for `envfs status` and benchmarks."""
        return {
            "hsm_derivations": self.keys.derivations,
            "prefetched_keys_used": self.keys.prefetch_hits,
            "key_wait_us": self.keys.key_wait_ns // 1000,
            "data_file_opens": self.data_opens,
            "creates_with_data_file_ahead": self.creates_with_data_file_ahead,
            "creates_with_cipher_ahead": self.creates_with_cipher_ahead,
            "open_files": len(self._open),
            "open_handles": len(self._handles),
            "cached_inodes": len(self._inodes),
            "cached_lookups": self.cached_lookups,
            "rekeys": self.rekeys,
            "integrity_errors": self.integrity_errors,
            "daemon_clears_setid": int(pyfuse3.killpriv_v2()),
        }

    # -- inode cache and lifetime ---------------------------------------------

    def _inode(self, inode_id: int) -> Inode:
        inode = self._inodes.get(inode_id)
        if inode is None:
            inode = self.md.get_inode(inode_id)
            if inode is None:
                raise FUSEError(errno.ENOENT)
            self._inodes[inode_id] = inode
        return inode

    def _save(self, inode: Inode) -> None:
        """Record a change of a cached inode: deferred to the group commit once
        the transaction it is in, or else the request, has succeeded. On a nearly
        full disk it is written at once, so that a lack of room is this
        request's error (nothing is deferred then: each request commits)."""
        self._unsaved_atimes.discard(inode.id)
        if self._low_space:
            self._request_saves.pop(inode.id, None)
            self._deferred.pop(inode.id, None)
            self.md.save_inode(inode)
        elif self._transaction_saves is not None:
            self._transaction_saves[inode.id] = inode
        else:
            self._request_saves[inode.id] = inode

    def _save_atimes(self) -> None:
        """Save the inodes whose atime alone changed, with the group as the
        deferred saves are. On a nearly full disk each goes in its own
        savepoint: a failure then loses that atime update and nothing else."""
        unsaved, self._unsaved_atimes = self._unsaved_atimes, set()
        for inode_id in unsaved:
            inode = self._inodes.get(inode_id)
            if inode is None:
                continue
            if not self._low_space:
                self.md.save_inode(inode)
                continue
            try:
                with self.md.transaction():
                    self.md.save_inode(inode)
            except (OSError, sqlite3.Error) as e:
                log.warning("inode %d: atime not saved: %s", inode_id, e)

    def _held(self, inode_id: int) -> bool:
        return inode_id in self._lookups or inode_id in self._open or inode_id == ROOT_INODE

    def _release_cache(self, inode_id: int) -> None:
        """An inode that neither the kernel nor a handle holds any more stays
        cached for a later lookup; the oldest of LOOKUP_CACHE_SIZE such goes."""
        if self._held(inode_id):
            return
        if inode_id not in self._inodes:
            self._uncache(inode_id)
            return
        self._forgotten[inode_id] = None
        if len(self._forgotten) > LOOKUP_CACHE_SIZE:
            self._evict(next(iter(self._forgotten)))

    def _evict(self, inode_id: int) -> None:
        self._forgotten.pop(inode_id, None)
        if self._held(inode_id):
            return
        inode = self._inodes.get(inode_id)
        if inode is not None and (
            inode_id in self._unsaved_atimes or inode_id in self._deferred or inode_id in self._request_saves
            or (self._transaction_saves is not None and inode_id in self._transaction_saves)
        ):  # fmt: skip
            # Written now: the database is what a later request reads it from.
            self.md.save_inode(inode)
        self._uncache(inode_id)

    def _uncache(self, inode_id: int) -> None:
        """Forget everything kept in memory about an inode (`_drop_caches` for one)."""
        self._inodes.pop(inode_id, None)
        self._forgotten.pop(inode_id, None)
        self._st_blocks.pop(inode_id, None)
        self._deferred.pop(inode_id, None)
        self._request_saves.pop(inode_id, None)
        if self._transaction_saves is not None:
            self._transaction_saves.pop(inode_id, None)
        self._without_xattrs.discard(inode_id)
        self._listing_ends.pop(inode_id, None)
        self._listings.pop(inode_id, None)
        self._dir_parents.pop(inode_id, None)
        self._unsaved_atimes.discard(inode_id)

    def _maybe_delete(self, inode_id: int) -> None:
        """Delete an unlinked inode once neither the kernel nor a handle holds it
        (on a read-only mount, a crash's orphan waits for a read-write one)."""
        if inode_id in self._open:
            return
        inode = self._inodes.get(inode_id) or self.md.get_inode(inode_id)
        if inode is None or inode.nlink > 0 or self.store.read_only:
            self._release_cache(inode_id)
            return
        self._free_space_early(inode)
        if inode_id in self._lookups:
            return
        delete_inode(self.store, self.md, inode, xattrs=not self._surely_without_xattrs(inode.id))
        self._uncache(inode_id)

    def _free_space_early(self, inode: Inode) -> None:
        """On a nearly full disk, remove an unlinked, unopened file's data at once,
        even while the kernel still holds the inode.

        Deleting rows needs room that only removing the data file gives, and
        the kernel's forget, which ends the inode, comes when it likes. Once
        nlink 0 is committed the inode is an orphan, whose data file may go
        first: recovery deletes orphans anyway.
        """
        if self._low_space and stat.S_ISREG(inode.mode):
            self.commit()
            self.store.remove_data_file(inode.id, inode.key_version, inode.key_epoch)

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode.id
        attrs.generation = 0
        attrs.entry_timeout = ENTRY_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.st_mode = inode.mode
        attrs.st_nlink = inode.nlink
        attrs.st_uid = inode.uid
        attrs.st_gid = inode.gid
        attrs.st_rdev = inode.rdev
        attrs.st_size = inode.size
        attrs.st_blksize = 4096
        attrs.st_blocks = self._blocks(inode)
        attrs.st_atime_ns = inode.atime_ns
        attrs.st_mtime_ns = inode.mtime_ns
        attrs.st_ctime_ns = inode.ctime_ns
        return attrs

    def _blocks(self, inode: Inode) -> int:
        """st_blocks: the data file's, looked up again once its inode's ctime
        or key epoch moved (every change of the data file moves one)."""
        if not stat.S_ISREG(inode.mode):
            return 0
        when = (inode.ctime_ns, inode.key_epoch)
        known = self._st_blocks.get(inode.id)
        if known is not None and known[0] == when:
            return known[1]
        blocks = self.store.data_file_blocks(inode.id, inode.key_version, inode.key_epoch)
        self._st_blocks[inode.id] = (when, blocks)
        return blocks

    def _data_file_unchanged(self, inode: Inode, blocks_as_of: tuple[int, int]) -> None:
        """The inode's ctime moved and its data file stayed as it was (a chmod,
        chown or utimens): the st_blocks known as of the old ctime still hold."""
        known = self._st_blocks.get(inode.id)
        if known is not None and known[0] == blocks_as_of:
            self._st_blocks[inode.id] = ((inode.ctime_ns, inode.key_epoch), known[1])

    def _lookup_ref(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel one more reference."""
        self._lookups[inode.id] = self._lookups.get(inode.id, 0) + 1
        self._forgotten.pop(inode.id, None)
        return self._attrs(inode)

    def _dir(self, inode_id: int) -> Inode:
        inode = self._inode(inode_id)
        if not stat.S_ISDIR(inode.mode):
            raise FUSEError(errno.ENOTDIR)
        return inode

    def _encrypt_name(self, parent: int, name: bytes) -> bytes:
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        return self.names.encrypt_name(parent, name)

    def _child(self, parent: int, name_ct: bytes) -> Inode | None:
        known = self._names.get(parent)
        if known is not None:
            inode_id = known.get(name_ct)
            child = self._inodes.get(inode_id) if inode_id is not None else None
            if child is not None or (inode_id is None and parent in self._complete_dirs):
                self.cached_lookups += 1
                return child
        found = self.md.lookup_with_inode(parent, name_ct, self._inodes)
        if found is None:
            return None
        child = self._keep(*found)
        self._remember_name(parent, name_ct, child.id)
        return child

    def _remember_name(self, parent: int, name_ct: bytes, inode_id: int) -> None:
        if self._names_count >= LOOKUP_CACHE_SIZE:
            self._names.clear()
            self._names_count = 0
            self._complete_dirs.clear()
        names = self._names.setdefault(parent, {})
        if name_ct not in names:
            self._names_count += 1
        names[name_ct] = inode_id

    def _keep(self, entry: Dentry, inode: Inode | None) -> Inode:
        """An inode fetched with its entry, kept as the one object for its id.
        Entries and the rows they name change together: an entry naming no
        row is damage, not a name that is gone."""
        if inode is None:
            raise IntegrityError(
                f"directory {entry.parent}: entry {entry.id} names inode {entry.inode}, which has no row"
            )
        inode = self._inodes.setdefault(inode.id, inode)
        if stat.S_ISDIR(inode.mode):
            self._dir_parents[inode.id] = entry.parent
        return inode

    def _parent_dir(self, directory: Inode) -> Inode:
        """The directory '..' names."""
        if directory.id == ROOT_INODE:
            return directory
        parent_id = self._dir_parents.get(directory.id)
        if parent_id is None:
            # None: a removed directory, whose '..' is the root's.
            parent_id = self.md.parent_of(directory.id) or ROOT_INODE
            self._dir_parents[directory.id] = parent_id
        return self._inode(parent_id)

    def _touch_dir(
        self, directory: Inode, now: int, added: tuple[bytes, int] | None = None, removed: bytes | None = None
    ) -> None:
        """Every change of a directory's entries comes through here; `added`:
        the change only added this (encrypted) name for this inode; `removed`:
        it only removed this name."""
        directory.mtime_ns = directory.ctime_ns = now
        self._save(directory)
        self._listing_ends.pop(directory.id, None)
        self._listings.pop(directory.id, None)
        if added is not None:
            self._remember_name(directory.id, *added)
            return
        if removed is not None:
            names = self._names.get(directory.id)
            if names is not None and names.pop(removed, None) is not None:
                self._names_count -= 1
            return
        self._forget_names_of(directory.id)

    def _forget_names_of(self, directory_id: int) -> None:
        self._complete_dirs.discard(directory_id)
        names = self._names.pop(directory_id, None)
        if names:
            self._names_count -= len(names)

    # -- lookups ---------------------------------------------------------------

    @handler(reads=True)
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if name == b".":
            return self._lookup_ref(parent)
        if name == b"..":
            return self._lookup_ref(self._parent_dir(parent))
        child = self._child(parent.id, self._encrypt_name(parent.id, name))
        if child is None:
            return _negative_entry()
        return self._lookup_ref(child)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode_id, count in inode_list:
            try:
                remaining = self._lookups.get(inode_id, 0) - count
                if remaining > 0:
                    self._lookups[inode_id] = remaining
                    continue
                self._lookups.pop(inode_id, None)
                self._maybe_delete(inode_id)
            except Exception:
                log.exception("forget(%d) failed; the inode is cleaned at the next mount", inode_id)
        if self._low_space:
            # A forget is often what deletes a file; on a full disk its space
            # must be free before the next request, not at the next timer commit.
            self.commit_if_due(now=True)

    @handler(reads=True)
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._inode(inode))

    @handler(frees_space=True)
    async def setattr(
        self, inode_id: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:  # fmt: skip
        inode = self._inode(inode_id)
        now = _now()
        blocks_as_of = (inode.ctime_ns, inode.key_epoch)
        if fields.update_size:
            if stat.S_ISDIR(inode.mode):
                raise FUSEError(errno.EISDIR)
            if not stat.S_ISREG(inode.mode):
                raise FUSEError(errno.EINVAL)
            self._truncate(inode, attr.st_size, now)
        if not stat.S_ISDIR(inode.mode) and (fields.update_uid or fields.update_gid or _sets_nothing(fields)):
            # chown(f, -1, -1) comes as a setattr that sets nothing.
            self._clear_setid(inode, ctx, chown=True)
        if fields.update_mode:
            inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            inode.uid = attr.st_uid
        if fields.update_gid:
            inode.gid = attr.st_gid
        if fields.update_atime:
            inode.atime_ns = _clamp_time(attr.st_atime_ns)
        if fields.update_mtime:
            inode.mtime_ns = _clamp_time(attr.st_mtime_ns)
        if fields.update_size:
            self._clear_setid(inode, ctx)
        inode.ctime_ns = _clamp_time(attr.st_ctime_ns) if fields.update_ctime else now
        self._save(inode)
        if not fields.update_size:
            self._data_file_unchanged(inode, blocks_as_of)
        return self._attrs(inode)

    def _clear_setid(self, inode: Inode, caller: Caller, *, chown: bool = False) -> None:
        """Clear set-user-ID and set-group-ID as Linux does after a change of data
        or (`chown`) of owner by `caller` (the request's; for a write through a
        handle, its opener). The kernel leaves this to the daemon
        (FUSE_HANDLE_KILLPRIV_V2) and keeps the mode it has cached, which a
        statx for the mode and an exec's permission check go on using: replies
        to write, fallocate and open carry no attributes, so it is told to
        fetch them again."""
        if not inode.mode & (stat.S_ISUID | stat.S_ISGID):
            return  # every write comes here
        rule = _mode_after_chown if chown else _mode_after_data_change
        mode = rule(inode.mode, caller.uid, caller.gid, caller.pid, inode.gid)
        if mode == inode.mode:
            return
        inode.mode = mode
        if self._kernel_attached:
            try:
                pyfuse3.invalidate_inode(inode.id, attr_only=True)
            except OSError as e:  # ENOENT: the kernel has forgotten the inode
                log.debug("attributes of inode %d not invalidated: %s", inode.id, e)

    def _truncate(self, inode: Inode, size: int, now: int) -> None:
        self._check_file_size(size)
        self._ensure_nonce_budget(inode, 1)
        data, temporary = self._data(inode)
        try:
            if size < inode.size:
                # Record the smaller size first: every intermediate state reads back correctly.
                old = inode.size
                inode.size = size
                self._save(inode)
                self.commit()
                inode.block_writes += data.truncate(old, size)
            else:
                inode.block_writes += data.truncate(inode.size, size)
                inode.size = size
            inode.mtime_ns = inode.ctime_ns = now
            self._save(inode)
        finally:
            if temporary:
                data.close()

    def _data(self, inode: Inode) -> tuple[DataFile, bool]:
        """The inode's data file: the open one, or a temporary (to close after use)."""
        open_file = self._open.get(inode.id)
        if open_file is not None:
            return open_file.data, False
        return self._open_data(inode), True

    def _open_data(self, inode: Inode) -> DataFile:
        return self._open_data_file(inode.id, inode.key_version, inode.key_epoch, inode.size)

    def _open_data_file(self, inode_id: int, key_version: int, key_epoch: int, size: int) -> DataFile:
        self.data_opens += 1
        return open_data_file(
            self.keys.file_cipher(inode_id, key_version, key_epoch),
            lambda: self.store.open_data_file(inode_id, key_version, key_epoch, create=size == 0),
            size,
        )

    # -- creating --------------------------------------------------------------

    def _new_inode(
        self, parent: Inode, name_ct: bytes, mode: int, ctx: pyfuse3.RequestContext, rdev: int = 0, size: int = 0,
        inode_id: int | None = None,
    ) -> Inode:  # fmt: skip
        """A new inode under the (encrypted) name `name_ct` of `parent`; EEXIST if it is taken.

        One statement, the entry's insert: the inode's row is written with
        the group commit (`Metadata.create_inode`), and the saves are deferred.
        """
        if inode_id is None:
            inode_id = self.md.allocate_inode_id()
        if not self.md.add_entry(parent, name_ct, inode_id):
            raise FUSEError(errno.EEXIST)
        now = _now()
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        if not stat.S_ISLNK(mode):
            mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~ctx.umask)
        inode = self.md.create_inode(
            inode_id, mode=mode, uid=ctx.uid, gid=gid, nlink=2 if stat.S_ISDIR(mode) else 1, rdev=rdev, size=size,
            atime_ns=now, mtime_ns=now, ctime_ns=now, key_version=self.keys.superblock.current_key_version,
            key_epoch=0, block_writes=0,
        )  # fmt: skip
        if stat.S_ISDIR(mode):
            parent.nlink += 1
            self._names[inode.id] = {}
            self._complete_dirs.add(inode.id)
        self._touch_dir(parent, now, added=(name_ct, inode.id))
        self._inodes[inode.id] = inode
        self._without_xattrs.add(inode.id)  # the kernel asks for security.capability before each write
        return inode

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FUSEError(errno.EINVAL)
        name_ct = self._encrypt_name(parent.id, name)
        with self._transaction(one_statement=True):  # the entry's row (`_new_inode`)
            inode = self._new_inode(parent, name_ct, mode, ctx, rdev=rdev)
        return self._lookup_ref(inode)

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        name_ct = self._encrypt_name(parent.id, name)
        with self._transaction(one_statement=True):  # the entry's row (`_new_inode`)
            inode = self._new_inode(parent, name_ct, stat.S_IFDIR | stat.S_IMODE(mode), ctx)
        return self._lookup_ref(inode)

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if len(target) > SYMLINK_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        name_ct = self._encrypt_name(parent.id, name)
        with self._transaction():
            inode = self._new_inode(parent, name_ct, stat.S_IFLNK | 0o777, ctx, size=len(target))
            self.md.set_symlink(inode.id, self.names.encrypt_target(inode.id, target))
        return self._lookup_ref(inode)

    @handler(reads=True)
    async def readlink(self, inode_id: int, ctx: pyfuse3.RequestContext) -> bytes:
        inode = self._inode(inode_id)
        if not stat.S_ISLNK(inode.mode):
            raise FUSEError(errno.EINVAL)
        ciphertext = self.md.get_symlink(inode_id)
        if ciphertext is None:
            raise IntegrityError(f"inode {inode_id}: symlink target missing")
        return self.names.decrypt_target(inode_id, ciphertext)

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._dir(parent_inode)
        name_ct = self._encrypt_name(parent.id, name)
        ahead = self._take_next_file()
        inode_id, key_version = ahead.inode_id, ahead.key_version
        # Its data file first: a create that cannot make it (no file descriptor
        # left, no inode on the backing filesystem) fails whole and leaves no
        # name behind; and the rows are then one statement, the entry's (the
        # inode's row is written with the group).
        data = self._new_data_file(ahead)
        try:
            with self._transaction(one_statement=True):
                inode = self._new_inode(parent, name_ct, stat.S_IFREG | stat.S_IMODE(mode), ctx, inode_id=inode_id)
        except BaseException as e:
            data.close()  # made, and no row names it
            self.store.remove_data_file(inode_id, key_version, 0)
            if not isinstance(e, FUSEError):
                raise
            existing = self._child(parent.id, name_ct) if e.errno == errno.EEXIST else None
            if existing is None or flags & os.O_EXCL:
                raise
            # The name appeared after the kernel's lookup: O_CREAT without O_EXCL
            # opens what is there, as on a local filesystem.
            if stat.S_ISDIR(existing.mode):
                raise FUSEError(errno.EISDIR) from None
            info = await self.open(existing.id, flags, ctx)
            return info, self._lookup_ref(existing)
        self._st_blocks[inode.id] = ((inode.ctime_ns, inode.key_epoch), 0)  # its data file was made empty
        attrs = self._lookup_ref(inode)
        info = self._open_handle(inode, ctx, data)
        # Files tend to come in runs (untar, cp -r): the next one's key is derived,
        # and the rest of it prepared (`idle`), while the kernel and the
        # application work on this one.
        self._next_file = FileAhead(self.md.allocate_inode_id(), self.keys.superblock.current_key_version)
        self.keys.prefetch_file_cipher(self._next_file.inode_id, self._next_file.key_version, 0)
        pyfuse3.arm_idle_hook()
        return info, attrs

    def _take_next_file(self) -> FileAhead:
        """The file to create now: the one prepared ahead, or a new one. (The
        key version cannot change under a mount: rotations need the store
        unmounted.)"""
        ahead, self._next_file = self._next_file, None
        return ahead or FileAhead(self.md.allocate_inode_id(), self.keys.superblock.current_key_version)

    def _new_data_file(self, ahead: FileAhead) -> DataFile:
        """The data file of a file being created, from what `idle` prepared of it
        (its cipher, its data file) and the rest made now."""
        cipher, fd = ahead.cipher, ahead.fd
        self.creates_with_data_file_ahead += fd is not None
        self.creates_with_cipher_ahead += cipher is not None
        try:
            if cipher is None:
                cipher = self.keys.file_cipher(ahead.inode_id, ahead.key_version, 0)
            if fd is None:
                fd = self.store.open_data_file(ahead.inode_id, ahead.key_version, 0, create=True)
        except BaseException:
            ahead.cipher, ahead.fd = cipher, fd
            self._drop_file_ahead(ahead)
            raise
        self.data_opens += 1
        return open_data_file(cipher, lambda: fd, 0)

    def _drop_file_ahead(self, ahead: FileAhead) -> None:
        """Close what was prepared for a create that did not come or failed, and
        remove its data file: where that fails (a backing filesystem turned
        read-only) it stays, a leftover of no inode (FORMAT.md 7), rather than
        stop an unmount."""
        if ahead.cipher is not None:
            ahead.cipher.close()
        if ahead.fd is not None:
            os.close(ahead.fd)
            try:
                self.store.remove_data_file(ahead.inode_id, ahead.key_version, 0)
            except OSError as e:
                log.warning("the data file made ahead for inode %d stays: %s", ahead.inode_id, e)

    def idle(self) -> bool:
        """Work for the gap between a reply and the client's next request
        (pyfuse3's idle hook, armed by `create`): a step of preparing the next
        file to create, its data file or its cipher once its key is derived.
        Whether there is more to do."""
        ahead = self._next_file
        if ahead is None:
            return False
        if ahead.fd is None:
            try:
                ahead.fd = self.store.open_data_file(ahead.inode_id, ahead.key_version, 0, create=True)
            except OSError as e:
                log.debug("making the data file of inode %d ahead: %s", ahead.inode_id, e)
                return False  # the create makes it, and answers with the error
        elif ahead.cipher is None:
            ready = self.keys.prefetched_key_ready(ahead.inode_id, ahead.key_version, 0)
            if not ready:
                return ready is False  # wait for the derivation; or leave it to the create
            try:
                ahead.cipher = self.keys.file_cipher(ahead.inode_id, ahead.key_version, 0)
            except EnvfsError as e:  # the token gone, say
                log.debug("the cipher of inode %d ahead: %s", ahead.inode_id, e)
                return False  # the create derives the key, and answers with the error
        return ahead.cipher is None

    @handler
    async def link(
        self, inode_id: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = self._inode(inode_id)
        if stat.S_ISDIR(inode.mode):
            raise FUSEError(errno.EPERM)
        parent = self._dir(new_parent_inode)
        name_ct = self._encrypt_name(parent.id, new_name)
        if inode.nlink == 0:
            raise FUSEError(errno.ENOENT)
        with self._transaction(one_statement=True):  # the entry's row; inode saves are deferred
            if not self.md.add_entry(parent, name_ct, inode.id):
                raise FUSEError(errno.EEXIST)
            now = _now()
            inode.nlink += 1
            inode.ctime_ns = now
            self._save(inode)
            self._touch_dir(parent, now, added=(name_ct, inode.id))
        return self._lookup_ref(inode)

    # -- removing and renaming -------------------------------------------------

    @handler(frees_space=True)
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, directory=False)

    @handler(frees_space=True)
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, directory=True)

    def _remove(self, parent_inode: int, name: bytes, *, directory: bool) -> None:
        """unlink (a non-directory) or rmdir (an empty directory)."""
        parent = self._dir(parent_inode)
        name_ct = self._encrypt_name(parent.id, name)
        inode = self._child(parent.id, name_ct)  # the kernel looked it up just before: cached
        if inode is None:
            raise FUSEError(errno.ENOENT)
        if stat.S_ISDIR(inode.mode) != directory:
            raise FUSEError(errno.ENOTDIR if directory else errno.EISDIR)
        if directory:
            if self.md.has_entries(inode.id):
                raise FUSEError(errno.ENOTEMPTY)
            self.md.check_entries(inode, 0)
        now = _now()
        with self._transaction(one_statement=True):  # the entry's row; inode saves are deferred
            self.md.remove_entry(parent, name_ct, inode.id)
            self._drop_link(inode, now)
            if directory:
                parent.nlink -= 1
            self._touch_dir(parent, now, removed=name_ct)
        self._dir_parents.pop(inode.id, None)
        if directory:
            self._forget_names_of(inode.id)
        self._maybe_delete(inode.id)

    def _drop_link(self, inode: Inode, now: int) -> None:
        if stat.S_ISDIR(inode.mode):
            inode.nlink = 0
        else:
            inode.nlink -= 1
        inode.ctime_ns = now
        self._save(inode)

    @handler(frees_space=True)
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:  # fmt: skip
        old_parent = self._dir(parent_inode_old)
        new_parent = self._dir(parent_inode_new)
        old_ct = self._encrypt_name(old_parent.id, name_old)
        new_ct = self._encrypt_name(new_parent.id, name_new)
        source_entry = self.md.lookup(old_parent.id, old_ct)
        if source_entry is None:
            raise FUSEError(errno.ENOENT)
        source = self._inode(source_entry.inode)
        target_entry = self.md.lookup(new_parent.id, new_ct)
        target = None if target_entry is None else self._inode(target_entry.inode)
        self._dir_parents.pop(source.id, None)
        if target is not None:
            self._dir_parents.pop(target.id, None)
        now = _now()
        if flags & pyfuse3.RENAME_EXCHANGE:
            if target is None:
                raise FUSEError(errno.ENOENT)
            with self._transaction():
                self.md.repoint_entry(old_parent, old_ct, source.id, target.id)
                self.md.repoint_entry(new_parent, new_ct, target.id, source.id)
                if old_parent.id != new_parent.id and stat.S_ISDIR(source.mode) != stat.S_ISDIR(target.mode):
                    moved_dir_to_new = 1 if stat.S_ISDIR(source.mode) else -1
                    new_parent.nlink += moved_dir_to_new
                    old_parent.nlink -= moved_dir_to_new
                for inode in (source, target):
                    inode.ctime_ns = now
                    self._save(inode)
                self._touch_dir(old_parent, now)
                if new_parent is not old_parent:
                    self._touch_dir(new_parent, now)
            return
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            if target.id == source.id:
                return  # two names of one inode: POSIX says do nothing
            if stat.S_ISDIR(source.mode):
                if not stat.S_ISDIR(target.mode):
                    raise FUSEError(errno.ENOTDIR)
                if self.md.has_entries(target.id):
                    raise FUSEError(errno.ENOTEMPTY)
                self.md.check_entries(target, 0)
            elif stat.S_ISDIR(target.mode):
                raise FUSEError(errno.EISDIR)
        with self._transaction():
            if target is not None:
                self.md.remove_entry(new_parent, new_ct, target.id)
                self._drop_link(target, now)
                if stat.S_ISDIR(target.mode):
                    new_parent.nlink -= 1
            self.md.remove_entry(old_parent, old_ct, source.id)
            if not self.md.add_entry(new_parent, new_ct, source.id):
                raise RuntimeError(f"directory {new_parent.id}: the rename target appeared during the rename")
            if flags & RENAME_WHITEOUT:
                # What overlayfs asks for: a 0:0 character device left at the old name.
                self._new_inode(old_parent, old_ct, stat.S_IFCHR, ctx, rdev=0)
            if stat.S_ISDIR(source.mode) and old_parent.id != new_parent.id:
                old_parent.nlink -= 1
                new_parent.nlink += 1
            source.ctime_ns = now
            self._save(source)
            self._touch_dir(old_parent, now)
            if new_parent is not old_parent:
                self._touch_dir(new_parent, now)
        if target is not None:
            self._maybe_delete(target.id)

    # -- file handles ----------------------------------------------------------

    def _open_handle(self, inode: Inode, ctx: pyfuse3.RequestContext, data: DataFile | None = None) -> pyfuse3.FileInfo:
        """A new handle of `inode`; `data`: its data file, opened already (by a create)."""
        open_file = self._open.get(inode.id)
        if open_file is None:
            open_file = OpenFile(data or self._open_data(inode))
            self._open[inode.id] = open_file
        open_file.handles += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(inode.id, ctx.uid, ctx.gid, ctx.pid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @handler
    async def open(self, inode_id: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        inode = self._inode(inode_id)
        if stat.S_ISDIR(inode.mode):
            raise FUSEError(errno.EISDIR)
        if not stat.S_ISREG(inode.mode):
            raise FUSEError(errno.ENXIO)
        # The guess runs its queries while the HSM may still be deriving this
        # file's own key (prefetched at an earlier open).
        guesses = self._guess_next_files(inode) if inode.id not in self._open else []
        info = self._open_handle(inode, ctx)
        for following in guesses:
            if following.id not in self._open:
                self._prefetch_guessed(following)
        # Linux truncates for O_TRUNC whatever the access mode (the kernel asked
        # for write permission), and does not send the setattr that would
        # clear set-user-ID and set-group-ID: that is up to the open.
        if flags & os.O_TRUNC:
            try:
                self._clear_setid(inode, ctx)
                self._truncate(inode, 0, _now())
            except BaseException:
                await self.release(info.fh)
                raise
        return info

    def _prefetch_guessed(self, following: NextFile) -> None:
        """Derive a guessed file's key ahead. The guess comes from rows nobody
        authenticated: a key version the store lacks, or values that do not
        fit the key's HKDF info (struct.error), only spare the derivation."""
        try:
            self.keys.prefetch_file_cipher(following.id, following.key_version, following.key_epoch)
        except (CorruptStore, struct.error) as e:
            log.debug("no key prefetch for inode %d: %s", following.id, e)

    def _guess_next_files(self, opened: Inode) -> list[NextFile]:
        """The files to derive keys for ahead, at the first open of `opened`.

        Readers of a whole tree (md5sum, grep -r, tar c, cp -r out of the
        mount) open files in the order of a depth-first walk in listing
        order. So a first open that reaches a guessed file finds its key
        ready, and the walk goes on from where the last guess left it, to
        keep PREFETCH_DEPTH keys ahead of the reader. Where the guesses keep
        missing (random access), only every 32nd open guesses, and only
        one file, to spare the HSM wasted derivations.
        """
        wanted, after = PREFETCH_DEPTH, opened.id
        walk: WalkPosition = ()
        if self._guessed:
            if opened.id in self._guessed:
                self._guess_misses = 0
                after, walk = self._guessed[-1], self._guessed_at
                del self._guessed[: self._guessed.index(opened.id) + 1]
                wanted -= len(self._guessed)
            else:
                self._guess_misses += 1
                self._guessed, self._guessed_at = [], ()
        if self._guess_misses >= 4:
            if self.data_opens % 32:
                return []
            wanted = 1
        found: list[NextFile] = []
        try:
            while len(found) < wanted and (step := self.md.next_file(after, walk)) is not None:
                following, walk = step
                after = following.id
                found.append(following)
        except sqlite3.Error as e:
            log.debug("no key prefetch after inode %d: %s", opened.id, e)  # the open itself will say
        if found:
            self._guessed += [following.id for following in found]
            self._guessed_at = walk
        return found

    def drop_stale_prefetch(self) -> None:
        """For the daemon's timers: wipe prefetched keys, and the file prepared
        for the next create, that nothing has used for a while."""
        self._drop_prepared(older_than=PREFETCH_MAX_AGE)

    def _drop_prepared(self, *, older_than: float = 0.0) -> None:
        """Wipe the keys derived ahead, and drop the file prepared for the next
        create, where unused for `older_than` seconds (0: all of them)."""
        self.keys.drop_prefetched(older_than=older_than)
        ahead = self._next_file
        if ahead is not None and time.monotonic() - ahead.at >= older_than:
            self._next_file = None
            self._drop_file_ahead(ahead)

    def _handle(self, fh: int) -> tuple[Handle, Inode, OpenFile]:
        handle = self._handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        return handle, self._inode(handle.inode), self._open[handle.inode]

    @handler(reads=True)
    async def read(self, fh: int, off: int, size: int) -> memoryview:
        _, inode, open_file = self._handle(fh)
        if self._replied_buffers:
            self.replies_sent()  # the previous read's buffer is free to reuse
        buf = self._read_buffers.take(min(size, max(0, inode.size - off)))
        try:
            n = open_file.data.read_into(off, buf, inode.size)
        except BaseException:
            self._read_buffers.give_back(buf)
            raise
        self._relatime(inode)
        if not self._replied_buffers:
            self._wake_after_reply()
        self._replied_buffers.append(buf)
        return buf[:n]

    def replies_sent(self) -> None:
        """Zero the buffers of read replies sent, and keep them for reuse.

        Handlers never yield, and pyfuse3 sends a handler's reply before its
        task yields; so when another request's handler or another trio task
        runs, every earlier reply has been sent.
        """
        sent, self._replied_buffers = self._replied_buffers, []
        for buf in sent:
            self._read_buffers.give_back(buf)

    def _relatime(self, inode: Inode) -> None:
        """Update atime as ext4's relatime does, for a read of a file or a
        listing of a directory; save it as ext4's lazytime
        does, with the inode's next save or at the next group commit (within
        GROUP_SECONDS): a read then costs no row write of its own, and a
        crash loses at most the atimes of that window, as it loses the
        group's other changes (so does a failed request, which forgets
        unsaved atimes). None on a read-only mount, as on ext4 mounted ro."""
        if not self.store.read_only and (
            inode.atime_ns <= inode.mtime_ns
            or inode.atime_ns <= inode.ctime_ns
            or (_now() - inode.atime_ns > _RELATIME_WINDOW_NS)
        ):
            inode.atime_ns = _now()
            self._unsaved_atimes.add(inode.id)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """`_write`, then wipe `buf`, pyfuse3's copy of the caller's plaintext: only after
        the last attempt, as a write that ran out of space may be retried (`handler`)."""
        try:
            return await self._write(fh, off, buf)
        finally:
            zero_bytes(buf)

    @handler
    async def _write(self, fh: int, off: int, buf: bytes) -> int:
        # `off` is where the kernel places the write, O_APPEND included: it
        # knows the size, and whether O_APPEND still holds (fcntl F_SETFL
        # changes it; a shared mapping writes its pages back at their place).
        handle, inode, open_file = self._handle(fh)
        self._check_file_size(off + len(buf))
        # A write touches at most len/4096 + 2 blocks, plus the old last block it
        # pads: as many encryptions, and as many slots of space (as if none were
        # there yet: a block it only changes may sit in a hole).
        blocks = len(buf) // BLOCK_SIZE + 3
        self._claim_room(blocks * SLOT_SIZE)
        self._ensure_nonce_budget(inode, blocks)
        new_size, writes = open_file.data.write(off, memoryview(buf), inode.size)
        inode.size = new_size
        inode.block_writes += writes
        self._clear_setid(inode, handle)
        inode.mtime_ns = inode.ctime_ns = _now()
        self._save(inode)
        return len(buf)

    def _check_file_size(self, size: int) -> None:
        """EFBIG for a file size beyond `max_file_size`, as ext4 answers beyond its own limit."""
        if size > self.max_file_size:
            raise FUSEError(errno.EFBIG)

    def _claim_room(self, growth: int) -> None:
        """ENOSPC for data that would leave the backing filesystem less than
        METADATA_ROOM free; free space is looked up only when the room counted
        since the last look runs out."""
        self._room -= growth
        if self._room < 0:
            self._room = self.store.free_bytes() - METADATA_ROOM - growth
            if self._room < 0:
                self._room = 0
                raise OSError(errno.ENOSPC, "no space left on the backing filesystem beyond the metadata's room")

    def _ensure_nonce_budget(self, inode: Inode, blocks: int) -> None:
        """Re-key the file (a new key epoch) before its nonce bound is reached."""
        if inode.block_writes + blocks <= self.rekey_after:
            return
        old, temporary = self._data(inode)
        try:
            new = self._rekey(inode, old)
        finally:
            if temporary:
                old.close()
        if temporary:
            new.close()
        else:
            self._open[inode.id].data = new
            old.close()

    def _rekey(self, inode: Inode, old: DataFile) -> DataFile:
        """Re-encrypt the file under key epoch + 1; crash-safe at every step.

        The new data file is complete and durable before the metadata names
        its epoch; until that commit the old file is the file.
        """
        self.rekeys += 1
        log.info(
            "inode %d: %d block writes under key epoch %d, re-keying", inode.id, inode.block_writes, inode.key_epoch
        )
        old_epoch, new_epoch, old_writes = inode.key_epoch, inode.key_epoch + 1, inode.block_writes
        # A size of 0 cuts a leftover of an interrupted re-key.
        new = open_data_file(
            self.keys.file_cipher(inode.id, inode.key_version, new_epoch),
            lambda: self.store.open_data_file(inode.id, inode.key_version, new_epoch, create=True),
            0,
        )
        try:
            writes = old.copy_to(new, inode.size)
            self.store.sync_data_dir(inode.id)
            inode.key_epoch = new_epoch
            inode.block_writes = writes
            self._save(inode)
        except BaseException:
            inode.key_epoch = old_epoch
            inode.block_writes = old_writes
            new.close()
            self.store.remove_data_file(inode.id, inode.key_version, new_epoch)
            raise
        # The old file may go only once the new epoch is durable: a commit still in
        # the WAL could be lost on power failure while the unlink reached the disk.
        try:
            self.commit()
        except BaseException:
            new.close()  # the failed commit lost the new epoch: the old file is the file
            raise
        try:
            self.md.sync()
        except (OSError, sqlite3.Error) as e:
            # The new epoch is committed, so the new file is the file; the old one
            # is left for the recovery of the next mount after a crash.
            log.warning("inode %d: checkpoint after re-key failed (%s); old data file kept", inode.id, e)
            return new
        self.store.remove_data_file(inode.id, inode.key_version, old_epoch)
        return new

    async def flush(self, fh: int) -> None:
        """Writes are done when `write` returns, so a close has nothing to flush:
        ENOSYS tells the kernel to stop sending FLUSH, one request less per close."""
        raise FUSEError(errno.ENOSYS)

    @handler(frees_space=True)
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        open_file = self._open.get(handle.inode)
        if open_file is None:
            return
        open_file.handles -= 1
        if open_file.handles > 0:
            return
        del self._open[handle.inode]
        open_file.data.close()
        self._maybe_delete(handle.inode)
        self._release_cache(handle.inode)

    @handler
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """Modes 0 and FALLOC_FL_KEEP_SIZE: the range reads as zeros, and its
        ciphertext slots get backing space, so later writes there do not fail
        for lack of it. FALLOC_FL_PUNCH_HOLE (with KEEP_SIZE, as the kernel
        demands): the range reads as zeros and the blocks it covers whole give
        their backing space back. FALLOC_FL_ZERO_RANGE: zeros, then as mode 0.
        Collapsing and inserting ranges are not supported. Every mode
        changes mtime and ctime, as on ext4, and may clear set-group-ID as
        a write does."""
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FUSEError(errno.EOPNOTSUPP)
        if offset < 0 or length <= 0:
            raise FUSEError(errno.EINVAL)
        handle, inode, open_file = self._handle(fh)
        end = offset + length
        self._check_file_size(end)
        if mode & FALLOC_FL_PUNCH_HOLE and offset >= inode.size:
            return  # nothing to punch: ext4 changes nothing either
        if not mode & FALLOC_FL_PUNCH_HOLE:
            # The room first: a refusal for lack of it leaves the file as it was.
            self._claim_room((-(-end // BLOCK_SIZE) - offset // BLOCK_SIZE) * SLOT_SIZE)
            open_file.data.reserve(offset, end)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) and offset < inode.size:
            # A zeroed block in part is re-encrypted: at most the first and the last.
            self._ensure_nonce_budget(inode, 2)
            inode.block_writes += open_file.data.zero_range(offset, end, inode.size)
        grows = not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) and end > inode.size
        if grows:
            self._truncate(inode, end, _now())
        if grows or mode & FALLOC_FL_ZERO_RANGE:
            # Again: for the blocks zeroing gave back, and those that growing the
            # data file added where the backing filesystem reserves only inside it.
            open_file.data.reserve(offset, end)
        self._clear_setid(inode, handle)
        inode.mtime_ns = inode.ctime_ns = _now()
        self._save(inode)

    @handler(reads=True)
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE (the kernel answers the rest), at block granularity."""
        _, inode, open_file = self._handle(fh)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FUSEError(errno.EINVAL)
        if not 0 <= offset < inode.size:
            raise FUSEError(errno.ENXIO)
        if whence == os.SEEK_HOLE:
            return open_file.data.seek_hole(offset, inode.size)
        found = open_file.data.seek_data(offset, inode.size)
        if found is None:
            raise FUSEError(errno.ENXIO)
        return found

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle, inode, open_file = self._handle(fh)
        os.fsync(open_file.data.fd)
        self.store.sync_data_dir(inode.id)
        self.commit()
        self.md.sync()

    # -- directories -----------------------------------------------------------

    @handler(reads=True)
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._dir(inode)
        return inode

    @handler(reads=True)
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory = self._dir(fh)
        self._relatime(directory)
        # Offsets: 1 after '.', 2 after '..', then 2 + the entry id.
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attrs(directory), 1):
            return
        if start_id < 2 and not pyfuse3.readdir_reply(token, b"..", self._attrs(self._parent_dir(directory)), 2):
            return
        if self._listing_ends.get(directory.id) == start_id:
            return  # the kernel asks once more after the last entry
        after = max(0, start_id - 2)
        listing = self._listings.pop(directory.id, None)
        if after == 0:
            listing = Listing(2, 0)
        elif listing is not None and listing.offset != start_id:
            listing = None  # a seek: this listing cannot check the digest
        digest = 0 if listing is None else listing.digest
        while True:
            entries = self.md.entries_with_inodes(directory.id, after, _READDIR_BATCH, self._inodes)
            for entry, found in entries:
                inode = self._keep(entry, found)
                name = self.names.decrypt_name(directory.id, entry.name)
                if not pyfuse3.readdir_reply(token, name, self._attrs(inode), entry.id + 2):
                    self._release_cache(inode.id)
                    if listing is not None:
                        self._listings[directory.id] = Listing(after + 2, digest)
                    return
                self._lookups[inode.id] = self._lookups.get(inode.id, 0) + 1
                if listing is not None:
                    digest ^= self.md.entry_element(entry)
                after = entry.id
            if len(entries) < _READDIR_BATCH:
                self._listing_ends[directory.id] = after + 2
                if listing is not None:
                    self.md.check_entries(directory, digest)
                return

    @handler(reads=True)
    async def releasedir(self, fh: int) -> None:
        return None

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.commit()
        self.md.sync()

    @handler(reads=True)
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        backing = os.statvfs(self.store.path)
        data = pyfuse3.StatvfsData()
        scale = backing.f_frsize / 4096
        data.f_bsize = 4096
        data.f_frsize = 4096
        data.f_blocks = int(backing.f_blocks * scale)
        data.f_bfree = int(backing.f_bfree * scale)
        data.f_bavail = int(backing.f_bavail * scale)
        inodes = self.md.counts()["inodes"]
        free = backing.f_ffree if backing.f_files else 2**32
        data.f_files = inodes + free
        data.f_ffree = free
        data.f_favail = free
        data.f_namemax = NAME_MAX
        return data

    @handler(reads=True)
    async def access(self, inode_id: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        inode = self._inode(inode_id)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(inode.mode & 0o111) or stat.S_ISDIR(inode.mode)
        if ctx.uid == inode.uid:
            bits = (inode.mode >> 6) & 7
        elif ctx.gid == inode.gid or inode.gid in pyfuse3.get_sup_groups(ctx.pid):
            bits = (inode.mode >> 3) & 7
        else:
            bits = inode.mode & 7
        return (mode & bits) == mode

    # -- extended attributes ---------------------------------------------------

    def _xattr_inode(self, inode_id: int, name: bytes) -> Inode:
        inode = self._inode(inode_id)
        _check_xattr_namespace(name)
        if name.startswith(b"user.") and not (stat.S_ISREG(inode.mode) or stat.S_ISDIR(inode.mode)):
            raise FUSEError(errno.EPERM)
        return inode

    @handler
    async def setxattr(self, inode_id: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        inode = self._xattr_inode(inode_id, name)
        name_ct = self.names.encrypt_xattr_name(inode.id, name)
        self._without_xattrs.discard(inode.id)
        if self._xattr_inodes is not None:
            self._xattr_inodes.add(inode.id)
        with self._transaction():
            self.md.set_xattr(inode, name_ct, self.names.encrypt_xattr_value(inode.id, name_ct, value))
            inode.ctime_ns = _now()
            self._save(inode)

    @handler(reads=True)
    async def getxattr(self, inode_id: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        inode = self._inode(inode_id)
        _check_xattr_namespace(name)
        if self._surely_without_xattrs(inode.id):
            raise FUSEError(pyfuse3.ENOATTR)
        name_ct = self.names.encrypt_xattr_name(inode.id, name)
        xattrs = self.md.xattrs_of(inode)
        value = xattrs.get(name_ct)
        if value is None:
            if not xattrs:
                self._without_xattrs.add(inode.id)
            raise FUSEError(pyfuse3.ENOATTR)
        return self.names.decrypt_xattr_value(inode.id, name_ct, value)

    def _surely_without_xattrs(self, inode_id: int) -> bool:
        """Whether the daemon knows, without a query, that the inode has no xattrs."""
        if inode_id in self._without_xattrs:
            return True
        return self._xattr_inodes is not None and inode_id not in self._xattr_inodes

    @handler(reads=True)
    async def listxattr(self, inode_id: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        inode = self._inode(inode_id)
        names = [self.names.decrypt_xattr_name(inode.id, n) for n in self.md.xattrs_of(inode)]
        if ctx.uid != 0:  # as the kernel does for local filesystems: trusted.* is for CAP_SYS_ADMIN
            names = [name for name in names if not name.startswith(b"trusted.")]
        return names

    @handler(frees_space=True)
    async def removexattr(self, inode_id: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        inode = self._xattr_inode(inode_id, name)
        with self._transaction():
            if not self.md.remove_xattr(inode, self.names.encrypt_xattr_name(inode.id, name)):
                raise FUSEError(pyfuse3.ENOATTR)
            inode.ctime_ns = _now()
            self._save(inode)

    # -- shutdown --------------------------------------------------------------

    def destroy(self) -> None:
        """After the session ends: close files, forget what the kernel held, sync."""
        self.replies_sent()
        self._drop_prepared()
        for open_file in self._open.values():
            open_file.data.close()
        self._open.clear()
        self._handles.clear()
        held = list(self._lookups)
        self._lookups.clear()
        for inode_id in held:
            try:
                self._maybe_delete(inode_id)
            except Exception:
                log.exception("cleaning inode %d at unmount", inode_id)
        try:
            self._write_deferred()
            self._save_atimes()
            self.md.sync()
        finally:
            # pyfuse3 keeps this object in a module global after the session: drop
            # the key material it reaches now rather than at process exit.
            self.names.close()
            self._inodes.clear()


@dataclass
class FileAhead:
    """The next file `create` makes, prepared ahead: its inode id, the key
    version its key is prefetched for, and once made its data file (`fd`) and
    its cipher."""

    inode_id: int
    key_version: int
    fd: int | None = None
    cipher: BlockCipher | None = None
    at: float = field(default_factory=time.monotonic)


def delete_inode(store: Store, metadata: Metadata, inode: Inode, *, xattrs: bool = True) -> None:
    """Remove an unlinked inode's rows, and its data file once that is committed;
    `xattrs` False: the caller knows the inode has none."""
    metadata.delete_inode(inode.id, symlink=stat.S_ISLNK(inode.mode), xattrs=xattrs)
    if stat.S_ISREG(inode.mode):
        metadata.after_commit(functools.partial(store.remove_data_file, inode.id, inode.key_version, inode.key_epoch))
