"""`envfs fsck`: read and authenticate a whole unmounted store and report
every damaged or inconsistent item, changing nothing (but the one-time
upgrade of a schema version 1 store's metadata, `Metadata.upgrade`, and the
store's anchor in the token, which it checks and renews as every writer does).

Each problem is one line handed to `report`, starting with a stable kind
word and a colon, then the inode it concerns (with its plaintext path where
the tree allows working it out) and what is wrong:

    anchor:      meta.db is not the file the store's HSM anchor describes
                 (an older copy of the store or of meta.db was put back)
    sqlite:      the database's own integrity check
    mac:         an inode row or a directory entry fails its MAC
    entryset:    a directory's entries do not match its entry set digest
                 (an entry row deleted, added or put back outside envfs)
    name:        an entry's name fails to decrypt
    entry:       an entry whose parent or inode is missing or of the wrong type,
                 a directory named twice, the root named at all
    nlink:       a link count that does not match the entries
    unreachable: an inode with links that the tree from the root does not reach
    cycle:       directories that name each other, cut off from the root
    symlink:     a missing, undecryptable or misplaced target, or a wrong size
    xattr:       an extended attribute that fails to decrypt or has no inode, or
                 an inode whose xattrs do not match their set digest
    keyversion:  a file under a key version the superblock does not list
    counter:     a block write count above the nonce bound (FORMAT.md 6)
    missing:     a regular file's data file, or the root's row, does not exist
    short:       a data file cut short: the blocks it lacks
    block:       one block that fails authentication (each one, by index)
    data:        a data file that cannot be read or keyed
    leftover:    not damage: what a crash leaves behind and nothing reads
                 (orphans, stale data files, bytes past a file's end)
    note:        not damage: a rotation in progress, an unclean unmount

Every line but `leftover` and `note` counts as damage.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

from .blocks import BLOCK_SIZE, SLOT_SIZE, BlockCipher, block_count, max_data_length, min_data_length
from .errors import EnvfsError, IntegrityError
from .metadata import ROOT_INODE, Dentry, Inode, Metadata
from .names import NameCipher
from .offline import OfflineStore
from .secret import zero_buffer, zero_bytes

# Slots read and authenticated per pread: 1 MiB of plaintext, and a run long
# enough for `_gcm` to split it over two cores.
_CHUNK_BLOCKS = 256
# Names are printed one per line: control characters are shown escaped.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}

Report = Callable[[str], None]


@dataclass
class FsckSummary:
    """What fsck looked at, and how many problems it reported."""

    inodes: int = 0
    directories: int = 0
    files: int = 0
    symlinks: int = 0
    others: int = 0
    entries: int = 0
    xattrs: int = 0
    blocks: int = 0
    bytes: int = 0
    leftovers: int = 0
    damaged: int = 0

    def text(self) -> str:
        return "\n".join([
            f"inodes:    {self.inodes} ({self.directories} directories, {self.files} files, "
            f"{self.symlinks} symlinks, {self.others} other)",
            f"entries:   {self.entries}",
            f"xattrs:    {self.xattrs}",
            f"blocks:    {self.blocks} checked ({self.bytes} bytes of file data)",
            f"leftovers: {self.leftovers}",
            f"damaged:   {self.damaged}" + ("" if self.damaged else " (clean)"),
        ])  # fmt: skip


def check_store(offline: OfflineStore, report: Report) -> FsckSummary:
    """Check everything in `offline`'s store; report each problem; never write."""
    metadata = offline.metadata()
    names = offline.keys().name_cipher(metadata.rows_key_version())
    try:
        return _Fsck(offline, metadata, names, report).run()
    finally:
        names.close()


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace").translate(_ESCAPES)


def _join(parent: str, name: str) -> str:
    return f"{parent.rstrip('/')}/{name}"


class _Fsck:
    """One run: the rows read once, then each check over them and the data files."""

    def __init__(self, offline: OfflineStore, metadata: Metadata, names: NameCipher, report: Report) -> None:
        self.offline = offline
        self.store = offline.store
        self.superblock = offline.superblock
        self.metadata = metadata
        self.names = names
        self._report = report
        self.summary = FsckSummary()
        self.inodes: dict[int, Inode] = {}  # rows that pass their MAC
        self.bad_inodes: set[int] = set()  # rows that fail it: their columns mean nothing
        self.entries_of: dict[int, list[Dentry]] = defaultdict(list)  # MAC-valid entries naming an inode
        self.children: dict[int, list[Dentry]] = defaultdict(list)  # MAC-valid entries in a directory
        self.bad_entries: list[Dentry] = []
        self.entry_names: dict[int, str] = {}  # entry id -> printable name
        self.undecryptable: list[Dentry] = []
        self.paths: dict[int, str] = {}  # inode id -> path, for what the walk from the root reached
        self.in_cycle: set[int] = set()
        self._slots = bytearray(_CHUNK_BLOCKS * SLOT_SIZE)
        self._plain = bytearray(_CHUNK_BLOCKS * BLOCK_SIZE)

    # -- reporting -----------------------------------------------------------

    def damage(self, kind: str, line: str) -> None:
        self.summary.damaged += 1
        self._report(f"{kind}: {line}")

    def leftover(self, line: str) -> None:
        self.summary.leftovers += 1
        self._report(f"leftover: {line}")

    def note(self, line: str) -> None:
        self._report(f"note: {line}")

    def path_of(self, inode_id: int) -> str | None:
        """The inode's path; for one the walk did not reach, as far up as its
        entries lead ("?/a/b" when the top is unknown); None without entries."""
        parts: list[str] = []
        seen: set[int] = set()
        current = inode_id
        while current not in self.paths:
            entries = self.entries_of.get(current)
            if current in seen or not entries:
                return "?/" + "/".join(reversed(parts)) if parts else None
            seen.add(current)
            parts.append(self.entry_names[entries[0].id])
            current = entries[0].parent
        path = self.paths[current]
        for part in reversed(parts):
            path = _join(path, part)
        return path

    def where(self, inode_id: int) -> str:
        path = self.path_of(inode_id)
        return f"inode {inode_id}" if path is None else f"inode {inode_id} ({path})"

    # -- the passes ----------------------------------------------------------

    def run(self) -> FsckSummary:
        if self.offline.anchor_problem is not None:
            self.damage("anchor", self.offline.anchor_problem)
        self.notes()
        self.phase("integrity check", self.check_sqlite)
        self.phase("inodes", self.load_inodes)
        self.phase("directory entries", self.load_entries)
        self.walk_tree()
        for inode_id in sorted(self.bad_inodes):
            self.damage("mac", f"{self.where(inode_id)}: metadata MAC mismatch")
        self.check_entries()
        self.check_links()
        self.phase("symlinks", self.check_symlinks)
        self.phase("xattrs", self.check_xattrs)
        self.check_files()
        self.check_data_files()
        return self.summary

    def phase(self, what: str, action: Callable[[], None]) -> None:
        """Run one pass over a table; a database error ends that pass, not the check."""
        try:
            action()
        except sqlite3.DatabaseError as e:
            self.damage("sqlite", f"reading {what}: {e}")

    def notes(self) -> None:
        rotating_to = self.superblock.rotating_to
        if rotating_to is not None:
            self.note(
                f"a key rotation to key version {rotating_to} is in progress: files under older key "
                "versions are expected (`envfs rotate` finishes it)"
            )
        try:
            unclean = self.metadata.get_setting("mounted") == 1
        except sqlite3.DatabaseError:
            unclean = False  # the integrity check reports it
        if unclean:
            self.note("the store was not unmounted cleanly; the next mount recovers it")

    def check_sqlite(self) -> None:
        for (result,) in self.metadata.db.execute("PRAGMA integrity_check"):
            for line in str(result).splitlines():
                if line != "ok":
                    self.damage("sqlite", line)

    def load_inodes(self) -> None:
        for inode_id, inode in self.metadata.scan_inodes():
            self.summary.inodes += 1
            if inode is None:
                self.bad_inodes.add(inode_id)
                continue
            self.inodes[inode_id] = inode
            if stat.S_ISDIR(inode.mode):
                self.summary.directories += 1
            elif stat.S_ISREG(inode.mode):
                self.summary.files += 1
            elif stat.S_ISLNK(inode.mode):
                self.summary.symlinks += 1
            else:
                self.summary.others += 1

    def load_entries(self) -> None:
        for entry, valid in self.metadata.scan_entries():
            self.summary.entries += 1
            if not valid:
                self.bad_entries.append(entry)
                continue
            try:
                name = self.names.decrypt_name(entry.parent, entry.name)
            except IntegrityError:
                self.entry_names[entry.id] = f"?entry-{entry.id}"
                self.undecryptable.append(entry)
            else:
                self.entry_names[entry.id] = _show(name)
            self.entries_of[entry.inode].append(entry)
            self.children[entry.parent].append(entry)

    def is_directory(self, inode_id: int) -> bool:
        """A directory, or a row too damaged to tell that has entries in it."""
        inode = self.inodes.get(inode_id)
        if inode is None:
            return inode_id in self.bad_inodes and inode_id in self.children
        return stat.S_ISDIR(inode.mode)

    def walk_tree(self) -> None:
        """Paths of everything reachable from the root, breadth first."""
        self.paths[ROOT_INODE] = "/"
        queue = deque([ROOT_INODE])
        while queue:
            parent = queue.popleft()
            for entry in self.children.get(parent, ()):
                if entry.inode in self.paths:
                    continue
                self.paths[entry.inode] = _join(self.paths[parent], self.entry_names[entry.id])
                if self.is_directory(entry.inode):
                    queue.append(entry.inode)

    def check_entries(self) -> None:
        for entry in self.bad_entries:
            parent = self.path_of(entry.parent)
            try:
                shown = _join(parent or "?", _show(self.names.decrypt_name(entry.parent, entry.name)))
            except IntegrityError:
                shown = f"in directory {entry.parent}" + (f" ({parent})" if parent else "")
            self.damage("mac", f"{self.where(entry.inode)}: directory entry {entry.id} {shown} fails its MAC")
        for entry in self.undecryptable:
            self.damage(
                "name", f"{self.where(entry.inode)}: the name of entry {entry.id} in {self.where(entry.parent)} "
                "fails authentication",
            )  # fmt: skip
        for parent, entries in self.children.items():
            if parent not in self.inodes and parent not in self.bad_inodes:
                for entry in entries:
                    self.damage("entry", f"{self.where(entry.inode)}: entry {entry.id} is in directory {parent}, "
                                "which does not exist")  # fmt: skip
            elif parent in self.inodes and not stat.S_ISDIR(self.inodes[parent].mode):
                for entry in entries:
                    self.damage("entry", f"{self.where(entry.inode)}: entry {entry.id} is in {self.where(parent)}, "
                                "which is not a directory")  # fmt: skip
        bad_parents = {entry.parent for entry in self.bad_entries}
        for inode_id, inode in self.inodes.items():
            if not stat.S_ISDIR(inode.mode) or inode_id in bad_parents:
                continue  # a failing entry has its own line already
            digest = 0
            for entry in self.children.get(inode_id, ()):
                digest ^= self.metadata.entry_element(entry)
            if digest != inode.entries:
                self.damage("entryset", f"{self.where(inode_id)}: its entries do not match its entry set digest "
                            "(an entry was removed or added outside envfs)")  # fmt: skip
        for inode_id, entries in self.entries_of.items():
            if inode_id not in self.inodes and inode_id not in self.bad_inodes:
                for entry in entries:
                    name = _join(self.path_of(entry.parent) or "?", self.entry_names[entry.id])
                    self.damage("entry", f"inode {inode_id}: entry {entry.id} {name} names it, but it does not exist")

    def check_links(self) -> None:
        root = self.inodes.get(ROOT_INODE)
        if root is None and ROOT_INODE not in self.bad_inodes:
            self.damage("missing", "inode 1 (/): the root directory's row does not exist")
        elif root is not None and not stat.S_ISDIR(root.mode):
            self.damage("entry", f"inode 1 (/): the root is not a directory (mode {root.mode:o})")
        self.find_cycles()
        for inode_id, inode in self.inodes.items():
            entries = self.entries_of.get(inode_id, [])
            directory = stat.S_ISDIR(inode.mode)
            if inode_id == ROOT_INODE:
                for entry in entries:
                    self.damage("entry", f"inode 1 (/): the root is named by entry {entry.id} in "
                                f"{self.where(entry.parent)}")  # fmt: skip
            elif not entries:
                if inode.nlink == 0:
                    self.leftover(f"inode {inode_id}: orphan (nlink 0, no entry names it); the next mount deletes it")
                else:
                    self.damage("unreachable", f"inode {inode_id}: no directory entry names it (nlink {inode.nlink})")
                continue
            elif directory and len(entries) > 1:
                self.damage("entry", f"{self.where(inode_id)}: a directory named by {len(entries)} entries")
            if directory:
                children = self.children.get(inode_id, [])
                if any(child.inode in self.bad_inodes for child in children):
                    expected = None  # a child's type is unknown: its MAC already failed
                else:
                    expected = 2 + sum(1 for child in children if self.is_directory(child.inode))
                what = "subdirectories"
            else:
                expected, what = len(entries), "entries naming it"
            if expected is not None and inode.nlink != expected:
                self.damage("nlink", f"{self.where(inode_id)}: nlink is {inode.nlink}, {what} give {expected}")
            if inode_id not in self.paths and inode_id not in self.in_cycle:
                self.damage("unreachable", f"{self.where(inode_id)}: not reachable from the root")

    def find_cycles(self) -> None:
        """Directories cut off from the root whose parents lead round in a circle."""
        done: set[int] = set()
        for start in self.entries_of:
            if start in self.paths or start in done or not self.is_directory(start):
                continue
            trail: list[int] = []
            on_trail: set[int] = set()
            current: int | None = start
            while current is not None and current not in done and current not in self.paths:
                if current in on_trail:
                    cycle = trail[trail.index(current) :]
                    self.in_cycle.update(cycle)
                    ids = ", ".join(str(i) for i in sorted(cycle))
                    self.damage("cycle", f"{self.where(min(cycle))}: directories {ids} contain each other, "
                                "cut off from the root")  # fmt: skip
                    break
                trail.append(current)
                on_trail.add(current)
                entries = self.entries_of.get(current)
                current = entries[0].parent if entries else None
            done.update(trail)

    def check_symlinks(self) -> None:
        targets: set[int] = set()
        for inode_id, ciphertext in self.metadata.scan_symlinks():
            targets.add(inode_id)
            inode = self.inodes.get(inode_id)
            if inode is None and inode_id not in self.bad_inodes:
                self.damage("symlink", f"inode {inode_id}: a symlink target for an inode that does not exist")
                continue
            if inode is not None and not stat.S_ISLNK(inode.mode):
                self.damage("symlink", f"{self.where(inode_id)}: a symlink target for an inode that is not a symlink")
                continue
            try:
                target = self.names.decrypt_target(inode_id, ciphertext)
            except IntegrityError:
                self.damage("symlink", f"{self.where(inode_id)}: the target fails authentication")
                continue
            if inode is not None and len(target) != inode.size:
                self.damage("symlink", f"{self.where(inode_id)}: the target is {len(target)} bytes, size says "
                            f"{inode.size}")  # fmt: skip
            zero_bytes(target)
        for inode_id, inode in self.inodes.items():
            if stat.S_ISLNK(inode.mode) and inode_id not in targets:
                self.damage("symlink", f"{self.where(inode_id)}: a symlink without a target")

    def check_xattrs(self) -> None:
        digests: dict[int, int] = defaultdict(int)
        failing: set[int] = set()  # inodes with a row that has a line of its own
        for inode_id, name_ct, value_ct in self.metadata.scan_xattrs():
            self.summary.xattrs += 1
            digests[inode_id] ^= self.metadata.xattr_element(inode_id, name_ct, value_ct)
            if inode_id not in self.inodes and inode_id not in self.bad_inodes:
                self.damage("xattr", f"inode {inode_id}: an extended attribute of an inode that does not exist")
                continue
            try:
                name = _show(self.names.decrypt_xattr_name(inode_id, name_ct))
            except IntegrityError:
                self.damage("xattr", f"{self.where(inode_id)}: an extended attribute's name fails authentication")
                failing.add(inode_id)
                continue
            try:
                zero_bytes(self.names.decrypt_xattr_value(inode_id, name_ct, value_ct))
            except IntegrityError:
                self.damage("xattr", f"{self.where(inode_id)}: the value of extended attribute {name} fails "
                            "authentication")  # fmt: skip
                failing.add(inode_id)
        for inode_id, inode in self.inodes.items():
            if inode_id not in failing and digests.get(inode_id, 0) != inode.xattrs:
                self.damage("xattr", f"{self.where(inode_id)}: its extended attributes do not match their set "
                            "digest (one was removed, added or put back outside envfs)")  # fmt: skip

    # -- data ------------------------------------------------------------------

    def check_files(self) -> None:
        listed = {key.version for key in self.superblock.keys}
        bound = self.superblock.rekey_after_block_writes + 1
        for inode_id, inode in self.inodes.items():
            if inode.block_writes > bound:
                self.damage("counter", f"{self.where(inode_id)}: {inode.block_writes} block writes under one key, "
                            f"above the bound of {bound}")  # fmt: skip
            if not stat.S_ISREG(inode.mode) or inode.nlink == 0:
                continue  # an orphan's data goes with it at the next mount
            if inode.key_version not in listed:
                self.damage("keyversion", f"{self.where(inode_id)}: data under key version {inode.key_version}, "
                            "which the superblock does not list")  # fmt: skip
                continue
            self.check_data(inode)

    def check_data(self, inode: Inode) -> None:
        path = self.store.data_file(inode.id, inode.key_version, inode.key_epoch)
        name = path.relative_to(self.store.path)
        where = self.where(inode.id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if inode.size == 0:
                return  # an empty file needs no data file (FORMAT.md 4.1)
            self.damage("missing", f"{where}: data file {name} does not exist ({inode.size} bytes lost)")
            return
        except OSError as e:
            self.damage("data", f"{where}: data file {name}: {e.strerror}")
            return
        try:
            count = block_count(inode.size)
            length = os.fstat(fd).st_size
            intact = count
            if length < min_data_length(inode.size):
                intact = length // SLOT_SIZE  # blocks before the cut are whole slots; the rest lack bytes
                missing = f"block {intact}" if intact == count - 1 else f"blocks {intact}-{count - 1}"
                self.damage("short", f"{where}: data file cut short ({length} of at least "
                            f"{min_data_length(inode.size)} bytes): {missing} missing")  # fmt: skip
            elif length > max_data_length(inode.size):
                self.leftover(f"{where}: {length - max_data_length(inode.size)} bytes past the end of data file "
                              f"{name} (cut off when the file is next opened)")  # fmt: skip
            if intact:
                try:
                    cipher = self.offline.keys().file_cipher(inode.id, inode.key_version, inode.key_epoch)
                except EnvfsError as e:
                    self.damage("data", f"{where}: no key for data file {name}: {e}")
                    return
                try:
                    self.check_blocks(fd, cipher, intact, min(length, max_data_length(inode.size)), where)
                finally:
                    cipher.close()
            self.summary.blocks += intact
            self.summary.bytes += inode.size
        except OSError as e:
            self.damage("data", f"{where}: data file {name}: {e.strerror}")
        finally:
            os.close(fd)

    def check_blocks(self, fd: int, cipher: BlockCipher, count: int, end: int, where: str) -> None:
        """Authenticate blocks [0, count) of a data file `end` bytes long. Slots in
        the backing filesystem's holes are all zero, i.e. holes: not read."""
        index = 0
        while index < count:
            try:
                data = os.lseek(fd, index * SLOT_SIZE, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return  # holes to the end
                data, hole = index * SLOT_SIZE, end
            else:
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            first = data // SLOT_SIZE
            stop = min(count, -(-hole // SLOT_SIZE))
            if first >= stop:
                return
            for start in range(first, stop, _CHUNK_BLOCKS):
                self.check_run(fd, cipher, start, min(stop, start + _CHUNK_BLOCKS), end, where)
            index = stop

    def check_run(self, fd: int, cipher: BlockCipher, first: int, stop: int, end: int, where: str) -> None:
        """Authenticate blocks [first, stop) with one read, and on a failure each on its own."""
        want = min(stop * SLOT_SIZE, end) - first * SLOT_SIZE
        slots = memoryview(self._slots)[:want]
        plain = memoryview(self._plain)[: (stop - first) * BLOCK_SIZE]
        got = os.preadv(fd, [slots], first * SLOT_SIZE)
        if got < want:
            raise OSError(errno.EIO, f"read {got} of {want} bytes at block {first}")
        try:
            try:
                cipher.decrypt_blocks_into(first, slots, plain)
            except IntegrityError:
                for k in range(stop - first):
                    slot = slots[k * SLOT_SIZE : (k + 1) * SLOT_SIZE]
                    try:
                        cipher.decrypt_blocks_into(first + k, slot, plain[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE])
                    except IntegrityError:
                        self.damage("block", f"{where} block {first + k}: fails authentication")
        finally:
            zero_buffer(plain)

    def check_data_files(self) -> None:
        """Data files nothing uses: of another key version or epoch, or of no inode."""
        try:
            found = self.store.data_files()
        except OSError as e:
            self.damage("data", f"cannot list the data directory: {e}")
            return
        for inode_id, key_version, key_epoch, path in sorted(found):
            name = path.relative_to(self.store.path)
            inode = self.inodes.get(inode_id)
            if inode_id in self.bad_inodes:
                continue  # its row is damaged, so which data file is current is unknown
            if inode is None:
                self.leftover(f"inode {inode_id}: data file {name} of an inode that does not exist; unused "
                              "(a mount after a crash removes it)")  # fmt: skip
            elif (inode.key_version, inode.key_epoch) != (key_version, key_epoch):
                self.leftover(f"{self.where(inode_id)}: data file {name} is not the current one (key version "
                              f"{inode.key_version}, epoch {inode.key_epoch}); unused (a mount after a crash "
                              "removes it)")  # fmt: skip
            elif not stat.S_ISREG(inode.mode):
                self.damage("data", f"{self.where(inode_id)}: data file {name} for an inode that is not a "
                            "regular file")  # fmt: skip
            elif path != self.store.data_file(inode_id, key_version, key_epoch):
                self.leftover(f"{self.where(inode_id)}: data file {name} is in the wrong directory; unused")
