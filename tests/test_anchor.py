"""The store's anchor in the HSM (FORMAT.md section 12): an older copy of the
store, or of meta.db alone, put back while the store was closed is refused by
every writer and reported by fsck; a crash leaves the anchor "in use", and the
next writer accepts the store it finds.

The token is read and changed behind envfs's back (`helpers.anchor_objects`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
from helpers import Envfs, anchor_objects, envfs_mounts

from envfs.anchor import CLEAN, IN_USE, AnchorValue
from envfs.errors import CorruptStore


def _anchor(env: Envfs) -> tuple[int, int, bytes]:
    """(state, generation, digest) of the one anchor object, checked against FORMAT.md 12.1."""
    (raw,) = anchor_objects(env)
    assert len(raw) == 42
    version, state, generation, digest = struct.unpack(">BBQ32s", raw)
    assert version == 1 and state in (0, 1)
    return state, generation, digest


def _digest(env: Envfs) -> bytes:
    return hashlib.sha256((env.store / "meta.db").read_bytes()).digest()


def _put_back(env: Envfs, copy: Path) -> None:
    shutil.rmtree(env.store)
    shutil.copytree(copy, env.store, symlinks=True)


def _refused(env: Envfs, *args: str) -> str:
    """Run a command that must be refused as a put-back store: exit 27, one line."""
    result = env.run(*args, check=False)
    assert result.returncode == 27, (args, result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and "envfs reanchor" in result.stderr, result.stderr
    return result.stderr


def test_anchor_follows_format(store: Envfs) -> None:
    at_init = _digest(store)
    assert _anchor(store) == (0, 1, at_init)  # init: clean, generation 1
    store.mount()
    (store.mnt / "f").write_bytes(b"x" * 5000)
    assert _anchor(store) == (1, 1, at_init)  # in use, with the last clean digest
    store.unmount()
    assert _anchor(store) == (0, 2, _digest(store))
    assert not (store.store / "meta.db-wal").exists()


def _copy_after_writing(store: Envfs, tmp_path: Path, name: str) -> Path:
    """Write file `name` through a mount, keep a copy of the cleanly closed
    store, and mount the store again."""
    store.mount()
    (store.mnt / name).write_text(f"{name}, before the copy")
    store.unmount()
    copy = tmp_path / "copy"
    shutil.copytree(store.store, copy, symlinks=True)
    store.mount()
    return copy


def _mount_refused(store: Envfs) -> None:
    _refused(store, "mount", str(store.store), str(store.mnt), "--log", str(store.log))
    assert str(store.mnt) not in envfs_mounts()


def test_store_put_back_is_refused(store: Envfs, tmp_path: Path) -> None:
    copy = _copy_after_writing(store, tmp_path, "old")
    (store.mnt / "new").write_text("after the copy")
    os.unlink(store.mnt / "old")
    store.unmount()
    anchor_before = _anchor(store)

    _put_back(store, copy)
    meta_before = (store.store / "meta.db").read_bytes()
    _mount_refused(store)
    _refused(store, "rotate", str(store.store))
    _refused(store, "retire", str(store.store))
    fsck = store.run("fsck", str(store.store), check=False)
    assert fsck.returncode == 40
    assert [line for line in fsck.stdout.splitlines() if line.startswith("anchor:")], fsck.stdout
    # Refusing changed nothing: not the store, not the anchor.
    assert (store.store / "meta.db").read_bytes() == meta_before
    assert _anchor(store) == anchor_before

    # An operator who restored it on purpose takes it as it is.
    assert store.run("reanchor", str(store.store)).returncode == 0
    store.mount()
    assert sorted(os.listdir(store.mnt)) == ["old"]
    store.unmount()
    assert "damaged:   0 (clean)" in store.run("fsck", str(store.store)).stdout


def test_fsck_leaves_a_refused_store_as_it_is(store: Envfs, tmp_path: Path) -> None:
    """A put-back copy that a crash had left with transactions in its -wal file: fsck
    reads them (from a private copy) and changes no file of the store."""
    store.mount()
    (store.mnt / "a").write_text("a")
    time.sleep(0.5)  # committed into meta.db-wal
    store.kill_daemon()
    copy = tmp_path / "copy"
    shutil.copytree(store.store, copy, symlinks=True)
    store.mount()
    (store.mnt / "b").write_text("b")
    store.unmount()
    _put_back(store, copy)
    files = {p.name: p.read_bytes() for p in store.store.iterdir() if p.is_file() and p.name != "lock"}
    assert files["meta.db-wal"]
    fsck = store.run("fsck", str(store.store), check=False)
    assert fsck.returncode == 40 and fsck.stdout.startswith("anchor:"), fsck.stdout
    assert "inodes:    2 " in fsck.stdout  # the root and "a", which only the -wal file holds
    assert {p.name: p.read_bytes() for p in store.store.iterdir() if p.is_file() and p.name != "lock"} == files


def test_meta_db_put_back_alone_is_refused(store: Envfs, tmp_path: Path) -> None:
    store.mount()
    (store.mnt / "a").write_text("a")
    store.unmount()
    old_meta = tmp_path / "meta.db"
    shutil.copy2(store.store / "meta.db", old_meta)
    store.mount()
    os.rename(store.mnt / "a", store.mnt / "b")
    store.unmount()
    shutil.copy2(old_meta, store.store / "meta.db")
    _mount_refused(store)
    # So is meta.db edited while the store was closed: one byte of its free space.
    store.run("reanchor", str(store.store))
    store.mount()
    store.unmount()
    with open(store.store / "meta.db", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))
    _mount_refused(store)


def test_crash_leaves_the_anchor_in_use(store: Envfs, tmp_path: Path) -> None:
    copy = _copy_after_writing(store, tmp_path, "f")
    (store.mnt / "g").write_text("two")
    os.sync()
    store.kill_daemon()
    state, generation, _ = _anchor(store)
    assert state == 1  # in use: the daemon died with the store open
    # The next writer cannot check the store and says so, then anchors it again.
    store.mount()
    assert "last writer did not close it" in store.log_text()
    store.unmount()
    assert _anchor(store)[:2] == (0, generation + 1)
    # The copy from before the crash is older than that: refused.
    _put_back(store, copy)
    _mount_refused(store)


def test_stray_wal_beside_a_clean_store_is_removed(store: Envfs) -> None:
    store.mount()
    (store.mnt / "f").write_text("kept")
    store.unmount()
    (store.store / "meta.db-wal").write_bytes(os.urandom(8192))
    (store.store / "meta.db-shm").write_bytes(bytes(32768))
    store.mount()
    assert (store.mnt / "f").read_text() == "kept"
    store.unmount()
    assert "damaged:   0 (clean)" in store.run("fsck", str(store.store)).stdout


def test_store_without_anchor_gets_one(store: Envfs) -> None:
    """A store made before anchors (or whose token lost it) is anchored at its next mount."""
    anchor_objects(store, "destroy")
    assert anchor_objects(store) == []
    store.mount()
    (store.mnt / "f").write_text("x")
    store.unmount()
    assert _anchor(store)[:2] == (0, 1)
    assert _anchor(store)[2] == _digest(store)


@pytest.mark.parametrize("later", ["in use", "clean"])
def test_two_anchor_objects_the_later_counts(store: Envfs, later: str) -> None:
    """A writer that died between creating the new anchor object and destroying the old."""
    state, generation, digest = _anchor(store)
    assert state == 0
    wrong = hashlib.sha256(b"not meta.db").digest()
    if later == "in use":  # clean g, then in use g: the store is accepted unchecked
        newer = struct.pack(">BBQ32s", 1, 1, generation, wrong)
    else:  # clean g with the right digest, then clean g + 1 with a wrong one: refused
        newer = struct.pack(">BBQ32s", 1, 0, generation + 1, wrong)
    anchor_objects(store, "add", newer.hex())
    assert len(anchor_objects(store)) == 2
    if later == "in use":
        store.mount()
        store.unmount()
        assert _anchor(store)[:2] == (0, generation + 1)  # one object again
    else:
        _mount_refused(store)
        assert len(anchor_objects(store)) == 2


def test_anchor_value_vector() -> None:
    """FORMAT.md 12.1: the vector, the order of two values, and a malformed value."""
    digest = bytes.fromhex("00112233445566778899aabbccddeeff" * 2)
    vector = "0100000000000000000700112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
    assert vector in (Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text()
    clean = AnchorValue(CLEAN, 7, digest)
    assert clean.pack().hex() == vector
    assert AnchorValue.unpack(bytes.fromhex(vector), "x") == clean
    assert AnchorValue(IN_USE, 7, digest).pack().hex() == "0101" + vector[4:]
    assert clean.order() < AnchorValue(IN_USE, 7, digest).order() < AnchorValue(CLEAN, 8, digest).order()
    for bad in (bytes.fromhex(vector)[:-1], b"\x02" + bytes.fromhex(vector)[1:], b"\x01\x02" + bytes(40)):
        with pytest.raises(CorruptStore):
            AnchorValue.unpack(bad, "x")


def _wait_for_clean(env: Envfs, after: int = 0, timeout: float = 15.0) -> tuple[int, int, bytes]:
    """The anchor, once it is clean with a generation above `after`."""
    deadline = time.monotonic() + timeout
    while True:
        found = _anchor(env)
        if found[0] == 0 and found[1] > after:
            return found
        assert time.monotonic() < deadline, f"anchor still {found[:2]}, waiting for a clean one after {after}"
        time.sleep(0.2)


def test_quiet_mount_settles_its_anchor(store: Envfs, tmp_path: Path) -> None:
    """A mount whose metadata has not changed for ENVFS_ANCHOR_IDLE seconds has its
    anchor describe meta.db as it is, and marks it in use again at the next change; a
    crash while it is quiet (a power cut of an idle machine) leaves a store the next
    mount checks, so a copy put back then is refused."""
    quiet = dict(store.env, ENVFS_ANCHOR_IDLE="1")
    store.mount(env=quiet)
    (store.mnt / "a").write_text("a")
    _, generation, digest = _wait_for_clean(store, after=1)  # init made 1; the mount began in use
    assert digest == _digest(store)  # while mounted: meta.db merged and still
    assert (store.store / "meta.db-wal").stat().st_size == 0
    copy = tmp_path / "copy"
    shutil.copytree(store.store, copy, symlinks=True)  # a consistent copy of the quiet store
    (store.mnt / "b").write_text("b")
    time.sleep(0.3)  # the group commit of "b": the anchor is in use again (for at least a second)
    state, _, _ = _anchor(store)
    assert state == 1 or _anchor(store)[1] > generation
    _, later, digest = _wait_for_clean(store, after=generation)
    assert later == generation + 1 and digest == _digest(store)
    store.kill_daemon()
    store.mount(env=quiet)
    assert sorted(os.listdir(store.mnt)) == ["a", "b"]
    assert "last writer did not close it" not in store.log_text()
    store.unmount()
    assert _anchor(store)[0] == 0
    # The same crash with the copy from before "b" put back: refused.
    store.mount(env=quiet)
    generation = _anchor(store)[1]
    (store.mnt / "c").write_text("c")
    _wait_for_clean(store, after=generation)
    store.kill_daemon()
    _put_back(store, copy)
    _mount_refused(store)
