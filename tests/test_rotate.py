"""Key rotation (`envfs rotate`, `envfs retire`) on real stores and tokens.

A rotation must move every file, name, symlink target, xattr and row MAC to
the new key version without changing anything a user sees (contents, inode
numbers, modes, times, links), survive SIGKILL at any instant and be finished
by the next run, and a retired key version must leave older copies of the
store unreadable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ENVFS, Envfs, flip

from envfs import errors

Manifest = dict[str, tuple[object, ...]]


def build_tree(root: Path, files: int = 40) -> None:
    """Files of many sizes (empty, one byte, block edges, sparse), directories,
    symlinks, hard links, xattrs and a FIFO."""
    rng = random.Random(7)
    sizes = [0, 1, 4095, 4096, 4097, 65536, 200_003]
    for d in range(4):
        sub = root / f"dir{d}" / "deeper"
        sub.mkdir(parents=True)
        os.setxattr(sub.parent, "user.dir", f"directory {d}".encode())
        for i in range(files // 4):
            path = sub / f"file-{i}.bin"
            path.write_bytes(rng.randbytes(sizes[i % len(sizes)]))
            if i % 5 == 0:
                os.setxattr(path, "user.note", f"note {d}/{i}".encode() * 10)
                os.setxattr(path, "user.empty", b"")
    (root / "big").write_bytes(rng.randbytes(3 << 20))
    with open(root / "sparse", "wb") as f:
        f.truncate(1 << 28)
        f.seek(123_456_789)
        f.write(b"an island in a sea of holes")
    # A last block stored full (shrunk inside a block) and a hole punched in the middle.
    with open(root / "shrunk", "wb") as f:
        f.write(rng.randbytes(5 * 4096))
        f.truncate(3 * 4096 + 100)
    with open(root / "punched", "wb") as f:
        f.write(rng.randbytes(600 * 4096 + 11))
    subprocess.run(
        ["fallocate", "--punch-hole", "--offset", str(4096 * 300), "--length", str(4096 * 20), root / "punched"],
        check=True,
    )
    os.symlink("dir0/deeper/file-1.bin", root / "link")
    os.symlink("/" + "long-target/" * 300, root / "long-link")
    os.link(root / "big", root / "big-hardlink")
    os.mkfifo(root / "fifo")
    os.chmod(root / "dir1", 0o751)


def manifest(root: Path) -> Manifest:
    """What a user sees of every entry: type, inode, mode, links, size, times,
    content digest, link target and xattrs."""
    found: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {k: os.getxattr(path, k) for k in sorted(os.listxattr(path))}
            found[str(path.relative_to(root))] = (
                st.st_ino, st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns, content, xattrs,
            )  # fmt: skip
    return found


def data_files(env: Envfs) -> list[str]:
    return sorted(p.name for p in (env.store / "data").rglob("*") if p.is_file())


def allocated(env: Envfs) -> int:
    """Bytes the data files occupy on the backing filesystem."""
    return sum(p.stat().st_blocks * 512 for p in (env.store / "data").rglob("*") if p.is_file())


def key_versions_of_files(env: Envfs) -> set[int]:
    db = sqlite3.connect(f"file:{env.store / 'meta.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key_version FROM inodes WHERE (mode & 61440) = 32768").fetchall()
    finally:
        db.close()
    return {row[0] for row in rows}


@pytest.fixture
def tree(store: Envfs) -> Iterator[tuple[Envfs, Manifest]]:
    """A store holding `build_tree`, unmounted, and its manifest."""
    store.mount()
    build_tree(store.mnt)
    seen = manifest(store.mnt)
    store.unmount()
    yield store, seen


def mounted_manifest(env: Envfs) -> Manifest:
    env.mount()
    try:
        return manifest(env.mnt)
    finally:
        env.unmount()


def test_rotate_moves_everything_and_changes_nothing_visible(tree: tuple[Envfs, Manifest]) -> None:
    env, before = tree
    old_files = data_files(env)
    old_db = sqlite3.connect(env.store / "meta.db")
    old_names = {row[0] for row in old_db.execute("SELECT name FROM dentries")}
    old_db.close()
    space = allocated(env)
    result = env.run("rotate", str(env.store))
    assert "on key version 2 (from 1)" in result.stdout
    assert allocated(env) <= space, "holes were filled in"  # the sparse file alone is 256 MiB
    for path in [env.store / "envfs.json", *(env.store / "data").rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is open to others"
    status = env.status()
    assert status["current_key_version"] == 2 and "rotating_to" not in status
    assert [k["version"] for k in status["key_versions"]] == [1, 2]  # kept until retired
    # Every data file is the new version's, epoch 0; no old one is left.
    assert data_files(env) and all(name.endswith(".2.0") for name in data_files(env)), data_files(env)
    # Empty files need no data file (FORMAT.md 4.1); every other file has its new one.
    non_empty = {entry[0] for entry in before.values() if stat.S_ISREG(int(entry[1])) and entry[3]}  # type: ignore[call-overload]
    assert len(data_files(env)) == len(non_empty) <= len(old_files)
    assert key_versions_of_files(env) == {2}
    # Names were re-encrypted under the new name key: no ciphertext is the same.
    db = sqlite3.connect(env.store / "meta.db")
    try:
        new_names = {row[0] for row in db.execute("SELECT name FROM dentries")}
        assert db.execute("SELECT value FROM settings WHERE name='metadata_key_version'").fetchone() == (2,)
    finally:
        db.close()
    assert len(new_names) == len(old_names) and not new_names & old_names
    checked = env.run("fsck", str(env.store))
    assert "damaged:   0 (clean)" in checked.stdout and "leftovers: 0" in checked.stdout, checked.stdout
    assert mounted_manifest(env) == before
    # A second rotation goes on to version 3 the same way.
    env.run("rotate", str(env.store), "--quiet")
    assert env.status()["current_key_version"] == 3
    assert mounted_manifest(env) == before


def test_retire_shreds_old_copies(tree: tuple[Envfs, Manifest]) -> None:
    env, before = tree
    backup = env.root / "backup"
    shutil.copytree(env.store, backup)
    env.run("rotate", str(env.store))
    # Before retiring, the old copy still mounts: its key is in the token.
    old = Envfs.__new__(Envfs)
    old.__dict__.update(env.__dict__, store=backup, mnt=env.root / "mnt-backup", log=env.root / "backup.log")
    old.mnt.mkdir()
    try:
        # The copy shares the store's anchor: mounting it is a restore made on
        # purpose, and afterwards the store itself is the copy to take back.
        old.run("reanchor", str(backup))
        assert mounted_manifest(old) == before
        env.run("reanchor", str(env.store))
        result = env.run("retire", str(env.store))
        assert "retired key versions: 1" in result.stdout
        assert [k["version"] for k in env.status()["key_versions"]] == [2]
        assert mounted_manifest(env) == before
        # The backup's key is gone from the token: it can never be read again.
        refused = old.run("mount", str(backup), str(old.mnt), check=False)
        assert refused.returncode == errors.KeyNotFound.exit_code, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        # Nothing left to retire.
        assert "retired key versions: none" in env.run("retire", str(env.store)).stdout
    finally:
        old.cleanup()


def test_rotate_with_retire_in_one_run(tree: tuple[Envfs, Manifest]) -> None:
    env, before = tree
    result = env.run("rotate", "--retire", str(env.store))
    assert "destroyed key versions 1" in result.stdout
    assert [k["version"] for k in env.status()["key_versions"]] == [2]
    assert mounted_manifest(env) == before


def test_rotate_refusals_change_nothing(tree: tuple[Envfs, Manifest]) -> None:
    env, _ = tree
    superblock = (env.store / "envfs.json").read_bytes()
    wrong = env.run("rotate", str(env.store), check=False, env=dict(env.env, ENVFS_PIN="wrong-pin"))
    assert wrong.returncode == errors.PinError.exit_code
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    env.mount()
    try:
        busy = env.run("rotate", str(env.store), check=False)
        assert busy.returncode == errors.StoreBusy.exit_code
        assert "already mounted" in busy.stderr
    finally:
        env.unmount()
    assert (env.store / "envfs.json").read_bytes() == superblock
    nothing = env.run("rotate", str(env.root / "not-a-store"), check=False)
    assert nothing.returncode == errors.NotAStore.exit_code


def test_rotate_moves_rekeyed_files_to_epoch_zero(store: Envfs) -> None:
    store.mount(env=dict(store.env, ENVFS_REKEY_AFTER="64"))
    path = store.mnt / "busy"
    for _ in range(12):
        path.write_bytes(os.urandom(32 * 4096))
    content = path.read_bytes()
    ino = os.stat(path).st_ino
    store.unmount()
    (name,) = [n for n in data_files(store) if n.startswith(f"{ino:016x}.")]
    assert int(name.split(".")[2]) > 0, "the file was never re-keyed"
    store.run("rotate", str(store.store))
    assert f"{ino:016x}.2.0" in data_files(store)
    store.mount()
    assert path.read_bytes() == content


def _rotate_killed(env: Envfs, delay: float) -> bool:
    """Run `envfs rotate`, SIGKILL it after `delay` s; True if it finished first."""
    process = subprocess.Popen(
        [*ENVFS, "rotate", str(env.store)], env=env.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == -signal.SIGKILL:
        return False
    assert process.returncode == 0, stderr
    return True


@pytest.mark.timeout(600)
def test_rotation_killed_at_any_moment_resumes(store: Envfs) -> None:
    """SIGKILL at spread-out moments of a rotation of 600 files; after every kill
    the store either mounts and reads back exactly (a mount in the middle of
    the file step, which also writes), or, in the one window after the metadata
    switch, is refused with a one-line pointer to `envfs rotate`; the run that
    finishes leaves everything on the new version."""
    store.mount()
    build_tree(store.mnt, files=600)
    expected = manifest(store.mnt)
    store.unmount()
    full = store.root / "timing"
    subprocess.run(["cp", "-a", "--sparse=always", str(store.store), str(full)], check=True)
    timing = Envfs.__new__(Envfs)
    timing.__dict__.update(store.__dict__, store=full)
    started = time.monotonic()
    assert _rotate_killed(timing, 300)
    duration = time.monotonic() - started
    shutil.rmtree(full)
    # The copy's rotation made the token's key for version 2 (same store UUID);
    # the rotation below must treat it as one an interrupted run made. It also
    # moved the anchor the two share on to the copy's metadata.
    store.forget_anchor()
    rng = random.Random(1)
    kills = 0
    for _ in range(8):
        if _rotate_killed(store, rng.uniform(0.05, 0.6) * duration):
            break
        kills += 1
        status = store.status()
        if status["current_key_version"] == 2 and "rotating_to" not in status:
            break  # killed on its way out: the next run would start another rotation
        refused = store.run("mount", str(store.store), str(store.mnt), "--log", str(store.log), check=False)
        if refused.returncode == errors.RotationUnfinished.exit_code:
            assert len(refused.stderr.strip().splitlines()) == 1 and "envfs rotate" in refused.stderr
            continue
        assert refused.returncode == 0, refused.stderr
        try:
            assert manifest(store.mnt) == expected, f"after kill {kills}"
            # What is written in the middle of a rotation must come out of it.
            (store.mnt / f"written-after-kill-{kills}").write_bytes(os.urandom(5000 * kills))
            with open(store.mnt / "big", "r+b") as f:
                f.seek(kills * 4096 + 7)
                f.write(b"changed while rotating")
            expected = manifest(store.mnt)
        finally:
            store.unmount()
    else:
        assert _rotate_killed(store, 300)
    assert kills >= 3, f"only {kills} kills landed before a run finished ({duration:.2f} s per rotation)"
    assert store.status()["current_key_version"] == 2
    assert key_versions_of_files(store) == {2}
    assert all(name.endswith(".2.0") for name in data_files(store)), data_files(store)
    assert mounted_manifest(store) == expected
    checked = store.run("fsck", str(store.store))
    assert "damaged:   0 (clean)" in checked.stdout and "leftovers: 0" in checked.stdout, checked.stdout


def test_stopped_after_the_metadata_switch(tree: tuple[Envfs, Manifest], monkeypatch: pytest.MonkeyPatch) -> None:
    """The one state a mount refuses: rows under the new key, superblock not yet."""
    from envfs import rotate
    from envfs.offline import OfflineStore
    from envfs.rotate import RotationResult

    env, before = tree
    for name, value in env.env.items():
        monkeypatch.setenv(name, value)
    with OfflineStore(str(env.store), env.env["ENVFS_PIN"], "rotate") as offline:
        target = rotate._begin(offline, None, lambda line: None)
        rotate._reencrypt_files(offline, target, RotationResult("", 1, target), lambda line: None)
        rotate._switch_metadata(offline, target, lambda line: None)
    assert env.status()["rotating_to"] == 2
    refused = env.run("mount", str(env.store), str(env.mnt), check=False)
    assert refused.returncode == errors.RotationUnfinished.exit_code
    assert refused.stderr.strip().count("\n") == 0 and "envfs rotate" in refused.stderr
    assert json.loads(env.run("status", str(env.store), "--json").stdout)["mounted"] is False
    finished = env.run("rotate", str(env.store))
    assert "resuming the rotation from key version 1 to 2" in finished.stderr
    assert mounted_manifest(env) == before


def test_damaged_file_stops_the_rotation_until_it_is_dealt_with(tree: tuple[Envfs, Manifest]) -> None:
    """A block that fails authentication stops the rotation with the inode named;
    what was done stays done, the store still mounts, and once the file is
    deleted the next run finishes."""
    env, before = tree
    victim = before["big"][0]
    (path,) = (env.store / "data").rglob(f"{victim:016x}.1.0")
    flip(path, 3 * 4124 + 100)
    stopped = env.run("rotate", str(env.store), check=False)
    assert stopped.returncode == errors.CorruptStore.exit_code
    assert f"inode {victim} block 3" in stopped.stderr.strip().splitlines()[-1]
    status = env.status()
    assert status["current_key_version"] == 1 and status["rotating_to"] == 2
    assert any(name.endswith(".2.0") for name in data_files(env))  # the files before it moved
    refused = env.run("retire", str(env.store), check=False)
    assert refused.returncode == errors.RotationUnfinished.exit_code and "envfs rotate" in refused.stderr
    checked = env.run("fsck", str(env.store), check=False)
    assert checked.returncode == errors.DamageFound.exit_code
    assert f"block: inode {victim} (/big) block 3: fails authentication" in checked.stdout
    assert "note: a key rotation to key version 2 is in progress" in checked.stdout
    env.mount()  # the store works in the middle of the rotation
    try:
        with pytest.raises(OSError) as raised:
            (env.mnt / "big").read_bytes()
        assert raised.value.errno == errno.EIO
        os.unlink(env.mnt / "big")
        os.unlink(env.mnt / "big-hardlink")
        seen = manifest(env.mnt)
    finally:
        env.unmount()
    env.run("rotate", str(env.store))
    assert env.status()["current_key_version"] == 2
    assert mounted_manifest(env) == seen
    # Apart from the deleted file, nothing changed.
    assert {k: v for k, v in before.items() if k not in ("big", "big-hardlink")} == seen
