"""`envfs fsck`, run for real on stores written through a mount.

One store with a varied tree is built once per module; each case damages a
copy of it the way an attacker or a failing disk could and checks that fsck
names exactly the damaged items (with inode, path and block), exits 40, and
changes nothing. A copy works with the same token: the token lives in the
environment's XDG data home, not in the store.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import Envfs, envfs_mounts, flip, process_gone

from envfs.metadata import Inode
from envfs.offline import OfflineStore
from envfs.store import KeyVersion

BLOCK = 4096
SLOT = 4096 + 28  # nonce (12) || ciphertext (4096) || tag (16): envfs.blocks.SLOT_SIZE
NONCE = 12
DAMAGE_EXIT = 40
# The kind words of problem lines (envfs/fsck.py); `leftover` and `note` are not damage.
KINDS = {
    "anchor", "sqlite", "mac", "name", "entry", "entryset", "nlink", "unreachable", "cycle", "symlink", "xattr",
    "keyversion", "counter", "missing", "short", "block", "data", "leftover", "note",
}  # fmt: skip
SUMMARY = re.compile(
    r"inodes: +(?P<inodes>\d+) \((?P<directories>\d+) directories, (?P<files>\d+) files, "
    r"(?P<symlinks>\d+) symlinks, (?P<others>\d+) other\)\n"
    r"entries: +(?P<entries>\d+)\n"
    r"xattrs: +(?P<xattrs>\d+)\n"
    r"blocks: +(?P<blocks>\d+) checked \((?P<bytes>\d+) bytes of file data\)\n"
    r"leftovers: +(?P<leftovers>\d+)\n"
    r"damaged: +(?P<damaged>\d+)\b"
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


@dataclass
class Pristine:
    """The module's store, unmounted, and what a walk of its mount saw."""

    env: Envfs
    ino: dict[str, int]  # "/path" -> inode id
    counts: dict[str, int]


@dataclass
class Fsck:
    code: int
    stdout: str
    stderr: str

    @property
    def problems(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.split(":", 1)[0] in KINDS]

    @property
    def damage(self) -> list[str]:
        return [line for line in self.problems if not line.startswith(("leftover:", "note:"))]

    def summary(self) -> dict[str, int]:
        found = SUMMARY.search(self.stdout)
        assert found, self.stdout
        return {key: int(value) for key, value in found.groupdict().items()}


def build_tree(root: Path) -> None:
    """Files of many sizes and shapes (holes made by truncate, by a write past
    the end and by a punch; full and exact last slots), directories, symlinks,
    a hard link, xattrs and a FIFO."""
    for name, size in [("empty", 0), ("one", 1), ("edge", 4095), ("block", 4096), ("over", 4097)]:
        (root / name).write_bytes(os.urandom(size))
    (root / "big").write_bytes(os.urandom(6 * BLOCK + 100))
    with open(root / "hole", "wb") as f:  # blocks 3-9 a hole in the middle
        f.write(os.urandom(3 * BLOCK))
        f.seek(10 * BLOCK)
        f.write(os.urandom(BLOCK + 10))
    with open(root / "sparse", "wb") as f:
        f.truncate(1 << 30)
        f.seek(123_456_789)
        f.write(b"an island in a sea of holes")
    (root / "grown").write_bytes(os.urandom(100))
    os.truncate(root / "grown", 10_000)  # the old last block rewritten as a full slot
    (root / "shrunk").write_bytes(os.urandom(5 * BLOCK))
    os.truncate(root / "shrunk", 5000)  # the new last block stored as a full slot
    (root / "punched").write_bytes(os.urandom(4 * BLOCK))
    fd = os.open(root / "punched", os.O_RDWR)
    try:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BLOCK, BLOCK) != 0:
            assert ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "deep.txt").write_bytes(os.urandom(20_000))
    (root / "dir" / "victim").write_bytes(os.urandom(3 * BLOCK + 5))
    os.symlink("../big", root / "dir" / "link")
    os.symlink("/" + "long-target/" * 300, root / "long-link")
    os.link(root / "big", root / "dir" / "sub" / "big-link")
    os.mkfifo(root / "fifo")
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "f").write_bytes(os.urandom(5000))
    os.setxattr(root / "big", "user.a", b"the value of a")
    os.setxattr(root / "dir", "user.b", b"the value of b")
    os.setxattr(root / "one", "user.empty", b"")


def survey(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Inode ids by path, and the counts fsck's summary must give."""
    ino = {"/": os.stat(root).st_ino}
    first: dict[int, tuple[Path, os.stat_result]] = {ino["/"]: (root, os.stat(root))}
    entries = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            ino["/" + str(path.relative_to(root))] = st.st_ino
            first.setdefault(st.st_ino, (path, st))
            entries += 1
    modes = [st.st_mode for _, st in first.values()]
    files = [st for _, st in first.values() if stat.S_ISREG(st.st_mode)]
    counts = {
        "inodes": len(first),
        "directories": sum(map(stat.S_ISDIR, modes)),
        "files": len(files),
        "symlinks": sum(map(stat.S_ISLNK, modes)),
        "others": sum(1 for m in modes if not (stat.S_ISDIR(m) or stat.S_ISREG(m) or stat.S_ISLNK(m))),
        "entries": entries,
        "xattrs": sum(len(os.listxattr(path)) for path, st in first.values() if not stat.S_ISLNK(st.st_mode)),
        "blocks": sum(math.ceil(st.st_size / BLOCK) for st in files),
        "bytes": sum(st.st_size for st in files),
        "leftovers": 0,
        "damaged": 0,
    }
    return ino, counts


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pristine]:
    env = Envfs(tmp_path_factory.mktemp("fsck"))
    try:
        env.init()
        env.mount()
        build_tree(env.mnt)
        ino, counts = survey(env.mnt)
        env.unmount()
        yield Pristine(env, ino, counts)
    finally:
        env.cleanup()


@pytest.fixture
def copy(pristine: Pristine, tmp_path: Path) -> Path:
    """A copy of the module's store for one test to damage."""
    target = tmp_path / "store"
    # cp keeps the 1 GiB sparse data file sparse; shutil.copytree would write every zero.
    subprocess.run(["cp", "-a", "--sparse=always", str(pristine.env.store), str(target)], check=True)
    # The copies share the module store's token, and its anchor: each test's
    # copy is checked as a store without one, for what the rows' own MACs
    # catch (test_anchor.py checks the anchor).
    pristine.env.forget_anchor()
    return target


def fsck(env: Envfs, store: Path, run_env: dict[str, str] | None = None) -> Fsck:
    result = env.run("fsck", str(store), check=False, env=run_env)
    return Fsck(result.returncode, result.stdout, result.stderr)


def data_file(store: Path, inode_id: int) -> Path:
    found = sorted((store / "data" / f"{inode_id & 0xFF:02x}").glob(f"{inode_id:016x}.*.*"))
    assert len(found) == 1, f"inode {inode_id}: data files {found}"
    return found[0]


def edit_db(store: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(store / "meta.db")
    try:
        with db:
            assert db.execute(sql, args).rowcount == 1
    finally:
        db.close()


def digest(path: Path) -> str:
    """SHA-256 of a file's data regions and where they are: holes are not read
    (the sparse data file is 1 GiB), yet any byte written shows."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        position, end = 0, os.fstat(fd).st_size
        while position < end:
            try:
                data = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            h.update(f"{data}:{hole}:".encode() + os.pread(fd, hole - data, data))
            position = hole
        h.update(f"{end}".encode())
    finally:
        os.close(fd)
    return h.hexdigest()


def snapshot(store: Path) -> dict[str, tuple[int, int, str]]:
    """Every file's mode, mtime and content; of the lock file only that it exists."""
    found = {}
    for path in sorted(store.rglob("*")):
        st = path.lstat()
        if path.name == "lock" or path.is_dir():
            found[str(path.relative_to(store))] = (st.st_mode, 0, "")
        else:
            found[str(path.relative_to(store))] = (st.st_mode, st.st_mtime_ns, digest(path))
    return found


def assert_problems(result: Fsck, expected: list[str]) -> None:
    """Each pattern matches exactly one problem line, and every problem line one pattern."""
    lines = result.problems
    for pattern in expected:
        hits = [line for line in lines if re.fullmatch(pattern, line)]
        assert len(hits) == 1, f"{pattern!r} matched {hits} in:\n{result.stdout}"
    unexpected = [line for line in lines if not any(re.fullmatch(p, line) for p in expected)]
    assert not unexpected, f"unexpected problem lines {unexpected} in:\n{result.stdout}"


# -- a clean store --------------------------------------------------------------


def test_clean_store(pristine: Pristine, copy: Path) -> None:
    result = fsck(pristine.env, copy)
    assert result.code == 0, result.stdout + result.stderr
    assert result.problems == []
    assert result.summary() == pristine.counts
    assert "(clean)" in result.stdout


# -- damaged data ---------------------------------------------------------------


def test_flipped_bytes_in_two_blocks(pristine: Pristine, copy: Path) -> None:
    big = pristine.ino["/big"]
    path = data_file(copy, big)
    flip(path, 1 * SLOT + NONCE + 1000)  # a ciphertext byte of block 1
    flip(path, 4 * SLOT + NONCE + BLOCK + 3)  # a tag byte of block 4
    result = fsck(pristine.env, copy)
    assert result.code == DAMAGE_EXIT, result.stdout + result.stderr
    assert_problems(result, [
        rf"block: inode {big} \(/big\) block 1: fails authentication",
        rf"block: inode {big} \(/big\) block 4: fails authentication",
    ])  # fmt: skip
    assert result.summary()["damaged"] == 2
    assert "envfs: " in result.stderr and "2 damaged" in result.stderr


def _cut_short(p: Pristine, store: Path) -> list[str]:
    victim = p.ino["/dir/victim"]  # 4 blocks: the cut keeps block 0 and a part of block 1
    os.truncate(data_file(store, victim), SLOT + 2000)
    return [rf"short: inode {victim} \(/dir/victim\): data file cut short \({SLOT + 2000} of at least "
            rf"{3 * SLOT + 5 + 28} bytes\): blocks 1-3 missing"]  # fmt: skip


def _last_block_cut(p: Pristine, store: Path) -> list[str]:
    over = p.ino["/over"]  # 2 blocks, the last one of 1 byte stored exactly
    os.truncate(data_file(store, over), SLOT + 28)
    return [rf"short: inode {over} \(/over\): data file cut short \({SLOT + 28} of at least {SLOT + 29} bytes\): "
            r"block 1 missing"]  # fmt: skip


def _data_file_deleted(p: Pristine, store: Path) -> list[str]:
    victim = p.ino["/dir/victim"]
    data_file(store, victim).unlink()
    return [
        rf"missing: inode {victim} \(/dir/victim\): data file data/.* does not exist \({3 * BLOCK + 5} bytes lost\)"
    ]


def _slots_swapped(p: Pristine, store: Path) -> list[str]:
    deep = p.ino["/dir/sub/deep.txt"]  # 5 blocks
    path = data_file(store, deep)
    data = bytearray(path.read_bytes())
    data[0:SLOT], data[2 * SLOT : 3 * SLOT] = data[2 * SLOT : 3 * SLOT], data[0:SLOT]
    path.write_bytes(data)
    return [rf"block: inode {deep} \(/dir/sub/deep.txt\) block {k}: fails authentication" for k in (0, 2)]


def _island_flipped(p: Pristine, store: Path) -> list[str]:
    sparse = p.ino["/sparse"]  # a 1 GiB file of holes but one block
    index = 123_456_789 // BLOCK
    flip(data_file(store, sparse), index * SLOT + NONCE + 5)
    return [rf"block: inode {sparse} \(/sparse\) block {index}: fails authentication"]


# -- damaged metadata -------------------------------------------------------------


def _inode_size_edited(p: Pristine, store: Path) -> list[str]:
    over = p.ino["/over"]
    edit_db(store, "UPDATE inodes SET size = size + 1 WHERE id = ?", over)
    return [rf"mac: inode {over} \(/over\): metadata MAC mismatch"]


def _entry_repointed(p: Pristine, store: Path) -> list[str]:
    one, edge = p.ino["/one"], p.ino["/edge"]
    edit_db(store, "UPDATE dentries SET inode = ? WHERE inode = ?", edge, one)  # "one" now names edge's inode
    return [
        rf"mac: inode {edge} \(/edge\): directory entry \d+ /one fails its MAC",
        rf"unreachable: inode {one}: no directory entry names it \(nlink 1\)",
    ]


def _entries_differ(directory: int, path: str) -> str:
    return (
        rf"entryset: inode {directory} \({re.escape(path)}\): its entries do not match its entry set digest "
        r"\(an entry was removed or added outside envfs\)"
    )


def _directory_entry_deleted(p: Pristine, store: Path) -> list[str]:
    dir_, sub, deep = p.ino["/dir"], p.ino["/dir/sub"], p.ino["/dir/sub/deep.txt"]
    edit_db(store, "DELETE FROM dentries WHERE inode = ?", sub)
    # big-link in the lost directory still counts as a link of /big, which the root reaches.
    return [
        rf"unreachable: inode {sub}: no directory entry names it \(nlink 2\)",
        rf"unreachable: inode {deep} \(\?/deep.txt\): not reachable from the root",
        rf"nlink: inode {dir_} \(/dir\): nlink is 3, subdirectories give 2",
        _entries_differ(dir_, "/dir"),
    ]


def _file_entry_deleted(p: Pristine, store: Path) -> list[str]:
    big = p.ino["/big"]
    edit_db(store, "DELETE FROM dentries WHERE inode = ? AND parent = 1", big)
    return [
        rf"nlink: inode {big} \(/dir/sub/big-link\): nlink is 2, entries naming it give 1",
        _entries_differ(1, "/"),
    ]


def _entry_moved(p: Pristine, store: Path) -> list[str]:
    edge, dir_ = p.ino["/edge"], p.ino["/dir"]
    edit_db(store, "UPDATE dentries SET parent = ? WHERE inode = ?", dir_, edge)
    return [
        rf"mac: inode {edge}: directory entry \d+ in directory {dir_} \(/dir\) fails its MAC",
        rf"unreachable: inode {edge}: no directory entry names it \(nlink 1\)",
        _entries_differ(1, "/"),  # the entry left it (in /dir, its failing MAC is the line)
    ]


def _xattr_values_swapped(p: Pristine, store: Path) -> list[str]:
    big, dir_ = p.ino["/big"], p.ino["/dir"]
    db = sqlite3.connect(store / "meta.db")
    try:
        with db:
            (a,) = db.execute("SELECT value FROM xattrs WHERE inode = ?", (big,)).fetchone()
            (b,) = db.execute("SELECT value FROM xattrs WHERE inode = ?", (dir_,)).fetchone()
            db.execute("UPDATE xattrs SET value = ? WHERE inode = ?", (b, big))
            db.execute("UPDATE xattrs SET value = ? WHERE inode = ?", (a, dir_))
    finally:
        db.close()
    return [
        rf"xattr: inode {big} \(/big\): the value of extended attribute user.a fails authentication",
        rf"xattr: inode {dir_} \(/dir\): the value of extended attribute user.b fails authentication",
    ]


def _symlink_target_deleted(p: Pristine, store: Path) -> list[str]:
    link = p.ino["/dir/link"]
    edit_db(store, "DELETE FROM symlinks WHERE inode = ?", link)
    return [rf"symlink: inode {link} \(/dir/link\): a symlink without a target"]


def _symlink_target_moved(p: Pristine, store: Path) -> list[str]:
    link, long_link = p.ino["/dir/link"], p.ino["/long-link"]
    edit_db(store, "DELETE FROM symlinks WHERE inode = ?", long_link)
    edit_db(store, "UPDATE symlinks SET inode = ? WHERE inode = ?", long_link, link)
    return [
        rf"symlink: inode {link} \(/dir/link\): a symlink without a target",
        rf"symlink: inode {long_link} \(/long-link\): the target fails authentication",
    ]


TAMPERING: dict[str, Callable[[Pristine, Path], list[str]]] = {
    "data file cut short": _cut_short,
    "last block cut": _last_block_cut,
    "data file deleted": _data_file_deleted,
    "slots swapped": _slots_swapped,
    "sparse island flipped": _island_flipped,
    "inode size edited": _inode_size_edited,
    "entry repointed": _entry_repointed,
    "directory entry deleted": _directory_entry_deleted,
    "hard link entry deleted": _file_entry_deleted,
    "entry moved": _entry_moved,
    "xattr values swapped": _xattr_values_swapped,
    "symlink target deleted": _symlink_target_deleted,
    "symlink target moved": _symlink_target_moved,
}


@pytest.mark.parametrize("case", TAMPERING)
def test_damage_is_reported(pristine: Pristine, copy: Path, case: str) -> None:
    expected = TAMPERING[case](pristine, copy)
    result = fsck(pristine.env, copy)
    assert result.code == DAMAGE_EXIT, result.stdout + result.stderr
    assert_problems(result, expected)
    assert result.summary()["damaged"] == len(expected)


# -- leftovers --------------------------------------------------------------------


def test_leftovers_are_not_damage(pristine: Pristine, copy: Path) -> None:
    big, block = pristine.ino["/big"], pristine.ino["/block"]
    current = data_file(copy, big)
    stale = current.with_name(current.name.rsplit(".", 1)[0] + ".5")
    shutil.copy2(current, stale)
    # Bytes past max_data_length (a 4096-byte file's one full slot), as a killed extending write leaves them.
    with open(data_file(copy, block), "ab") as f:
        f.write(os.urandom(17))
    result = fsck(pristine.env, copy)
    assert result.code == 0, result.stdout + result.stderr
    assert_problems(result, [
        rf"leftover: inode {big} \(/big\): data file data/../{stale.name} is not the current one \(key version 1, "
        r"epoch 0\); unused \(a mount after a crash removes it\)",
        rf"leftover: inode {block} \(/block\): 17 bytes past the end of data file data/../{block:016x}.1.0 "
        r"\(cut off when the file is next opened\)",
    ])  # fmt: skip
    assert result.summary()["leftovers"] == 2
    assert result.summary()["damaged"] == 0


@pytest.mark.timeout(60)
def test_orphan_after_a_crash_is_a_leftover(pristine: Pristine, copy: Path) -> None:
    env = pristine.env
    env.run("mount", str(copy), str(env.mnt), "--log", str(env.log))
    pid = int(json.loads((copy / "lock").read_text())["pid"])
    victim = env.mnt / "dir" / "victim"
    orphan = os.stat(victim).st_ino
    fd = os.open(victim, os.O_RDONLY)
    try:
        victim.unlink()  # open and unlinked: an orphan until the last close
        dir_fd = os.open(env.mnt / "dir", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # commits the unlink at once
        finally:
            os.close(dir_fd)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the connection died with the daemon
        subprocess.run(["fusermount3", "-u", "-z", str(env.mnt)], capture_output=True)
    assert str(env.mnt) not in envfs_mounts()
    result = fsck(env, copy)
    assert result.code == 0, result.stdout + result.stderr
    assert_problems(result, [
        r"note: the store was not unmounted cleanly; the next mount recovers it",
        rf"leftover: inode {orphan}: orphan \(nlink 0, no entry names it\); the next mount deletes it",
    ])  # fmt: skip


# -- refusals and read-only ---------------------------------------------------------


def test_mounted_store_is_refused(pristine: Pristine, copy: Path) -> None:
    env = pristine.env
    env.run("mount", str(copy), str(env.mnt), "--log", str(env.log))
    try:
        result = fsck(env, copy)
    finally:
        env.unmount()
    assert result.code == 24, result.stdout + result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "already mounted" in result.stderr


def test_wrong_pin(pristine: Pristine, copy: Path) -> None:
    result = fsck(pristine.env, copy, run_env=dict(pristine.env.env, ENVFS_PIN="not-the-pin"))
    assert result.code == 10, result.stdout + result.stderr
    assert result.stdout == ""


def test_fsck_changes_nothing(pristine: Pristine, copy: Path) -> None:
    expected = _cut_short(pristine, copy) + _entry_repointed(pristine, copy) + _xattr_values_swapped(pristine, copy)
    flip(data_file(copy, pristine.ino["/hole"]), 10 * SLOT + 7)
    expected.append(rf"block: inode {pristine.ino['/hole']} \(/hole\) block 10: fails authentication")
    big = data_file(copy, pristine.ino["/big"])
    shutil.copy2(big, big.with_name(big.name.rsplit(".", 1)[0] + ".3"))
    expected.append(r"leftover: .* is not the current one .*")
    before = snapshot(copy)
    result = fsck(pristine.env, copy)
    assert result.code == DAMAGE_EXIT, result.stdout + result.stderr
    assert_problems(result, expected)
    assert snapshot(copy) == before


# -- inconsistencies only a holder of the keys can make ------------------------------


def forge(store: str, ino: dict[str, int]) -> None:
    """Rows with valid MACs and names that break the tree's rules, as a bug in
    envfs (or someone with the token and PIN) could write them."""
    with OfflineStore(store, os.environ["ENVFS_PIN"], "fsck") as offline:
        md, names = offline.metadata(), offline.keys().name_cipher()

        def add(parent_id: int, name: str, inode: int) -> None:
            parent = md.get_inode(parent_id)
            if parent is None:  # an entry in a directory that does not exist
                parent = Inode(parent_id, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0)
            assert md.add_entry(parent, names.encrypt_name(parent_id, name.encode()), inode)
            if md.get_inode(parent_id) is not None:
                md.save_inode(parent)  # with its entry set digest, as envfs keeps it

        def remove(parent_id: int, name: str, inode: int) -> None:
            parent = md.get_inode(parent_id)
            assert parent is not None
            md.remove_entry(parent, names.encrypt_name(parent_id, name.encode()), inode)
            md.save_inode(parent)

        def change(inode_id: int, **values: int) -> None:
            inode = md.get_inode(inode_id)
            assert inode is not None
            for column, value in values.items():
                setattr(inode, column, value)
            md.save_inode(inode)

        a, c, dir_ = ino["/a"], ino["/a/b/c"], ino["/dir"]
        remove(1, "a", a)  # a/b/c and a inside c: a cycle
        add(c, "a", a)
        change(c, nlink=3)
        add(1, "again", dir_)  # a second name for a directory (the root's count stays as a left)
        add(dir_, "root", 1)
        change(dir_, nlink=4)
        add(ino["/one"], "child", ino["/edge"])
        change(ino["/edge"], nlink=2)
        add(1, "ghost", 99999)
        add(88888, "lost", ino["/block"])
        change(ino["/block"], nlink=2)
        change(ino["/dir/link"], size=7)
        md.set_symlink(ino["/fifo"], names.encrypt_target(ino["/fifo"], b"x"))
        xattr = names.encrypt_xattr_name(77777, b"user.x")
        missing = Inode(77777, stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0)  # has no row
        md.set_xattr(missing, xattr, names.encrypt_xattr_value(77777, xattr, b"value"))
        change(ino["/one"], block_writes=offline.superblock.rekey_after_block_writes + 2)
        change(ino["/over"], key_version=9)
        change(ino["/grown"], nlink=0)
        remove(1, "punched", ino["/punched"])
        change(ino["/punched"], nlink=0)
        names.close()


def begin_rotation(store: str, ino: dict[str, int]) -> None:
    """List a key version 2 in the superblock, as the first step of `envfs rotate` does."""
    with OfflineStore(store, os.environ["ENVFS_PIN"], "fsck") as offline:
        keys, superblock = offline.keys(), offline.superblock  # keys verified before the change
        superblock.keys.append(KeyVersion(2, f"envfs-{superblock.uuid}-v2", "0" * 32))
        superblock.mac = keys.superblock_mac(superblock)
        offline.store.write_superblock(superblock)


def as_key_holder(env: Envfs, action: Callable[[str, dict[str, int]], None], store: Path, ino: dict[str, int]) -> None:
    """Run `action` in a process of its own with the environment's token, as envfs commands run."""
    run_env = dict(env.env, PYTHONPATH=str(Path(__file__).parent.parent))
    command = [sys.executable, __file__, action.__name__, str(store), json.dumps(ino)]
    result = subprocess.run(command, env=run_env, timeout=60, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_rotation_in_progress_is_a_note(pristine: Pristine, copy: Path) -> None:
    as_key_holder(pristine.env, begin_rotation, copy, pristine.ino)
    result = fsck(pristine.env, copy)
    assert result.code == 0, result.stdout + result.stderr
    assert_problems(result, [
        r"note: a key rotation to key version 2 is in progress: files under older key versions are expected "
        r"\(`envfs rotate` finishes it\)",
    ])  # fmt: skip


@pytest.mark.timeout(60)
def test_forged_inconsistencies(pristine: Pristine, copy: Path) -> None:
    ino = pristine.ino
    as_key_holder(pristine.env, forge, copy, ino)
    big = data_file(copy, ino["/big"])
    (copy / "data" / f"{ino['/dir'] & 0xFF:02x}").mkdir(exist_ok=True)
    shutil.copy2(big, copy / "data" / f"{ino['/dir'] & 0xFF:02x}" / f"{ino['/dir']:016x}.1.0")
    a, b, c, dir_, bound = ino["/a"], ino["/a/b"], ino["/a/b/c"], ino["/dir"], 2**31 + 1
    result = fsck(pristine.env, copy)
    assert result.code == DAMAGE_EXIT, result.stdout + result.stderr
    assert_problems(result, [
        rf"cycle: inode {a} \(\?/b/c/a\): directories {a}, {b}, {c} contain each other, cut off from the root",
        rf"unreachable: inode {ino['/a/b/c/f']} \(\?/.*/f\): not reachable from the root",
        rf"entry: inode {dir_} \(/dir\): a directory named by 2 entries",
        rf"entry: inode 1 \(/\): the root is named by entry \d+ in inode {dir_} \(/dir\)",
        rf"entry: inode {ino['/edge']} \(/edge\): entry \d+ is in inode {ino['/one']} \(/one\), which is not a "
        "directory",
        r"entry: inode 99999: entry \d+ /ghost names it, but it does not exist",
        rf"entry: inode {ino['/block']} \(/block\): entry \d+ is in directory 88888, which does not exist",
        rf"symlink: inode {ino['/dir/link']} \(/dir/link\): the target is 6 bytes, size says 7",
        rf"symlink: inode {ino['/fifo']} \(/fifo\): a symlink target for an inode that is not a symlink",
        r"xattr: inode 77777: an extended attribute of an inode that does not exist",
        rf"counter: inode {ino['/one']} \(/one\): {bound + 1} block writes under one key, above the bound of {bound}",
        rf"keyversion: inode {ino['/over']} \(/over\): data under key version 9, which the superblock does not list",
        rf"leftover: inode {ino['/over']} \(/over\): data file .* is not the current one \(key version 9, epoch 0\).*",
        rf"nlink: inode {ino['/grown']} \(/grown\): nlink is 0, entries naming it give 1",
        rf"leftover: inode {ino['/punched']}: orphan \(nlink 0, no entry names it\); the next mount deletes it",
        rf"data: inode {dir_} \(/dir\): data file data/../{dir_:016x}.1.0 for an inode that is not a regular file",
    ])  # fmt: skip


if __name__ == "__main__":
    {"forge": forge, "begin_rotation": begin_rotation}[sys.argv[1]](sys.argv[2], json.loads(sys.argv[3]))
