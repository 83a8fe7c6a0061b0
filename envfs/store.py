"""The store directory: superblock, data file paths, and the mount lock.

STORE/envfs.json   superblock (JSON, MACed; docs/FORMAT.md)
STORE/meta.db      metadata (SQLite, see `metadata`)
STORE/data/HH/ID.V.E  ciphertext of inode ID (16 hex digits) under key
                   version V and key epoch E; HH = last two hex digits
STORE/lock         flock()ed by the mounted daemon; holds its pid
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .blocks import BLOCK_SIZE
from .errors import (
    CorruptStore,
    NotAStore,
    RotationUnfinished,
    StoreBusy,
    StoreExists,
    StoreReadOnly,
    UnsupportedFormat,
)
from .fallocate import FALLOC_FL_KEEP_SIZE, fallocate

FORMAT_NAME = "envfs"
FORMAT_VERSION = 1
SUPERBLOCK = "envfs.json"
METADATA = "meta.db"
DATA = "data"
LOCK = "lock"
RESERVE = "reserve"
RESERVE_BYTES = 4 << 20
# Space kept allocated in SQLite's log (meta.db-wal) beyond what it holds. The log
# starts again from its beginning after each checkpoint, which SQLite runs once it
# holds 1,000 pages (its wal_autocheckpoint default), so this is a checkpoint's worth
# of frames (a 24-byte header and a 4 KiB page each) and a quarter more for the last
# group before it.
COMMIT_ROOM_BYTES = 1250 * (24 + 4096)
# Space kept allocated past the end of meta.db, for the pages a checkpoint adds (new
# rows): a checkpoint that completes lets the log start again.
CHECKPOINT_ROOM_BYTES = 1 << 20

# Random 96-bit nonces: after 2^31 block encryptions under one key, a
# nonce collision has probability below 2^-35 (docs/FORMAT.md).
DEFAULT_REKEY_AFTER = 2**31


@dataclass
class HsmLocator:
    """Where the master keys live; never a PIN."""

    type: str  # "embedded" or "pkcs11"
    token: str
    module: str | None = None


@dataclass
class KeyVersion:
    version: int
    label: str
    check: str  # hex of the first 16 bytes of the key check derivation


@dataclass
class Superblock:
    uuid: uuid.UUID
    hsm: HsmLocator
    keys: list[KeyVersion]
    current_key_version: int
    rekey_after_block_writes: int = DEFAULT_REKEY_AFTER
    block_size: int = BLOCK_SIZE
    format_version: int = FORMAT_VERSION
    mac: str = field(default="")

    def key(self, version: int) -> KeyVersion:
        for key in self.keys:
            if key.version == version:
                return key
        raise CorruptStore(f"superblock has no key version {version}")

    @property
    def rotating_to(self) -> int | None:
        """The version a key rotation in progress moves the store to: the newest
        key version, while it is above the current one (FORMAT.md section 8)."""
        newest = max(key.version for key in self.keys)
        return newest if newest > self.current_key_version else None

    def check_metadata_key_version(self, rows_version: int) -> None:
        """Refuse metadata whose rows are under another key version than the
        current one: a rotation that stopped right after switching them, or damage."""
        if rows_version == self.current_key_version:
            return
        if rows_version == self.rotating_to:
            raise RotationUnfinished(
                f"a key rotation to version {rows_version} stopped half-way; finish it with `envfs rotate`"
            )
        raise CorruptStore(
            f"metadata is under key version {rows_version}, the superblock says {self.current_key_version}"
        )

    def to_json(self, *, with_mac: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "uuid": str(self.uuid),
            "block_size": self.block_size,
            "hsm": {k: v for k, v in asdict(self.hsm).items() if v is not None},
            "keys": [asdict(k) for k in self.keys],
            "current_key_version": self.current_key_version,
            "rekey_after_block_writes": self.rekey_after_block_writes,
        }
        if with_mac:
            body["mac"] = self.mac
        return body

    def mac_input(self) -> bytes:
        """Canonical JSON of every field but `mac`: the superblock MAC's input."""
        return json.dumps(self.to_json(with_mac=False), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: Any, where: str) -> Superblock:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise NotAStore(f"{where} is not an envfs store")
        version = data.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise UnsupportedFormat(f"{where}: format version {version} is newer than this envfs ({FORMAT_VERSION})")
        try:
            superblock = cls(
                uuid=uuid.UUID(data["uuid"]),
                hsm=HsmLocator(**data["hsm"]),
                keys=[KeyVersion(**k) for k in data["keys"]],
                current_key_version=int(data["current_key_version"]),
                rekey_after_block_writes=int(data["rekey_after_block_writes"]),
                block_size=int(data["block_size"]),
                format_version=int(version),  # type: ignore[arg-type]
                mac=str(data["mac"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptStore(f"{where}: superblock damaged ({type(e).__name__}: {e})") from e
        if superblock.block_size != BLOCK_SIZE or superblock.format_version != FORMAT_VERSION:
            raise CorruptStore(f"{where}: superblock damaged (block size or format version)")
        if superblock.hsm.type not in ("embedded", "pkcs11") or not superblock.keys:
            raise CorruptStore(f"{where}: superblock damaged (hsm or keys)")
        if len({key.version for key in superblock.keys}) != len(superblock.keys):
            raise CorruptStore(f"{where}: superblock damaged (a key version listed twice)")
        superblock.key(superblock.current_key_version)
        return superblock


class Store:
    """Paths and files of one store directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self.superblock_path = self.path / SUPERBLOCK
        self.metadata_path = self.path / METADATA
        # SQLite's own files beside meta.db (WAL mode)
        self.metadata_wal_path = self.path / (METADATA + "-wal")
        self.metadata_shm_path = self.path / (METADATA + "-shm")
        self.data_path = self.path / DATA
        self._data_prefix = f"{self.data_path}/"
        self.lock_path = self.path / LOCK
        self.reserve_path = self.path / RESERVE
        # A read-only mount sets this: data files are opened read-only, the
        # space reserve is neither made nor given up, and the daemon changes
        # nothing by itself (access times, orphans to delete; fs.Operations).
        self.read_only = False
        # The descriptors `keep_commit_room` allocates through, open until
        # `close_commit_room`: closing a descriptor of a file drops every POSIX lock
        # the process holds on it, SQLite's on meta.db among them.
        self._room_fds: dict[Path, int] = {}

    def read_superblock(self) -> Superblock:
        if not self.path.is_dir():
            raise NotAStore(f"{self.path}: {'not a directory' if self.path.exists() else 'no such directory'}")
        try:
            raw = self.superblock_path.read_bytes()
        except FileNotFoundError as e:
            raise NotAStore(f"{self.path} is not an envfs store (no {SUPERBLOCK})") from e
        except OSError as e:
            raise CorruptStore(f"{self.superblock_path}: {e.strerror}") from e
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptStore(f"{self.superblock_path}: superblock damaged (not JSON)") from e
        return Superblock.from_json(data, str(self.path))

    def write_superblock(self, superblock: Superblock) -> None:
        """Replace the superblock atomically and durably."""
        tmp = self.superblock_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(superblock.to_json(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.superblock_path)
        _fsync_dir(self.path)

    def check_new(self) -> None:
        """Refuse to create a store over anything but an empty directory."""
        if self.path.exists():
            if not self.path.is_dir():
                raise StoreExists(f"{self.path} exists and is not a directory")
            if any(self.path.iterdir()):
                raise StoreExists(f"{self.path} is not empty")

    def prepare_new(self) -> None:
        """Create the directory for a new store; refuse a non-empty one."""
        self.check_new()
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        self.data_path.mkdir(mode=0o700)

    def metadata_wal_in_use(self) -> bool:
        """Whether meta.db-wal holds frames (committed or not): meta.db alone is not the metadata."""
        try:
            return self.metadata_wal_path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def metadata_to_read(self, stack: ExitStack) -> tuple[Path, bool]:
        """meta.db for a reader that must change nothing in the store: the
        store's own, to open immutable (True); or, where a crash left committed
        transactions in its -wal file, which an immutable open would not see,
        a private copy of both (False), for SQLite to merge there. The copy
        goes with `stack`; one a killed process left goes at the next copy."""
        if not self.metadata_wal_in_use():
            return self.metadata_path, True
        _remove_dead_copies()
        copy = Path(tempfile.mkdtemp(prefix=f"{_COPY_PREFIX}{os.getpid()}-"))
        stack.callback(shutil.rmtree, copy, True)
        shutil.copyfile(self.metadata_path, copy / METADATA)
        shutil.copyfile(self.metadata_wal_path, copy / self.metadata_wal_path.name)
        return copy / METADATA, False

    # -- data files ----------------------------------------------------------

    def data_file(self, inode_id: int, key_version: int, key_epoch: int) -> Path:
        return Path(self._data_file(inode_id, key_version, key_epoch))

    def _data_file(self, inode_id: int, key_version: int, key_epoch: int) -> str:
        # A plain string: this runs on every getattr, where pathlib's cost shows.
        return f"{self._data_prefix}{inode_id & 0xFF:02x}/{inode_id:016x}.{key_version}.{key_epoch}"

    def open_data_file(self, inode_id: int, key_version: int, key_epoch: int, *, create: bool) -> int:
        path = self._data_file(inode_id, key_version, key_epoch)
        if self.read_only:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not create:
                    raise
                # An empty file that never had a data file: nothing to read.
                return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            return os.open(path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.EROFS and not create:
                # The backing filesystem turned read-only: reads go on, writes fail.
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if not isinstance(e, FileNotFoundError) or not create:
                raise
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            _fsync_dir(self.data_path)
            return os.open(path, flags, 0o600)

    def data_file_blocks(self, inode_id: int, key_version: int, key_epoch: int) -> int:
        """The 512-byte blocks the data file occupies (0 if it does not exist)."""
        try:
            return os.stat(self._data_file(inode_id, key_version, key_epoch)).st_blocks
        except FileNotFoundError:
            return 0

    def remove_data_file(self, inode_id: int, key_version: int, key_epoch: int) -> None:
        try:
            os.unlink(self._data_file(inode_id, key_version, key_epoch))
        except FileNotFoundError:
            pass

    def data_files(self) -> list[tuple[int, int, int, Path]]:
        """Every data file as (inode id, key version, key epoch, path)."""
        found = []
        if not self.data_path.is_dir():
            return found
        for sub in self.data_path.iterdir():
            for entry in sub.iterdir() if sub.is_dir() else ():
                parts = entry.name.split(".")
                try:
                    found.append((int(parts[0], 16), int(parts[1]), int(parts[2]), entry))
                except (IndexError, ValueError):
                    continue
        return found

    def sync_data_dir(self, inode_id: int) -> None:
        _fsync_dir(self.data_path / f"{inode_id & 0xFF:02x}")

    # -- space reserve ---------------------------------------------------------

    def keep_reserve(self) -> None:
        """Hold RESERVE_BYTES of allocated space, if the disk has them to spare."""
        if self.read_only or self.reserve_path.exists():
            return
        free = os.statvfs(self.path)
        if free.f_bavail * free.f_frsize < 4 * RESERVE_BYTES:
            return
        fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:
            os.unlink(self.reserve_path)
        finally:
            os.close(fd)

    def keep_commit_room(self) -> None:
        """Keep space allocated for SQLite where only SQLite can use it: COMMIT_ROOM_BYTES
        of meta.db-wal, beyond its end where it holds less, and CHECKPOINT_ROOM_BYTES past
        the end of meta.db (FALLOC_FL_KEEP_SIZE: the sizes, and so what SQLite reads, stay).
        Commits and checkpoints then find room even after another program took every free
        byte of the disk, when the reserve, once given up, may have gone to that program.
        (A checkpoint cuts meta.db to its size, which on ext4 frees what lies past its end:
        the daemon calls this every second.) Files that do not exist yet are left to SQLite
        to make. The descriptors stay open: `close_commit_room` once SQLite has closed."""
        if self.read_only:
            return
        for path, past_end, room in (
            (self.metadata_wal_path, False, COMMIT_ROOM_BYTES),
            (self.metadata_path, True, CHECKPOINT_ROOM_BYTES),
        ):
            fd = self._room_fd(path)
            if fd is not None:
                fallocate(fd, FALLOC_FL_KEEP_SIZE, os.fstat(fd).st_size if past_end else 0, room)

    def _room_fd(self, path: Path) -> int | None:
        """A descriptor of the file at `path` now (SQLite may have made it anew), or None."""
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return None
        fd = self._room_fds.get(path)
        if fd is not None and os.fstat(fd).st_ino == now.st_ino:
            return fd
        if fd is not None:
            os.close(fd)  # a file SQLite no longer has open
        fd = self._room_fds[path] = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        return fd

    def close_commit_room(self) -> None:
        """Close `keep_commit_room`'s descriptors, after SQLite has closed the metadata."""
        for fd in self._room_fds.values():
            os.close(fd)
        self._room_fds.clear()

    def free_bytes(self) -> int:
        """Space the backing filesystem has left for us."""
        free = os.statvfs(self.path)
        return free.f_bavail * free.f_frsize

    def release_reserve(self) -> bool:
        """Free the reserve (the disk is full); True if there was one."""
        if self.read_only:
            return False
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            return False
        return True

    # -- lock ----------------------------------------------------------------

    def lock(self, mountpoint: str | None, operation: str = "mount") -> StoreLock:
        """Take the store's lock for a mount (or an operator tool, `operation`
        "rotate", "retire" or "fsck", with no mountpoint); StoreBusy if a live process holds it.

        A read-only mount of a store on read-only media locks the lock file
        it finds without writing a record into it, or goes without a lock
        where there is no lock file: nothing can change such a store.
        """
        record = True
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            if not self.read_only:
                hint = " (envfs mount --read-only reads it)" if operation == "mount" else ""
                raise StoreReadOnly(
                    f"{self.path} is on a read-only filesystem: envfs {operation} must write it{hint}"
                ) from e
            try:
                fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return StoreLock(-1, mountpoint, operation, record=False)
            record = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreBusy(f"{self.path} is {busy_with(self.lock_holder())}") from e
            raise
        try:
            try:
                return StoreLock(fd, mountpoint, operation, record=record)
            except OSError as e:
                # An emptied lock record needs a block again: on a full disk the
                # reserve is there for this, or nothing could be mounted to free space.
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.release_reserve():
                    raise
                return StoreLock(fd, mountpoint, operation)
        except BaseException:
            os.close(fd)
            raise

    def record_of_dead_holder(self) -> dict[str, Any] | None:
        """The record a holder of the lock left when it died without letting go
        (killed, crashed), while nobody holds the lock; None otherwise."""
        held, record = self._peek_lock()
        return None if held else record

    def lock_holder(self) -> dict[str, Any] | None:
        """The pid and mountpoint of the daemon holding the lock, if any."""
        held, record = self._peek_lock()
        return (record or {"pid": None, "mountpoint": None}) if held else None

    def _peek_lock(self) -> tuple[bool, dict[str, Any] | None]:
        """Whether someone holds the lock, and the record in the lock file."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False, None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True, _read_record(fd)
            try:
                return False, _read_record(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _read_record(fd: int) -> dict[str, Any] | None:
    """The record in a lock file (`StoreLock`); None for an empty one (released,
    or not written yet), one of unknown holder for one that is unreadable."""
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        return dict(json.loads(data))
    except (ValueError, TypeError):
        return {"pid": None, "mountpoint": None}


def busy_with(holder: dict[str, Any] | None) -> str:
    """What holds a store, for messages: "already mounted on /mnt (pid 12)"."""
    if not holder:
        return "already mounted"
    operation = holder.get("operation", "mount")
    if operation != "mount":
        return f"in use by envfs {operation} (pid {holder.get('pid')})"
    return f"already mounted on {holder.get('mountpoint')} (pid {holder.get('pid')})"


class StoreLock:
    """A held store lock; records the holder's pid, what it does (a mount and
    its mountpoint, or an operator tool) and its counters."""

    _RECORD_SIZE = 4096  # JSON padded with blanks: a reader never sees a torn record

    def __init__(self, fd: int, mountpoint: str | None, operation: str = "mount", *, record: bool = True) -> None:
        self.fd = fd
        self.mountpoint = mountpoint
        self.operation = operation
        self._record = record  # False: a lock file on read-only media, or none
        self.update()

    def update(self, counters: dict[str, int] | None = None) -> None:
        if not self._record:
            return
        record: dict[str, Any] = {"pid": os.getpid(), "mountpoint": self.mountpoint}
        if self.operation != "mount":
            record["operation"] = self.operation
        if counters:
            record["counters"] = counters
        data = json.dumps(record).encode()
        os.pwrite(self.fd, data.ljust(max(self._RECORD_SIZE, len(data))), 0)

    def release(self) -> None:
        if self.fd >= 0:
            if self._record:
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


_COPY_PREFIX = "envfs-meta-"


def _remove_dead_copies() -> None:
    """Remove the metadata copies (`Store.metadata_to_read`) of processes that are gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{_COPY_PREFIX}*-*"):
        pid = path.name.removeprefix(_COPY_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
