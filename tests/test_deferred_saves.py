"""Deferred inode saves (envfs/fs.py): a change acknowledged to one request must
survive another request's failure, and a failed request's own changes must not.

These drive `Operations` in this process, on a real store, token and SQLite
database, without a FUSE mount: a failure in the middle of a request is made
here by a backing filesystem that reports itself full, which a mount reaches
only in the low-space mode where nothing is deferred.
"""

from __future__ import annotations

import errno
import sqlite3
import stat
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from helpers import ROOT_CTX, Envfs, new_file, operations_in_process, setattr_fields

from envfs.fs import Operations
from envfs.metadata import ROOT_INODE


def attrs(**values: int) -> Any:
    return SimpleNamespace(**values)


@pytest.fixture
def ops(store: Envfs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Operations]:
    """Operations on the store, as a mount has them (group commits, prefetched keys)."""
    with operations_in_process(store, monkeypatch) as operations:
        yield operations


def call(method: Any, *args: Any) -> Any:
    return trio.run(method, *args)


def stored_mode(ops: Operations, inode_id: int) -> int:
    inode = ops.md.get_inode(inode_id)
    assert inode is not None
    return inode.mode


def test_a_deferred_change_survives_a_failed_request(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    a, a_fh = new_file(ops, b"a")
    b, b_fh = new_file(ops, b"b")
    call(ops.release, a_fh)
    ops.commit()
    call(ops.setattr, a, attrs(st_mode=0o100600, st_ctime_ns=0), setattr_fields(update_mode=True), None, ROOT_CTX)
    assert stored_mode(ops, a) & 0o777 == 0o644, "the chmod was written at once, not deferred"
    # The disk is full now: b's write fails after it changed b in memory.
    monkeypatch.setattr(ops.store, "free_bytes", lambda: 0)
    ops._room = 0
    with pytest.raises(pyfuse3_error()) as failed:
        call(ops.write, b_fh, 0, b"x" * 10_000)
    assert failed.value.errno == 28
    ops.commit()  # ENOSPC already committed; on a full disk every request commits
    assert stored_mode(ops, a) & 0o777 == 0o600, "a's acknowledged chmod was lost with b's failure"
    b_row = ops.md.get_inode(b)
    assert b_row is not None and b_row.size == 0
    call(ops.release, b_fh)


def test_a_failed_request_leaves_no_change_behind(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    a, a_fh = new_file(ops, b"a")
    call(ops.write, a_fh, 0, b"first")
    ops.commit()
    call(ops.setattr, a, attrs(st_mode=0o100640, st_ctime_ns=0), setattr_fields(update_mode=True), None, ROOT_CTX)
    call(ops.write, a_fh, 5, b" second")  # deferred, with the chmod
    monkeypatch.setattr(ops.store, "free_bytes", lambda: 0)
    ops._room = 0
    with pytest.raises(pyfuse3_error()):
        call(ops.write, a_fh, 12, b"x" * 100_000)
    ops.commit()
    row = ops.md.get_inode(a)
    assert row is not None and row.size == 12 and row.mode & 0o777 == 0o640
    attributes = call(ops.getattr, a, ROOT_CTX)
    assert attributes.st_size == 12 and attributes.st_mode & 0o777 == 0o640
    call(ops.release, a_fh)


def pyfuse3_error() -> type[BaseException]:
    import pyfuse3

    return pyfuse3.FUSEError


def _fail_in_touch_dir(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make the next change of a directory's entries fail after it changed the
    directory in memory; returns the real `_touch_dir`, to put back."""
    touch = Operations._touch_dir

    def touch_then_fail(self: Operations, directory: Any, now: int, **change: Any) -> None:
        touch(self, directory, now, **change)
        raise OSError(errno.EIO, "the disk failed")

    monkeypatch.setattr(Operations, "_touch_dir", touch_then_fail)
    return touch


def assert_entries_match_digest(ops: Operations, directory: int) -> list[bytes]:
    """The directory's rows against its entry set digest; returns their names (ciphertext)."""
    inode = ops.md.get_inode(directory)
    assert inode is not None
    entries = [entry for entry, _ in ops.md.entries_with_inodes(directory, 0, 1000, {})]
    digest = 0
    for entry in entries:
        digest ^= ops.md.entry_element(entry)
    ops.md.check_entries(inode, digest)
    return [entry.name for entry in entries]


def test_a_rolled_back_transaction_takes_only_its_own_changes(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    """symlink fails inside its transaction (a savepoint: two rows) after it
    changed the directory: the entry, the new inode and the directory's change
    go; a chmod acknowledged before stays."""
    a, a_fh = new_file(ops, b"a")
    call(ops.release, a_fh)
    ops.commit()
    root_before = ops.md.get_inode(ROOT_INODE)
    call(ops.setattr, a, attrs(st_mode=0o100600, st_ctime_ns=0), setattr_fields(update_mode=True), None, ROOT_CTX)
    touch = _fail_in_touch_dir(monkeypatch)
    with pytest.raises(pyfuse3_error()) as failed:
        call(ops.symlink, ROOT_INODE, b"l", b"target", ROOT_CTX)
    assert failed.value.errno == errno.EIO
    monkeypatch.setattr(Operations, "_touch_dir", touch)
    assert call(ops.lookup, ROOT_INODE, b"l", ROOT_CTX).st_ino == 0
    ops.commit()
    assert ops.md.get_inode(ROOT_INODE) == root_before
    assert len(assert_entries_match_digest(ops, ROOT_INODE)) == 1
    assert stored_mode(ops, a) & 0o777 == 0o600
    # The next symlink works.
    call(ops.symlink, ROOT_INODE, b"l", b"target", ROOT_CTX)
    ops.commit()
    assert len(assert_entries_match_digest(ops, ROOT_INODE)) == 2


def test_a_failure_after_a_one_statement_change_rolls_the_group_back(
    ops: Operations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkdir is one statement, the entry's row (its inode's row waits for the
    commit): a failure after it cannot take that row back alone, so the group
    goes back to its last commit, and with it what the mount kept in memory,
    rather than leave an entry whose inode and link count are gone."""
    a, a_fh = new_file(ops, b"a")
    call(ops.release, a_fh)
    ops.commit()
    call(ops.setattr, a, attrs(st_mode=0o100600, st_ctime_ns=0), setattr_fields(update_mode=True), None, ROOT_CTX)
    touch = _fail_in_touch_dir(monkeypatch)
    with pytest.raises(pyfuse3_error()) as failed:
        call(ops.mkdir, ROOT_INODE, b"d", stat.S_IFDIR | 0o755, ROOT_CTX)
    assert failed.value.errno == errno.EIO
    monkeypatch.setattr(Operations, "_touch_dir", touch)
    assert call(ops.getattr, ROOT_INODE, ROOT_CTX).st_nlink == 2
    assert call(ops.lookup, ROOT_INODE, b"d", ROOT_CTX).st_ino == 0
    assert call(ops.getattr, a, ROOT_CTX).st_mode & 0o777 == 0o644  # lost with the group, in memory too
    with pytest.raises(sqlite3.OperationalError):
        ops.commit()  # the loss is the next commit's error (an fsync's EIO)
    assert len(assert_entries_match_digest(ops, ROOT_INODE)) == 1
    assert stored_mode(ops, a) & 0o777 == 0o644
    # The next mkdir works and counts once.
    call(ops.mkdir, ROOT_INODE, b"d", stat.S_IFDIR | 0o755, ROOT_CTX)
    ops.commit()
    root = ops.md.get_inode(ROOT_INODE)
    assert root is not None and root.nlink == 3
    assert len(assert_entries_match_digest(ops, ROOT_INODE)) == 2
