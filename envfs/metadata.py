"""The metadata database: SQLite schema, row MACs, typed accessors.

`create_schema` is the canonical reference for the tables; docs/FORMAT.md
repeats it with the exact MAC inputs. Every inode row and every directory
entry carries an HMAC-SHA256 under the store's metadata MAC key, checked
whenever a row is read; names, symlink targets and xattrs are AES-SIV
ciphertexts (see `names`) and authenticate themselves.

The database runs in WAL mode with synchronous=NORMAL: every transaction is
atomic and survives a crash of the daemon once committed; `sync()` commits
and makes everything committed durable against power loss (fsync, unmount).
While mounted, changes are grouped into one transaction per ~0.1 s
(`group_commits`).
"""

from __future__ import annotations

import errno
import logging
import operator
import os
import sqlite3
import stat
import struct
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from hmac import compare_digest
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import hmac

from .errors import CorruptStore, IntegrityError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# Group commits: at most this long, or this many changed rows, between commits.
# A commit writes the changed pages to the WAL; a group of GROUP_CHANGES rows
# stays well inside the store's space reserve (store.RESERVE_BYTES).
GROUP_SECONDS = 0.1
GROUP_CHANGES = 256
ROOT_INODE = 1
MAC_SIZE = 32
# The setting that names the key version of the rows' MACs and names (FORMAT.md 5.2).
_ROWS_KEY_VERSION = "metadata_key_version"
# Rows read per query by the whole-store passes.
_SCAN_BATCH = 1024
_XATTRS_AFTER = "SELECT rowid, inode, name, value FROM xattrs WHERE rowid>? ORDER BY rowid LIMIT ?"
_S_IFMT = 0o170000  # the file type bits of st_mode


def create_schema(db: sqlite3.Connection) -> None:
    """Create the tables of a new store (schema version 2)."""
    db.executescript(
        """
        BEGIN;
        -- One row per file, directory, symlink, device, FIFO or socket.
        -- id: the inode id, never used twice, not even after its inode is
        --   deleted: it is st_ino and part of the HKDF info of the file's data
        --   key. A new id is above both max(id) and sqlite_sequence's seq for
        --   this table (which AUTOINCREMENT keeps at the highest id ever
        --   inserted); ids may be inserted out of order. The root directory is 1.
        -- mode, uid, gid, nlink, rdev: as in struct stat. nlink counts the
        --   directory entries naming the inode (plus '.' and subdirectories'
        --   '..' for directories); 0 marks an orphan that is deleted on the
        --   last close, or at the next mount after a crash.
        -- size: the plaintext size in bytes; the data file must hold it.
        -- atime_ns, mtime_ns, ctime_ns: nanoseconds since the epoch.
        -- key_version: the master key version the data key derives from.
        -- key_epoch: bumped on every re-key of the file; part of the data
        --   key's HKDF info and of the data file's name.
        -- block_writes: blocks encrypted under the current (version, epoch);
        --   the nonce bound re-keys the file before it gets too large.
        -- mac: HMAC-SHA256 over all the other columns (FORMAT.md, "inode MAC").
        -- entries: a directory's entry set digest, sealed (48 bytes; FORMAT.md,
        --   "entry set digest"); NULL for an empty directory and for
        --   everything that is not a directory.
        -- xattrs: the digest of the inode's xattr rows, sealed likewise
        --   (FORMAT.md, "xattr set digest"); NULL where it has none.
        -- entries and xattrs come last, as schema version 1's upgrade adds them.
        CREATE TABLE inodes (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            mode         INTEGER NOT NULL,
            uid          INTEGER NOT NULL,
            gid          INTEGER NOT NULL,
            nlink        INTEGER NOT NULL,
            rdev         INTEGER NOT NULL,
            size         INTEGER NOT NULL,
            atime_ns     INTEGER NOT NULL,
            mtime_ns     INTEGER NOT NULL,
            ctime_ns     INTEGER NOT NULL,
            key_version  INTEGER NOT NULL,
            key_epoch    INTEGER NOT NULL,
            block_writes INTEGER NOT NULL,
            mac          BLOB NOT NULL,
            entries      BLOB,
            xattrs       BLOB
        );

        -- One row per name in a directory.
        -- id: AUTOINCREMENT; readdir offsets are entry ids, so a listing
        --   stays stable while entries are added or removed.
        -- name: the AES-SIV ciphertext of the name, bound to parent.
        -- mac: HMAC-SHA256 over (parent, inode, name) (FORMAT.md).
        CREATE TABLE dentries (
            id     INTEGER PRIMARY KEY AUTOINCREMENT,
            parent INTEGER NOT NULL,
            name   BLOB NOT NULL,
            inode  INTEGER NOT NULL,
            mac    BLOB NOT NULL,
            UNIQUE (parent, name)
        );
        CREATE INDEX dentries_by_inode ON dentries (inode);
        -- A directory's entries in listing order (readdir, `next_file`).
        CREATE INDEX dentries_in_order ON dentries (parent, id);

        -- Symlink targets: AES-SIV ciphertext bound to the inode.
        CREATE TABLE symlinks (
            inode  INTEGER PRIMARY KEY,
            target BLOB NOT NULL
        );

        -- Extended attributes: AES-SIV name bound to the inode, AES-SIV value
        -- bound to inode and encrypted name.
        CREATE TABLE xattrs (
            inode INTEGER NOT NULL,
            name  BLOB NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (inode, name)
        );

        -- Store-wide settings; 'schema_version' = 2.
        CREATE TABLE settings (
            name  TEXT PRIMARY KEY,
            value
        );
        """
        f"INSERT INTO settings (name, value) VALUES ('schema_version', {SCHEMA_VERSION});"
        "COMMIT;"
    )


@dataclass(slots=True)
class Inode:
    """One inode row (without its MAC)."""

    id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    key_version: int
    key_epoch: int
    block_writes: int
    # A directory's entry set digest (`Metadata.add_entry` keeps it), and the
    # digest of the inode's xattrs (`Metadata.set_xattr`), in the clear: sealed
    # when the row is written, opened when it is read. 0 for none.
    entries: int = 0
    xattrs: int = 0


_INODE_COLUMNS = [f.name for f in fields(Inode)]
_INODE_PACK = struct.Struct(">QIIIQQqqqqIIQ")
_DENTRY_PREFIX = struct.Struct(">QQ")
_INODE_MAC_PREFIX = b"envfs inode v2\x00"
_INODE_MAC_PREFIX_V1 = b"envfs inode v1\x00"
_DENTRY_MAC_PREFIX = b"envfs dentry v1\x00"
_ELEMENT_PREFIX = b"envfs entry element v1\x00"
_SEAL_PREFIX = b"envfs entry set seal v1\x00"
_XATTR_ELEMENT_PREFIX = b"envfs xattr element v1\x00"
_XATTR_SEAL_PREFIX = b"envfs xattr set seal v1\x00"
_XATTR_NAME_LENGTH = struct.Struct(">QI")
_SEAL_NONCE_SIZE = 16
SEALED_DIGEST_SIZE = _SEAL_NONCE_SIZE + MAC_SIZE
# An inode's column values in _INODE_COLUMNS order, as one tuple.
inode_values = operator.attrgetter(*_INODE_COLUMNS)


def restore_inode(inode: Inode, values: tuple[int, ...]) -> None:
    """Put back the values `inode_values` took of an inode (same id)."""
    for column, value in zip(_INODE_COLUMNS, values, strict=True):
        setattr(inode, column, value)


# Queries of `Metadata.next_file`: where an inode is listed (its first entry,
# for a hard link), and a directory's entries in listing order after an entry
# id, with what the walk and a key derivation need of their inodes.
_ENTRY_OF_INODE = "SELECT parent, id FROM dentries WHERE inode=? ORDER BY id LIMIT 1"
_ENTRIES_AFTER = (
    "SELECT d.id, d.inode, i.mode, i.key_version, i.key_epoch FROM dentries d "
    "JOIN inodes i ON i.id=d.inode WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?"
)
# An inode row's columns in a query that joins `inodes i`.
_INODE_FIELDS = ", ".join(f"i.{c}" for c in _INODE_COLUMNS) + ", i.mac"
_GET_INODE = f"SELECT {_INODE_FIELDS} FROM inodes i WHERE i.id=?"
_SET_DIGESTS = "UPDATE inodes SET entries=?, xattrs=?, mac=? WHERE id=?"
_INSERT_INODE = (
    f"INSERT INTO inodes ({', '.join(_INODE_COLUMNS)}, mac) VALUES ({', '.join('?' * len(_INODE_COLUMNS))}, ?)"
)
_SAVE_INODE = f"UPDATE inodes SET {', '.join(f'{c}=?' for c in _INODE_COLUMNS[1:])}, mac=? WHERE id=?"
# A directory entry with its inode row (None columns if the row is missing).
_ENTRY_AND_INODE = (
    f"SELECT d.id, d.parent, d.name, d.inode, d.mac, {_INODE_FIELDS} "
    "FROM dentries d LEFT JOIN inodes i ON i.id=d.inode "
)


# How many entries of a directory the walk reads per query.
WALK_READ_AHEAD = 32


class WalkFrame(NamedTuple):
    """A directory the walk of `Metadata.next_file` is in: the entry it reached,
    and the entries after it that it read ahead (all there are, if `complete`)."""

    parent: int
    after: int
    ahead: tuple[tuple[int, int, int, int, int], ...] = ()
    complete: bool = False


# Where a depth-first walk in listing order stands: the frame of the entry it
# reached, after those of the directories above it that it went down through.
WalkPosition = tuple[WalkFrame, ...]


class NextFile(NamedTuple):
    """A file `Metadata.next_file` reached: what deriving its key needs, as stored (unauthenticated)."""

    id: int
    key_version: int
    key_epoch: int


@dataclass(slots=True)
class Dentry:
    id: int
    parent: int
    name: bytes  # ciphertext
    inode: int


class Metadata:
    """Typed access to meta.db; every row read is authenticated."""

    def __init__(
        self, path: str | os.PathLike[str], mac: hmac.HMAC, *, create: bool = False, read_only: bool = False
    ) -> None:
        """Open meta.db (`create`: make it). `read_only`: for a store on a
        read-only filesystem, opened as immutable (no locks, no -shm); a -wal
        file that a crash left unmerged is not read then."""
        self._macs = _RowMacs(mac)
        self._depth = 0
        self._statements_left: int | None = None  # inside a one-statement transaction
        self._grouping = False
        self._group_open = False
        self._group_started = 0.0
        self._group_changes = 0
        self._after_commit: list[Callable[[], None]] = []
        self._next_inode_id: int | None = None
        # Under group commits, new inodes whose rows wait for the group's
        # commit (`create_inode`), by id, as `inode_values`; and, while a
        # transaction runs, how to put that back if it fails.
        self._unwritten: dict[int, tuple[int, ...]] = {}
        self._unwritten_undo: list[tuple[int, tuple[int, ...] | None]] = []
        # Set while meta.db is frozen (`freeze`): called before the next change.
        self._on_change: Callable[[], None] | None = None
        self._last_change = time.monotonic()
        if not create and not os.path.exists(path):
            raise CorruptStore(f"{path}: metadata database missing")
        try:
            if read_only:
                uri = "file:" + urllib.parse.quote(os.fspath(path)) + "?immutable=1"
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            if create:
                create_schema(self.db)
            version = self.db.execute("SELECT value FROM settings WHERE name='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            if "full" in str(e):
                raise OSError(errno.ENOSPC, f"{path}: no space left for the metadata database") from e
            raise CorruptStore(f"{path}: metadata database unreadable: {e}") from e
        if version is None or version[0] not in (1, SCHEMA_VERSION):
            raise CorruptStore(f"{path}: unknown metadata schema version {version}")
        # 1: a store made before directories had entry set digests; `upgrade`
        # makes it 2, and nothing reads its rows before.
        self.schema_version: int = version[0]
        self._path = os.fspath(path)
        self._read_only = read_only
        if not create and not read_only:
            self._add_missing_indexes()

    def _add_missing_indexes(self) -> None:
        """Indexes are for speed only: a store made before one existed gets it here."""
        try:
            self.db.execute("CREATE INDEX IF NOT EXISTS dentries_in_order ON dentries (parent, id)")
        except sqlite3.OperationalError as e:  # a full disk, a read-only store: slower, not wrong
            log.warning("metadata: index dentries_in_order not created: %s", e)

    def upgrade(self) -> None:
        """Bring a schema version 1 database to version 2, in one transaction:
        every directory gets the digest of its entries, every inode the
        digest of its xattr rows, and every inode row the MAC that covers
        them, under this object's key (the key the rows are under). A row or
        entry that fails its version 1 MAC stays as it is, failing, and is
        left out of its directory's digest; fsck reports it. xattr rows are
        taken as they are: they authenticate when they are decrypted."""
        if self.schema_version == SCHEMA_VERSION:
            return
        if self._read_only:
            raise CorruptStore(
                f"{self._path}: metadata schema version 1 is upgraded at the first mount, which needs the store "
                "writable; mount it once where it is"
            )
        digests: defaultdict[int, int] = defaultdict(int)
        xattr_digests: defaultdict[int, int] = defaultdict(int)
        with self.transaction():
            self.db.execute("ALTER TABLE inodes ADD COLUMN entries BLOB")
            self.db.execute("ALTER TABLE inodes ADD COLUMN xattrs BLOB")
            for entry, valid in self.scan_entries():
                if valid:
                    digests[entry.parent] ^= self.entry_element(entry)
            for inode_id, name, value in self.scan_xattrs():
                xattr_digests[inode_id] ^= self.xattr_element(inode_id, name, value)
            for row in self._batches(f"SELECT {_INODE_FIELDS} FROM inodes i WHERE i.id>? ORDER BY i.id LIMIT ?"):
                inode = Inode(*row[:-3])
                if not _mac_matches(lambda inode=inode: self._macs.inode_v1(inode), row[-1]):
                    log.warning("metadata upgrade: inode %d fails its MAC; left as it is", inode.id)
                    continue
                inode.entries, inode.xattrs = digests[inode.id], xattr_digests[inode.id]
                self._set_digests(self._macs, inode)
            self.db.execute("UPDATE settings SET value=? WHERE name='schema_version'", (SCHEMA_VERSION,))
        self.schema_version = SCHEMA_VERSION
        log.info("metadata: upgraded from schema version 1 to %d (entry set digests)", SCHEMA_VERSION)

    def close(self) -> None:
        self.db.close()
        # The keyed HMAC contexts go with the database.
        self._macs = None  # type: ignore[assignment]

    @contextmanager
    def transaction(self, *, one_statement: bool = False) -> Iterator[None]:
        """Changes that take effect together or not at all; nested uses join the outer one.

        Under group commits this is a savepoint inside the group transaction:
        a failing request undoes its own changes and no one else's. With
        `one_statement` the caller runs at most one changing statement, which
        SQLite applies whole or not at all: under group commits no savepoint
        is needed (two statements fewer for an unlink); a second one raises.
        Nothing after that statement may fail: if something does, the whole
        group is rolled back, since the statement cannot be taken back alone.
        """
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        grouped = self._grouping
        if grouped and one_statement:
            self._begin_group()
            self._statements_left = 1
            try:
                yield
            except BaseException:
                if self._statements_left == 0 and self.db.in_transaction:
                    # Its statement ran, and no savepoint can take it back alone:
                    # the group goes back to its last commit, as after an error
                    # that SQLite rolls back itself (`group_rolled_back`), rather
                    # than keep a row whose other half the caller undoes.
                    log.error("metadata: a request failed after its change; the group goes back to the last commit")
                    self.db.execute("ROLLBACK")
                self._undo_unwritten()
                raise
            finally:
                self._depth = 0
                self._statements_left = None
                self._unwritten_undo.clear()
            return
        if grouped:
            self._begin_group()
            self.db.execute("SAVEPOINT request")
        else:
            self._before_change()
            self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK TO request" if grouped else "ROLLBACK")
                if grouped:
                    self.db.execute("RELEASE request")
            self._undo_unwritten()
            raise
        else:
            self.db.execute("RELEASE request" if grouped else "COMMIT")
        finally:
            self._depth = 0
            self._unwritten_undo.clear()

    def _change(self, sql: str, parameters: tuple[object, ...]) -> sqlite3.Cursor:
        """Run a statement that changes the database."""
        if self._statements_left is not None:
            if not self._statements_left:
                raise AssertionError("a second statement in a one-statement transaction")
            self._statements_left -= 1
        if self._grouping:
            self._begin_group()
            self._group_changes += 1
        elif not self.db.in_transaction:
            self._before_change()
        return self.db.execute(sql, parameters)

    # -- new inodes' rows, written with the group ------------------------------

    def _set_unwritten(self, inode_id: int, values: tuple[int, ...] | None) -> None:
        """Record (None: drop) the values an unwritten inode's row is to get."""
        if self._depth:
            self._unwritten_undo.append((inode_id, self._unwritten.get(inode_id)))
        if values is None:
            self._unwritten.pop(inode_id, None)
        else:
            self._unwritten[inode_id] = values

    def _undo_unwritten(self) -> None:
        """A transaction failed: its changes to the unwritten inodes go, as its rows did."""
        for inode_id, values in reversed(self._unwritten_undo):
            if values is None:
                self._unwritten.pop(inode_id, None)
            else:
                self._unwritten[inode_id] = values
        self._unwritten_undo.clear()

    def _write_unwritten(self) -> None:
        """Insert the rows of the unwritten inodes: before a query reads the
        inodes table, and at the commit. One statement for all of them, and
        all or none (a savepoint): a failure leaves them to the next try."""
        if not self._unwritten:
            return
        if self.group_rolled_back():  # SQLite dropped the group they belong to
            self._unwritten.clear()
            return
        if self._statements_left is not None:
            raise AssertionError("inode rows written inside a one-statement transaction")
        rows = [(inode_id, *self._sealed_row(Inode(*values))) for inode_id, values in self._unwritten.items()]
        self.db.execute("SAVEPOINT unwritten")
        try:
            self.db.executemany(_INSERT_INODE, rows)
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK TO unwritten")
                self.db.execute("RELEASE unwritten")
            raise
        self.db.execute("RELEASE unwritten")
        if self._depth:  # a rollback of the transaction takes the rows out again
            self._unwritten_undo.extend(self._unwritten.items())
        self._unwritten.clear()

    # -- group commits -------------------------------------------------------

    def group_commits(self) -> None:
        """From now on, collect changes in one transaction until `commit`.

        A commit per change costs more than most changes themselves. The
        daemon commits every GROUP_SECONDS at the latest, and at once where
        the order of writes matters (`after_commit`, `sync`). A crash of the
        daemon loses at most the changes since the last commit, never
        consistency: the database is always left in a committed state.
        """
        self._grouping = True

    def _begin_group(self) -> None:
        if self._group_open and not self.db.in_transaction:
            self._group_lost("SQLite rolled the transaction back after an error")
        if not self._group_open:
            self._before_change()
            self.db.execute("BEGIN IMMEDIATE")
            self._group_started = time.monotonic()
            self._group_changes = 0
            self._group_open = True

    def commit_due(self) -> bool:
        return self._group_open and (
            self._group_changes >= GROUP_CHANGES or time.monotonic() - self._group_started >= GROUP_SECONDS
        )

    def commit(self) -> None:
        """Commit the group transaction, then run what waited for it.

        SQLite rolls the whole transaction back when its commit fails (on a
        full disk among other causes; measured): the group's changes are then
        lost, the actions waiting for them are dropped, and the error raised.
        """
        if self._depth:
            raise AssertionError("commit inside a transaction")
        if self._group_open:
            try:
                if not self.db.in_transaction:
                    raise sqlite3.OperationalError("SQLite rolled the transaction back after an error")
                self._write_unwritten()
                self.db.execute("COMMIT")
            except sqlite3.Error as e:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                self._group_lost(str(e))
                raise
            self._group_open = False
            self._last_change = time.monotonic()
        actions, self._after_commit = self._after_commit, []
        for action in actions:
            try:
                action()
            except Exception:
                # What waits for a commit is cleanup (a data file to remove); a
                # failure leaves a leftover for the next mount, not a reason to
                # fail the request that happened to trigger the commit.
                log.exception("metadata: after commit")

    def group_rolled_back(self) -> bool:
        """Whether SQLite rolled the open group transaction back on its own
        (after an error such as a full disk): its changes are gone."""
        return self._group_open and not self.db.in_transaction

    def abandon_group(self) -> None:
        """Roll the open group transaction back, for a caller that failed while
        writing it and drops what it kept in memory: the database goes back to
        the last commit with it."""
        if self._group_open:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self._group_lost("writing the group failed")

    def _group_lost(self, why: str) -> None:
        log.error("metadata: %d changes since the last commit are lost: %s", self._group_changes, why)
        self._group_open = False
        self._after_commit.clear()
        self._unwritten.clear()

    def actions_waiting(self) -> bool:
        """Whether actions wait for the next commit (`after_commit`)."""
        return bool(self._after_commit)

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run `action` once the changes made so far are committed (at once if they are)."""
        if self._group_open:
            self._after_commit.append(action)
        else:
            action()

    def quiet_for(self) -> float:
        """Seconds since the last commit; 0 while changes wait for one."""
        if self._group_open or self._after_commit or self._depth:
            return 0.0
        return time.monotonic() - self._last_change

    def freeze(self, on_change: Callable[[], None]) -> bool:
        """Merge every committed change into meta.db (nothing left in its -wal
        file) and keep the file as it is: the next change first calls
        `on_change`. Until then a write that does not come through this class
        fails (PRAGMA query_only) rather than change a file that is meant to
        stay still. False if it cannot be done now (changes wait for a commit,
        or a reader holds the -wal file)."""
        if self._on_change is not None:
            return True
        if self.quiet_for() == 0.0:
            return False
        busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            return False
        self.db.execute("PRAGMA query_only=1")
        self._on_change = on_change
        return True

    def _before_change(self) -> None:
        """Before the first change of a frozen meta.db: its `on_change`, then thaw."""
        if self._on_change is None:
            return
        on_change = self._on_change
        on_change()
        self._on_change = None
        self.db.execute("PRAGMA query_only=0")

    def sync(self) -> None:
        """Commit, and make every committed transaction durable (fsync of WAL and database)."""
        self.commit()
        self.db.execute("PRAGMA wal_checkpoint(FULL)")

    def get_setting(self, name: str) -> object:
        row = self.db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def set_setting(self, name: str, value: object) -> None:
        self._change("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (name, value))

    # -- MACs --------------------------------------------------------------

    def inode_mac(self, inode: Inode, entries: bytes | None, xattrs: bytes | None) -> bytes:
        """The MAC of an inode's row whose `entries` and `xattrs` columns hold these sealed digests."""
        return self._macs.inode(inode, entries, xattrs)

    def dentry_mac(self, parent: int, inode: int, name: bytes) -> bytes:
        return self._macs.dentry(parent, inode, name)

    # -- inodes ------------------------------------------------------------

    def get_inode(self, inode_id: int) -> Inode | None:
        self._write_unwritten()
        row = self.db.execute(_GET_INODE, (inode_id,)).fetchone()
        return None if row is None else self._inode(row)

    def _inode(self, row: tuple[Any, ...]) -> Inode:
        """An inode from its row's columns (`_INODE_FIELDS`), authenticated."""
        entries, xattrs = row[-3], row[-2]
        inode = Inode(*row[:-3])
        if not _mac_matches(lambda: self.inode_mac(inode, entries, xattrs), row[-1]):
            raise IntegrityError(f"inode {inode.id}: metadata MAC mismatch")
        inode.entries = self._macs.entries_seal.open(inode.id, entries)
        inode.xattrs = self._macs.xattrs_seal.open(inode.id, xattrs)
        return inode

    def _set_digests(self, macs: _RowMacs, inode: Inode) -> None:
        """Write an inode's digests, sealed, and its MAC under `macs` (the upgrade, a rotation)."""
        self._write_unwritten()
        entries, xattrs = macs.sealed_digests(inode)
        self.db.execute(_SET_DIGESTS, (entries, xattrs, macs.inode(inode, entries, xattrs), inode.id))

    def _sealed_row(self, inode: Inode) -> tuple[Any, ...]:
        """What an inode's row stores after its id: its columns, the sealed digests, the MAC."""
        entries, xattrs = self._macs.sealed_digests(inode)
        return (*inode_values(inode)[1:-2], entries, xattrs, self.inode_mac(inode, entries, xattrs))

    def allocate_inode_id(self) -> int:
        """A fresh inode id: above every id this database has ever held.

        Ids are handed out here rather than by the INSERT so that a new file's
        key can be derived before its row exists. An id handed out and never
        inserted is skipped; AUTOINCREMENT's sqlite_sequence keeps the highest
        id inserted, so no id is used twice, across mounts and crashes alike.
        """
        if self._next_inode_id is None:
            row = self.db.execute(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name='inodes'), 0), "
                "coalesce((SELECT max(id) FROM inodes), 0))"
            ).fetchone()
            self._next_inode_id = int(row[0]) + 1
        inode_id = self._next_inode_id
        self._next_inode_id += 1
        return inode_id

    def create_inode(self, inode_id: int | None = None, **values: int) -> Inode:
        """Insert a new inode under `inode_id` (from `allocate_inode_id`) or a fresh id.

        Under group commits its row is written with the group instead (or
        before a query reads the inodes table): most new inodes change again
        before the commit (a write, a chmod, a new entry in a new directory),
        and a row written once, with its MAC, costs half of an insert now
        and an update at the commit. It takes no statement in a transaction.
        """
        inode = Inode(id=self.allocate_inode_id() if inode_id is None else inode_id, **values)
        if self._grouping:
            self._begin_group()
            self._group_changes += 1
            self._set_unwritten(inode.id, inode_values(inode))
        else:
            self._change(_INSERT_INODE, (inode.id, *self._sealed_row(inode)))
        return inode

    def save_inode(self, inode: Inode) -> None:
        if inode.id in self._unwritten:
            self._set_unwritten(inode.id, inode_values(inode))
        else:
            self._change(_SAVE_INODE, (*self._sealed_row(inode), inode.id))

    def save_values(self, values: tuple[int, ...]) -> None:
        """`save_inode` of an inode given as its `inode_values`."""
        self.save_inode(Inode(*values))

    def delete_inode(self, inode_id: int, *, symlink: bool = True, xattrs: bool = True) -> None:
        """Delete an inode's rows; `symlink` or `xattrs` False: the caller knows it has none of those."""
        with self.transaction(one_statement=not symlink and not xattrs):
            if inode_id in self._unwritten:
                self._set_unwritten(inode_id, None)
            else:
                self._change("DELETE FROM inodes WHERE id=?", (inode_id,))
            if symlink:
                self._change("DELETE FROM symlinks WHERE inode=?", (inode_id,))
            if xattrs:
                self._change("DELETE FROM xattrs WHERE inode=?", (inode_id,))

    def orphans(self) -> list[int]:
        self._write_unwritten()
        return [row[0] for row in self.db.execute("SELECT id FROM inodes WHERE nlink=0")]

    def all_inode_ids(self) -> list[int]:
        self._write_unwritten()
        return [row[0] for row in self.db.execute("SELECT id FROM inodes ORDER BY id")]

    def counts(self) -> dict[str, int]:
        self._write_unwritten()
        inodes = self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM inodes").fetchone()
        return {"inodes": inodes[0], "bytes": inodes[1]}

    # -- directory entries -------------------------------------------------

    def _dentry(self, row: tuple[int, int, bytes, int, bytes]) -> Dentry:
        entry = Dentry(row[0], row[1], row[2], row[3])
        if not _mac_matches(lambda: self.dentry_mac(entry.parent, entry.inode, entry.name), row[4]):
            raise IntegrityError(f"directory {entry.parent}: entry {entry.id} MAC mismatch")
        return entry

    def lookup(self, parent: int, name: bytes) -> Dentry | None:
        row = self.db.execute(
            "SELECT id, parent, name, inode, mac FROM dentries WHERE parent=? AND name=?", (parent, name)
        ).fetchone()
        return None if row is None else self._dentry(row)

    def lookup_with_inode(
        self, parent: int, name: bytes, known: Mapping[int, Inode]
    ) -> tuple[Dentry, Inode | None] | None:
        """`lookup` and the entry's inode in one query; an inode in `known` is taken from there."""
        self._write_unwritten()
        row = self.db.execute(_ENTRY_AND_INODE + "WHERE d.parent=? AND d.name=?", (parent, name)).fetchone()
        return None if row is None else self._entry_and_inode(row, known)

    def entries_with_inodes(
        self, parent: int, after_id: int, limit: int, known: Mapping[int, Inode]
    ) -> list[tuple[Dentry, Inode | None]]:
        """A directory's entries after `after_id` in listing order, with their inodes,
        in one query; inodes in `known` are taken from there."""
        self._write_unwritten()
        rows = self.db.execute(
            _ENTRY_AND_INODE + "WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?", (parent, after_id, limit)
        ).fetchall()
        return [self._entry_and_inode(row, known) for row in rows]

    def _entry_and_inode(self, row: tuple[Any, ...], known: Mapping[int, Inode]) -> tuple[Dentry, Inode | None]:
        entry = self._dentry(row[:5])
        inode = known.get(entry.inode)
        if inode is None and row[5] is not None:
            inode = self._inode(row[5:])
        return entry, inode

    def next_file(
        self, inode_id: int, walk: WalkPosition = (), max_steps: int = 16
    ) -> tuple[NextFile, WalkPosition] | None:
        """The regular file after `inode_id` in a depth-first walk of the tree
        in listing order, the order in which find, tar, cp -r and md5sum of
        `find` visit files, with the walk's position at it; None if there is
        none within `max_steps` entries.

        `walk` is the position this method returned with `inode_id`, if it
        did: the walk then goes on from there without looking up where
        `inode_id` and the directories above it are listed, and takes the
        entries it read ahead there: a query per WALK_READ_AHEAD entries of
        a directory, not one per step. Nothing the walk reads is
        authenticated, the file found included: it is a guess at what is
        opened next (a stale position or an edited row just guesses wrong),
        and a key derived ahead is only used by an open whose own,
        authenticated inode has the same id, key version and key epoch.
        """
        self._write_unwritten()
        frames = list(walk)
        if not frames:
            entry = self.db.execute(_ENTRY_OF_INODE, (inode_id,)).fetchone()
            if entry is None:
                return None
            frames.append(WalkFrame(*entry))
        for _ in range(max_steps):
            frame = frames[-1]
            if not frame.ahead and not frame.complete:
                rows = self.db.execute(_ENTRIES_AFTER, (frame.parent, frame.after, WALK_READ_AHEAD)).fetchall()
                frame = WalkFrame(frame.parent, frame.after, tuple(rows), len(rows) < WALK_READ_AHEAD)
            if not frame.ahead:  # up a level
                frames.pop()
                if not frames:
                    entry = self.db.execute(_ENTRY_OF_INODE, (frame.parent,)).fetchone()
                    if entry is None:
                        return None
                    frames.append(WalkFrame(*entry))
                continue
            entry_id, child, mode, key_version, key_epoch = frame.ahead[0]
            frames[-1] = WalkFrame(frame.parent, entry_id, frame.ahead[1:], frame.complete)
            if stat.S_ISREG(mode):
                return NextFile(child, key_version, key_epoch), tuple(frames)
            if stat.S_ISDIR(mode):
                frames.append(WalkFrame(child, 0))  # down
        return None

    def has_entries(self, parent: int) -> bool:
        return self.db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (parent,)).fetchone() is not None

    def add_entry(self, parent: Inode, name: bytes, inode: int) -> bool:
        """Add an entry; False, and nothing added, if `parent` holds the name already.

        The unique index answers whether the name is taken, so that creating
        a name costs no query before the insert. The entry joins `parent`'s
        entry set digest, which the caller saves with the rest of `parent`.
        """
        cursor = self._change(
            "INSERT OR IGNORE INTO dentries (parent, name, inode, mac) VALUES (?, ?, ?, ?)",
            (parent.id, name, inode, self.dentry_mac(parent.id, inode, name)),
        )
        if cursor.rowcount != 1:
            return False
        parent.entries ^= self._macs.element(parent.id, inode, name)
        return True

    def remove_entry(self, parent: Inode, name: bytes, inode: int) -> None:
        """Remove the entry `name` of `parent`, which names `inode` (the caller looked it up,
        in the database or in what it remembers of it)."""
        # Not DELETE ... RETURNING in place of the caller's lookup: measured slower
        # than a SELECT and a DELETE (12.0 against 11.2 µs on tmpfs).
        if self._change("DELETE FROM dentries WHERE parent=? AND name=?", (parent.id, name)).rowcount != 1:
            # Nothing was deleted: the directory's digest must not change either.
            raise IntegrityError(f"directory {parent.id}: the entry of inode {inode} to remove is not there")
        parent.entries ^= self._macs.element(parent.id, inode, name)

    def repoint_entry(self, parent: Inode, name: bytes, old_inode: int, inode: int) -> None:
        """Make an existing entry, which names `old_inode`, name `inode` (rename over, exchange)."""
        self._change(
            "UPDATE dentries SET inode=?, mac=? WHERE parent=? AND name=?",
            (inode, self.dentry_mac(parent.id, inode, name), parent.id, name),
        )
        parent.entries ^= self._macs.element(parent.id, old_inode, name) ^ self._macs.element(parent.id, inode, name)

    def entry_element(self, entry: Dentry) -> int:
        """An entry's part of its directory's digest: the digest is the XOR of
        its entries' elements, so a listing that read them all can check it."""
        return self._macs.element(entry.parent, entry.inode, entry.name)

    @staticmethod
    def check_entries(directory: Inode, listed: int) -> None:
        """The digest of every entry of `directory` (the XOR of their elements)
        against the one its row records: an entry row deleted, added or put
        back behind envfs's back makes them differ."""
        if listed != directory.entries:
            raise IntegrityError(
                f"directory {directory.id}: its entries do not match its entry set digest "
                "(an entry was removed or added outside envfs)"
            )

    @staticmethod
    def _check_xattrs(inode: Inode, rows: int) -> None:
        """The digest of all of an inode's xattr rows against the one its row records."""
        if rows != inode.xattrs:
            raise IntegrityError(
                f"inode {inode.id}: its xattrs do not match their set digest (one was removed, added or put back "
                "outside envfs)"
            )

    def parent_of(self, inode: int) -> int | None:
        """The directory holding a directory (directories have one entry)."""
        row = self.db.execute(
            "SELECT id, parent, name, inode, mac FROM dentries WHERE inode=? LIMIT 1", (inode,)
        ).fetchone()
        return None if row is None else self._dentry(row).parent

    # -- symlinks and xattrs -----------------------------------------------

    def set_symlink(self, inode: int, target: bytes) -> None:
        self._change("INSERT OR REPLACE INTO symlinks (inode, target) VALUES (?, ?)", (inode, target))

    def get_symlink(self, inode: int) -> bytes | None:
        row = self.db.execute("SELECT target FROM symlinks WHERE inode=?", (inode,)).fetchone()
        return None if row is None else bytes(row[0])

    def _xattr_value(self, inode: int, name: bytes) -> bytes | None:
        row = self.db.execute("SELECT value FROM xattrs WHERE inode=? AND name=?", (inode, name)).fetchone()
        return None if row is None else bytes(row[0])

    def set_xattr(self, inode: Inode, name: bytes, value: bytes) -> None:
        """Set an xattr (ciphertexts); its row joins the inode's xattr set digest,
        which the caller saves with the rest of `inode`."""
        old = self._xattr_value(inode.id, name)
        self._change("INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?, ?, ?)", (inode.id, name, value))
        if old is not None:
            inode.xattrs ^= self._macs.xattr_element(inode.id, name, old)
        inode.xattrs ^= self._macs.xattr_element(inode.id, name, value)

    def remove_xattr(self, inode: Inode, name: bytes) -> bool:
        """Remove an xattr; False if the inode has none of that name."""
        old = self._xattr_value(inode.id, name)
        if old is None:
            return False
        self._change("DELETE FROM xattrs WHERE inode=? AND name=?", (inode.id, name))
        inode.xattrs ^= self._macs.xattr_element(inode.id, name, old)
        return True

    def xattrs_of(self, inode: Inode) -> dict[bytes, bytes]:
        """Every xattr of an inode, {name: value} (ciphertexts), checked against
        its xattr set digest: a row deleted, added or put back outside envfs is
        an integrity error. One query, as a single row's would be."""
        rows = self.db.execute("SELECT name, value FROM xattrs WHERE inode=?", (inode.id,)).fetchall()
        found = {bytes(name): bytes(value) for name, value in rows}
        digest = 0
        for name, value in found.items():
            digest ^= self._macs.xattr_element(inode.id, name, value)
        self._check_xattrs(inode, digest)
        return found

    def xattr_element(self, inode: int, name: bytes, value: bytes) -> int:
        """An xattr row's part of its inode's xattr set digest (XOR of them all)."""
        return self._macs.xattr_element(inode, name, value)

    def inodes_with_xattrs(self, limit: int) -> set[int] | None:
        """The ids of the inodes that have xattrs; None if there are more than `limit`."""
        rows = self.db.execute("SELECT DISTINCT inode FROM xattrs LIMIT ?", (limit + 1,)).fetchall()
        return None if len(rows) > limit else {row[0] for row in rows}

    # -- whole-store passes (fsck, rotate) -----------------------------------

    def rows_key_version(self) -> int:
        """The key version whose metadata MAC key and name key the rows are
        under: the setting `metadata_key_version`, 1 where it is absent."""
        value = self.get_setting(_ROWS_KEY_VERSION)
        if value is None:
            return 1
        if not isinstance(value, int) or value < 1:
            raise CorruptStore(f"metadata: setting {_ROWS_KEY_VERSION} is damaged ({value!r})")
        return value

    def _batches(self, sql: str, first: object = -1) -> Iterator[tuple[Any, ...]]:
        """Rows of `sql` (`... WHERE key > ? ORDER BY key LIMIT ?`, the key
        first in each row) batch by batch: the caller may change the rows seen."""
        after = first
        while True:
            rows = self.db.execute(sql, (after, _SCAN_BATCH)).fetchall()
            yield from rows
            if len(rows) < _SCAN_BATCH:
                return
            after = rows[-1][0]

    def scan_inodes(self) -> Iterator[tuple[int, Inode | None]]:
        """Every inode row in id order, with None for a row that fails its MAC."""
        self._write_unwritten()
        for row in self._batches(f"SELECT {_INODE_FIELDS} FROM inodes i WHERE i.id>? ORDER BY i.id LIMIT ?"):
            try:
                inode: Inode | None = self._inode(row)
            except IntegrityError:
                inode = None
            yield row[0], inode

    def scan_entries(self) -> Iterator[tuple[Dentry, bool]]:
        """Every directory entry in id order, and whether it passes its MAC."""
        for row in self._batches("SELECT id, parent, name, inode, mac FROM dentries WHERE id>? ORDER BY id LIMIT ?"):
            try:
                entry, valid = self._dentry(row), True
            except IntegrityError:
                entry, valid = Dentry(row[0], row[1], row[2], row[3]), False
            yield entry, valid

    def scan_symlinks(self) -> Iterator[tuple[int, bytes]]:
        """Every symlink row: (inode id, target ciphertext)."""
        for inode, target in self._batches("SELECT inode, target FROM symlinks WHERE inode>? ORDER BY inode LIMIT ?"):
            yield inode, bytes(target)

    def scan_xattrs(self) -> Iterator[tuple[int, bytes, bytes]]:
        """Every xattr row: (inode id, name ciphertext, value ciphertext)."""
        for _, inode, name, value in self._batches(_XATTRS_AFTER):
            yield inode, bytes(name), bytes(value)

    def files_not_under(self, key_version: int) -> list[int]:
        """Ids of the regular files whose data is under another key version
        (as stored, unauthenticated: the caller reads each row with `get_inode`)."""
        self._write_unwritten()
        rows = self.db.execute(
            "SELECT id FROM inodes WHERE key_version<>? AND (mode & ?)=? ORDER BY id",
            (key_version, _S_IFMT, stat.S_IFREG),
        )
        return [row[0] for row in rows]

    def has_files_under(self, key_version: int) -> bool:
        """Whether a regular file's data is under `key_version` (as stored). Only
        regular files have data; other inodes' key version means nothing."""
        self._write_unwritten()
        row = self.db.execute(
            "SELECT 1 FROM inodes WHERE key_version=? AND (mode & ?)=? LIMIT 1", (key_version, _S_IFMT, stat.S_IFREG)
        ).fetchone()
        return row is not None

    def rekey_rows(
        self, mac: hmac.HMAC, key_version: int, *, name: Callable[[int, bytes], bytes],
        target: Callable[[int, bytes], bytes], xattr: Callable[[int, bytes, bytes], tuple[bytes, bytes]],
    ) -> None:  # fmt: skip
        """Move every row to the metadata MAC key `mac` of `key_version`, in one
        transaction: inode and entry MACs and the entry and xattr set digests
        recomputed, entry names, symlink targets and xattrs replaced by what
        the callbacks give for their ciphertexts (re-encryption under the new
        name key). Every row and digest is authenticated under the current
        key first; `metadata_key_version` records the new version in the same
        transaction. Afterwards this object reads and writes under the new key."""
        self._write_unwritten()
        new = _RowMacs(mac)
        # Each digest twice: of the rows as they are, to check the stored one,
        # and under the new key, with the new ciphertexts, to store.
        old_digests: defaultdict[int, int] = defaultdict(int)
        new_digests: defaultdict[int, int] = defaultdict(int)
        old_xattrs: defaultdict[int, int] = defaultdict(int)
        new_xattrs: defaultdict[int, int] = defaultdict(int)
        with self.transaction():
            for entry, valid in self.scan_entries():
                if not valid:
                    raise IntegrityError(f"directory {entry.parent}: entry {entry.id} MAC mismatch")
                name_ct = name(entry.parent, entry.name)
                self.db.execute(
                    "UPDATE dentries SET name=?, mac=? WHERE id=?",
                    (name_ct, new.dentry(entry.parent, entry.inode, name_ct), entry.id),
                )
                old_digests[entry.parent] ^= self.entry_element(entry)
                new_digests[entry.parent] ^= new.element(entry.parent, entry.inode, name_ct)
            for rowid, inode_id, name_ct, value_ct in self._batches(_XATTRS_AFTER):
                old_xattrs[inode_id] ^= self.xattr_element(inode_id, name_ct, value_ct)
                new_name, new_value = xattr(inode_id, name_ct, value_ct)
                self.db.execute("UPDATE xattrs SET name=?, value=? WHERE rowid=?", (new_name, new_value, rowid))
                new_xattrs[inode_id] ^= new.xattr_element(inode_id, new_name, new_value)
            for inode_id, inode in self.scan_inodes():
                if inode is None:
                    raise IntegrityError(f"inode {inode_id}: metadata MAC mismatch")
                self.check_entries(inode, old_digests[inode.id])
                self._check_xattrs(inode, old_xattrs[inode.id])
                inode.entries, inode.xattrs = new_digests[inode.id], new_xattrs[inode.id]
                self._set_digests(new, inode)
            for inode_id, target_ct in self.scan_symlinks():
                self.db.execute("UPDATE symlinks SET target=? WHERE inode=?", (target(inode_id, target_ct), inode_id))
            self.db.execute(
                "INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (_ROWS_KEY_VERSION, key_version)
            )
        self._macs = new


class _RowMacs:
    """HMAC contexts of one metadata MAC key with each row kind's fixed prefix
    already hashed in: a row's MAC then costs one copy, one update and the finish.
    The same key gives the secret elements of the entry and xattr set digests
    and the pads that seal them (FORMAT.md, "entry set digest")."""

    def __init__(self, mac: hmac.HMAC) -> None:
        self._inode = _prefixed(mac, _INODE_MAC_PREFIX)
        self._inode_v1 = _prefixed(mac, _INODE_MAC_PREFIX_V1)
        self._dentry = _prefixed(mac, _DENTRY_MAC_PREFIX)
        self._element = _prefixed(mac, _ELEMENT_PREFIX)
        self._xattr_element = _prefixed(mac, _XATTR_ELEMENT_PREFIX)
        self.entries_seal = _Seal(_prefixed(mac, _SEAL_PREFIX))
        self.xattrs_seal = _Seal(_prefixed(mac, _XATTR_SEAL_PREFIX))

    def inode(self, inode: Inode, entries: bytes | None, xattrs: bytes | None) -> bytes:
        """The MAC of an inode's row; `entries`, `xattrs`: its sealed digest columns."""
        columns = _INODE_PACK.pack(*inode_values(inode)[:-2])
        return _finish(self._inode, columns + _optional(entries) + _optional(xattrs))

    def inode_v1(self, inode: Inode) -> bytes:
        """The MAC of schema version 1 (no digests), for the upgrade."""
        return _finish(self._inode_v1, _INODE_PACK.pack(*inode_values(inode)[:-2]))

    def sealed_digests(self, inode: Inode) -> tuple[bytes | None, bytes | None]:
        return self.entries_seal.seal(inode.id, inode.entries), self.xattrs_seal.seal(inode.id, inode.xattrs)

    def dentry(self, parent: int, inode: int, name: bytes) -> bytes:
        return _finish(self._dentry, _DENTRY_PREFIX.pack(parent, inode) + name)

    def element(self, parent: int, inode: int, name: bytes) -> int:
        """An entry's element of its directory's digest (never stored)."""
        return int.from_bytes(_finish(self._element, _DENTRY_PREFIX.pack(parent, inode) + name))

    def xattr_element(self, inode: int, name: bytes, value: bytes) -> int:
        """An xattr row's element of its inode's xattr digest (never stored)."""
        return int.from_bytes(_finish(self._xattr_element, _XATTR_NAME_LENGTH.pack(inode, len(name)) + name + value))


class _Seal:
    """Seals a digest for storage: a fresh nonce, and the digest XOR the pad
    HMAC(key, label || owner id || nonce); None for the digest 0."""

    def __init__(self, labelled: hmac.HMAC) -> None:
        self._labelled = labelled

    def _pad(self, owner: int, nonce: bytes) -> int:
        return int.from_bytes(_finish(self._labelled, struct.pack(">Q", owner) + nonce))

    def seal(self, owner: int, digest: int) -> bytes | None:
        if not digest:
            return None
        nonce = os.urandom(_SEAL_NONCE_SIZE)
        return nonce + (digest ^ self._pad(owner, nonce)).to_bytes(MAC_SIZE)

    def open(self, owner: int, sealed: bytes | None) -> int:
        if sealed is None:
            return 0
        if len(sealed) != SEALED_DIGEST_SIZE:
            raise IntegrityError(f"inode {owner}: sealed digest of {len(sealed)} bytes")
        return int.from_bytes(sealed[_SEAL_NONCE_SIZE:]) ^ self._pad(owner, sealed[:_SEAL_NONCE_SIZE])


def _prefixed(mac: hmac.HMAC, prefix: bytes) -> hmac.HMAC:
    h = mac.copy()
    h.update(prefix)
    return h


def _finish(prefixed: hmac.HMAC, message: bytes) -> bytes:
    """The HMAC of a prefixed context's label followed by `message`."""
    h = prefixed.copy()
    h.update(message)
    return h.finalize()


def _optional(sealed: bytes | None) -> bytes:
    """A sealed digest column in a MAC input: a length byte (0 for NULL), then its bytes."""
    return b"\x00" if sealed is None else bytes((len(sealed),)) + sealed


def _mac_matches(expected: Callable[[], bytes], stored: object) -> bool:
    """Whether a row's stored MAC is the one its values give. Values no row
    envfs writes can hold (an edited row: a string where a number belongs, a
    number out of its field's range) give no MAC, and so do not match."""
    try:
        mac = expected()
    except (struct.error, TypeError, OverflowError):
        return False
    return isinstance(stored, bytes) and compare_digest(mac, stored)
