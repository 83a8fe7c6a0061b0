"""The metadata database: SQLite schema, row MACs, typed accessors.

`create_schema` is the canonical reference for the tables; docs/FORMAT.md
repeats it with the exact MAC inputs. Every inode row and every directory
entry carries an HMAC-SHA256 under the store's metadata MAC key, checked
whenever a row is read; names, symlink targets and xattrs are AES-SIV
ciphertexts (see `names`) and authenticate themselves.

The database runs in WAL mode with synchronous=NORMAL: every transaction is
atomic and survives a crash of the daemon; `sync()` makes everything
committed so far durable against power loss (fsync, unmount).
"""

from __future__ import annotations

import os
import sqlite3
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from hmac import compare_digest

from cryptography.hazmat.primitives import hmac

from .errors import CorruptStore, IntegrityError

SCHEMA_VERSION = 1
ROOT_INODE = 1
MAC_SIZE = 32


def create_schema(db: sqlite3.Connection) -> None:
    """Create the tables of a new store (schema version 1)."""
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
        -- mac: HMAC-SHA256 over all columns above (FORMAT.md, "inode MAC").
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
            mac          BLOB NOT NULL
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

        -- Store-wide settings; 'schema_version' = 1.
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


_INODE_COLUMNS = [f.name for f in fields(Inode)]
_INODE_PACK = struct.Struct(">QIIIQQqqqqIIQ")
_DENTRY_PREFIX = struct.Struct(">QQ")


@dataclass(slots=True)
class Dentry:
    id: int
    parent: int
    name: bytes  # ciphertext
    inode: int


class Metadata:
    """Typed access to meta.db; every row read is authenticated."""

    def __init__(self, path: str | os.PathLike[str], mac: hmac.HMAC, *, create: bool = False) -> None:
        self._mac = mac
        self._depth = 0
        self._next_inode_id: int | None = None
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            if create:
                create_schema(self.db)
            version = self.db.execute("SELECT value FROM settings WHERE name='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise CorruptStore(f"{path}: metadata database unreadable: {e}") from e
        if version is None or version[0] != SCHEMA_VERSION:
            raise CorruptStore(f"{path}: unknown metadata schema version {version}")

    def close(self) -> None:
        self.db.close()
        self._mac = None  # type: ignore[assignment]  # the keyed HMAC context goes with the database

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction; nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    def sync(self) -> None:
        """Make every committed transaction durable (fsync of WAL and database)."""
        self.db.execute("PRAGMA wal_checkpoint(FULL)")

    def get_setting(self, name: str) -> object:
        row = self.db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def set_setting(self, name: str, value: object) -> None:
        self.db.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (name, value))

    # -- MACs --------------------------------------------------------------

    def _hmac(self, *parts: bytes) -> bytes:
        h = self._mac.copy()
        for part in parts:
            h.update(part)
        return h.finalize()

    def inode_mac(self, inode: Inode) -> bytes:
        return self._hmac(b"envfs inode v1\x00", _INODE_PACK.pack(*(getattr(inode, c) for c in _INODE_COLUMNS)))

    def dentry_mac(self, parent: int, inode: int, name: bytes) -> bytes:
        return self._hmac(b"envfs dentry v1\x00", _DENTRY_PREFIX.pack(parent, inode), name)

    # -- inodes ------------------------------------------------------------

    def get_inode(self, inode_id: int) -> Inode | None:
        row = self.db.execute(f"SELECT {', '.join(_INODE_COLUMNS)}, mac FROM inodes WHERE id=?", (inode_id,)).fetchone()
        if row is None:
            return None
        inode = Inode(*row[:-1])
        if not _equal(self.inode_mac(inode), row[-1]):
            raise IntegrityError(f"inode {inode_id}: metadata MAC mismatch")
        return inode

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
        """Insert a new inode under `inode_id` (from `allocate_inode_id`) or a fresh id."""
        inode = Inode(id=self.allocate_inode_id() if inode_id is None else inode_id, **values)
        self.db.execute(
            f"INSERT INTO inodes ({', '.join(_INODE_COLUMNS)}, mac) VALUES ({', '.join('?' * len(_INODE_COLUMNS))}, ?)",
            (*(getattr(inode, c) for c in _INODE_COLUMNS), self.inode_mac(inode)),
        )
        return inode

    def save_inode(self, inode: Inode) -> None:
        assignments = ", ".join(f"{c}=?" for c in _INODE_COLUMNS[1:])
        self.db.execute(
            f"UPDATE inodes SET {assignments}, mac=? WHERE id=?",
            (*(getattr(inode, c) for c in _INODE_COLUMNS[1:]), self.inode_mac(inode), inode.id),
        )

    def delete_inode(self, inode_id: int) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM inodes WHERE id=?", (inode_id,))
            self.db.execute("DELETE FROM symlinks WHERE inode=?", (inode_id,))
            self.db.execute("DELETE FROM xattrs WHERE inode=?", (inode_id,))

    def orphans(self) -> list[int]:
        return [row[0] for row in self.db.execute("SELECT id FROM inodes WHERE nlink=0")]

    def all_inode_ids(self) -> list[int]:
        return [row[0] for row in self.db.execute("SELECT id FROM inodes ORDER BY id")]

    def counts(self) -> dict[str, int]:
        inodes = self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM inodes").fetchone()
        return {"inodes": inodes[0], "bytes": inodes[1]}

    # -- directory entries -------------------------------------------------

    def _dentry(self, row: tuple[int, int, bytes, int, bytes]) -> Dentry:
        entry = Dentry(row[0], row[1], row[2], row[3])
        if not _equal(self.dentry_mac(entry.parent, entry.inode, entry.name), row[4]):
            raise IntegrityError(f"directory {entry.parent}: entry {entry.id} MAC mismatch")
        return entry

    def lookup(self, parent: int, name: bytes) -> Dentry | None:
        row = self.db.execute(
            "SELECT id, parent, name, inode, mac FROM dentries WHERE parent=? AND name=?", (parent, name)
        ).fetchone()
        return None if row is None else self._dentry(row)

    def entries(self, parent: int, after_id: int = 0, limit: int = -1) -> list[Dentry]:
        rows = self.db.execute(
            "SELECT id, parent, name, inode, mac FROM dentries WHERE parent=? AND id>? ORDER BY id LIMIT ?",
            (parent, after_id, limit),
        ).fetchall()
        return [self._dentry(row) for row in rows]

    def has_entries(self, parent: int) -> bool:
        return self.db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (parent,)).fetchone() is not None

    def add_entry(self, parent: int, name: bytes, inode: int) -> None:
        self.db.execute(
            "INSERT INTO dentries (parent, name, inode, mac) VALUES (?, ?, ?, ?)",
            (parent, name, inode, self.dentry_mac(parent, inode, name)),
        )

    def remove_entry(self, parent: int, name: bytes) -> None:
        self.db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))

    def repoint_entry(self, parent: int, name: bytes, inode: int) -> None:
        """Make an existing entry name another inode (rename over, exchange)."""
        self.db.execute(
            "UPDATE dentries SET inode=?, mac=? WHERE parent=? AND name=?",
            (inode, self.dentry_mac(parent, inode, name), parent, name),
        )

    def parent_of(self, inode: int) -> int | None:
        """The directory holding a directory (directories have one entry)."""
        row = self.db.execute(
            "SELECT id, parent, name, inode, mac FROM dentries WHERE inode=? LIMIT 1", (inode,)
        ).fetchone()
        return None if row is None else self._dentry(row).parent

    # -- symlinks and xattrs -----------------------------------------------

    def set_symlink(self, inode: int, target: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO symlinks (inode, target) VALUES (?, ?)", (inode, target))

    def get_symlink(self, inode: int) -> bytes | None:
        row = self.db.execute("SELECT target FROM symlinks WHERE inode=?", (inode,)).fetchone()
        return None if row is None else bytes(row[0])

    def get_xattr(self, inode: int, name: bytes) -> bytes | None:
        row = self.db.execute("SELECT value FROM xattrs WHERE inode=? AND name=?", (inode, name)).fetchone()
        return None if row is None else bytes(row[0])

    def set_xattr(self, inode: int, name: bytes, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?, ?, ?)", (inode, name, value))

    def remove_xattr(self, inode: int, name: bytes) -> bool:
        return self.db.execute("DELETE FROM xattrs WHERE inode=? AND name=?", (inode, name)).rowcount > 0

    def has_xattrs(self, inode: int) -> bool:
        return self.db.execute("SELECT 1 FROM xattrs WHERE inode=? LIMIT 1", (inode,)).fetchone() is not None

    def xattr_names(self, inode: int) -> list[bytes]:
        return [bytes(row[0]) for row in self.db.execute("SELECT name FROM xattrs WHERE inode=?", (inode,))]


def _equal(a: bytes, b: bytes) -> bool:
    return compare_digest(a, bytes(b))
