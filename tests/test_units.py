"""Unit tests of the crypto, data file and metadata layers (no mount)."""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from envfs import blocks, fs, kdf
from envfs.blocks import NONCE_SIZE, SLOT_SIZE, BlockCipher, block_aad, max_data_length, min_data_length
from envfs.datafile import DataFile
from envfs.errors import IntegrityError
from envfs.metadata import WALK_READ_AHEAD, Inode, Metadata
from envfs.names import NameCipher
from envfs.secret import BufferPool, Secret, zero_buffer, zero_bytes

STORE_UUID = uuid.UUID(int=0x1234)


def _secret(value: bytes) -> Secret:
    secret = Secret(len(value))
    secret.view[:] = value
    return secret


def _cipher(inode: int = 7, epoch: int = 0, key: bytes = bytes(range(32))) -> BlockCipher:
    with _secret(key) as dek:
        return BlockCipher(dek, STORE_UUID, inode, 1, epoch)


def test_secret_wipe_and_repr() -> None:
    secret = _secret(b"k" * 32)
    assert "k" not in repr(secret)
    view = secret.view
    assert bytes(view) == b"k" * 32
    del view
    secret.wipe()
    secret.wipe()
    with pytest.raises(ValueError):
        _ = secret.view


def test_zero_bytes_spares_singletons_and_hashed() -> None:
    data = bytes(range(1, 100))
    zero_bytes(data)
    assert data == bytes(99)
    single = bytes([65])
    zero_bytes(single)
    assert bytes([65]) == b"A"
    hashed = bytes(range(1, 50))
    hash(hashed)
    zero_bytes(hashed)
    assert hashed == bytes(range(1, 50))
    buf = bytearray(b"abc")
    zero_buffer(buf)
    assert buf == bytearray(3)
    for size in (4096, 1 << 16, (1 << 16) + 1, 1 << 20):  # both ways of zeroing, and their border
        big = bytearray(b"p" * (size + 20))
        zero_buffer(memoryview(big)[10 : 10 + size])
        assert big[:10] == b"p" * 10 and big[10 : 10 + size] == bytes(size) and big[10 + size :] == b"p" * 10


def test_buffer_pool_zeroes_and_reuses() -> None:
    pool = BufferPool(64, keep=1)
    first = pool.take(10)
    first[:] = b"p" * 10
    underlying = first.obj
    pool.give_back(first)
    assert underlying == bytearray(64)
    again = pool.take(20)
    assert again.obj is underlying and bytes(again) == bytes(20)
    other = pool.take(5)
    other[:] = b"r" * 5
    second = other.obj
    assert second is not underlying
    pool.give_back(again)
    pool.give_back(other)  # one more than `keep`: zeroed and dropped
    assert second == bytearray(64)
    large = pool.take(100)
    large[:] = b"q" * 100
    owner = large.obj
    pool.give_back(large)
    assert owner == bytearray(100)
    assert pool.take(64).obj is underlying


def test_info_layouts_are_distinct() -> None:
    infos = {
        kdf.file_dek_info(STORE_UUID, 1, 2, 0),
        kdf.file_dek_info(STORE_UUID, 1, 2, 1),
        kdf.file_dek_info(STORE_UUID, 2, 2, 0),
        kdf.name_key_info(STORE_UUID, 1, 1),
        kdf.name_key_info(STORE_UUID, 1, 2),
        kdf.metadata_mac_info(STORE_UUID, 1),
        kdf.key_check_info(STORE_UUID, 1),
    }
    assert len(infos) == 7
    assert kdf.file_dek_info(STORE_UUID, 1, 2, 0).startswith(kdf.LABEL_FILE_DEK + b"\x00" + STORE_UUID.bytes)


def test_block_binding() -> None:
    cipher = _cipher()
    slot = bytearray(SLOT_SIZE)
    n = cipher.encrypt_into(3, memoryview(b"p" * 4096), memoryview(slot))
    out = bytearray(4096)
    assert cipher.decrypt_into(3, memoryview(slot)[:n], memoryview(out)) == 4096
    for other in (_cipher(inode=8), _cipher(epoch=1)):
        with pytest.raises(IntegrityError):
            other.decrypt_into(3, memoryview(slot)[:n], memoryview(out))
    with pytest.raises(IntegrityError):
        cipher.decrypt_into(4, memoryview(slot)[:n], memoryview(out))
    slot[20] ^= 1
    with pytest.raises(IntegrityError):
        cipher.decrypt_into(3, memoryview(slot)[:n], memoryview(out))


def _reference_open(key: bytes, inode: int, index: int, slot: bytes) -> bytes:
    """A slot opened by `cryptography`'s AESGCM, the reference for envfs._gcm."""
    aad = block_aad(STORE_UUID, inode, 1, 0, index)
    return AESGCM(key).decrypt(slot[:NONCE_SIZE], slot[NONCE_SIZE:], aad)


# 31 blocks stay in the caller's thread; from 32 on the run is shared with the helper thread.
@pytest.mark.parametrize("length", [1, 4096, 31 * 4096 + 5, 32 * 4096, 256 * 4096, 255 * 4096 + 1000])
def test_block_runs_match_reference_aesgcm(length: int) -> None:
    key = os.urandom(32)
    cipher = _cipher(key=key)
    plaintext = os.urandom(length)
    count = -(-length // 4096)
    slots = bytearray(count * SLOT_SIZE)
    written = cipher.encrypt_blocks_into(9, memoryview(plaintext), memoryview(slots))
    assert written == length + count * (NONCE_SIZE + 16)
    for k in range(count):
        slot = bytes(slots[k * SLOT_SIZE : min((k + 1) * SLOT_SIZE, written)])
        assert _reference_open(key, 7, 9 + k, slot) == plaintext[k * 4096 : (k + 1) * 4096]
    # Holes in both halves read as zeros; everything else round-trips.
    holes = {0, count - 1} if count > 2 else set()
    for k in holes:
        end = min((k + 1) * SLOT_SIZE, written)
        slots[k * SLOT_SIZE : end] = bytes(end - k * SLOT_SIZE)
    out = bytearray(count * 4096)
    assert cipher.decrypt_blocks_into(9, memoryview(slots)[:written], memoryview(out)) == length
    for k in range(count):
        want = plaintext[k * 4096 : (k + 1) * 4096]
        assert out[k * 4096 : k * 4096 + len(want)] == (bytes(len(want)) if k in holes else want)


@pytest.mark.parametrize("bad", [0, 100, 199])
def test_block_run_names_the_tampered_block(bad: int) -> None:
    cipher = _cipher()
    plaintext = os.urandom(200 * 4096)
    slots = bytearray(200 * SLOT_SIZE)
    cipher.encrypt_blocks_into(0, memoryview(plaintext), memoryview(slots))
    slots[bad * SLOT_SIZE + 50] ^= 1
    out = bytearray(len(plaintext))
    with pytest.raises(IntegrityError, match=f"block {bad}: authentication failed"):
        cipher.decrypt_blocks_into(0, memoryview(slots), memoryview(out))
    assert out[bad * 4096 : (bad + 1) * 4096] == bytes(4096)  # no unauthenticated plaintext left


def test_block_cipher_after_close_and_fork() -> None:
    cipher = _cipher()
    plaintext = os.urandom(64 * 4096)
    slots = bytearray(64 * SLOT_SIZE)
    cipher.encrypt_blocks_into(0, memoryview(plaintext), memoryview(slots))  # starts the helper thread
    pid = os.fork()
    if pid == 0:  # the child has no helper thread: a long run must start its own, not wait forever
        out = bytearray(len(plaintext))
        ok = _cipher().decrypt_blocks_into(0, memoryview(slots), memoryview(out)) == len(plaintext)
        os._exit(0 if ok and out == plaintext else 1)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("a forked child hung on its first long run")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    cipher.close()
    with pytest.raises(ValueError, match="closed"):
        cipher.encrypt_blocks_into(0, memoryview(plaintext), memoryview(slots))


def test_fresh_nonces_are_never_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = [bytes(12) + b"\x01" * 12, b"\x02" * 24]  # the first draw holds an all-zero nonce
    monkeypatch.setattr(blocks.os, "urandom", lambda n: draws.pop(0))
    assert blocks.fresh_nonces(2) == b"\x02" * 24


@pytest.mark.parametrize("seed", range(8))
def test_datafile_against_model(tmp_path: Path, seed: int) -> None:
    """Random writes and truncates match a bytearray model, and the length rules hold."""
    rng = random.Random(seed)
    path = tmp_path / "data"
    data = DataFile(os.open(path, os.O_RDWR | os.O_CREAT), _cipher(), 0)
    model = bytearray()
    size = 0
    for _ in range(120):
        if rng.random() < 0.6:
            off = rng.choice(
                [0, size, rng.randrange(0, size + 9000), rng.randrange(0, 20000), 4096 * rng.randrange(0, 8)]
            )
            chunk = os.urandom(rng.choice([1, 2, 100, 4095, 4096, 4097, 3 * 4096, rng.randrange(1, 20000)]))
            size, _ = data.write(off, memoryview(chunk), size)
            model.extend(bytes(max(0, off - len(model))))
            model[off : off + len(chunk)] = chunk
        else:
            new = rng.choice([0, rng.randrange(0, size + 1), size + rng.randrange(0, 15000)])
            data.truncate(size, new)
            size = new
            del model[new:]
            model.extend(bytes(new - len(model)))
        assert size == len(model)
        assert min_data_length(size) <= data.length <= max_data_length(size)
        assert os.fstat(data.fd).st_size == data.length
        out = bytearray(size)
        assert data.read_into(0, memoryview(out), size) == size
        assert out == model
        for _ in range(3):  # ranges that start and end inside blocks, on boundaries, past the end
            off = rng.choice([rng.randrange(0, size + 1), 4096 * rng.randrange(0, 6)])
            part = bytearray(rng.choice([1, 4096, 2 * 4096, rng.randrange(1, 30000)]))
            got = data.read_into(off, memoryview(part), size)
            assert part[:got] == model[off : off + len(part)]
    data.close()
    reopened = DataFile(os.open(path, os.O_RDWR), _cipher(), size)
    copy = DataFile(os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT), _cipher(epoch=1), 0)
    reopened.copy_to(copy, size)
    out = bytearray(size)
    copy.read_into(0, memoryview(out), size)
    assert out == model
    reopened.close()
    copy.close()


def test_datafile_detects_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "data"
    data = DataFile(os.open(path, os.O_RDWR | os.O_CREAT), _cipher(), 0)
    size, _ = data.write(0, memoryview(os.urandom(3 * 4096)), 0)
    data.close()
    os.truncate(path, 2 * SLOT_SIZE)
    data = DataFile(os.open(path, os.O_RDWR), _cipher(), size)
    out = bytearray(4096)
    assert data.read_into(4096, memoryview(out), size) == 4096
    with pytest.raises(IntegrityError, match="cut short"):
        data.read_into(2 * 4096, memoryview(out), size)
    data.close()


@pytest.mark.parametrize("change", [-1, 1])
def test_datafile_last_block_of_the_wrong_length_fails(tmp_path: Path, change: int) -> None:
    """A read to the end of the file takes its last, partial block in one run with
    the others only when its slot is exactly as long as the size says."""
    path = tmp_path / "data"
    data = DataFile(os.open(path, os.O_RDWR | os.O_CREAT), _cipher(), 0)
    plaintext = os.urandom(2 * 4096 + 100)
    size, _ = data.write(0, memoryview(plaintext), 0)
    data.close()
    out = bytearray(size)
    data = DataFile(os.open(path, os.O_RDWR), _cipher(), size)
    assert data.read_into(0, memoryview(out), size) == size and out == plaintext
    data.close()
    os.truncate(path, os.path.getsize(path) + change)
    data = DataFile(os.open(path, os.O_RDWR), _cipher(), size)
    with pytest.raises(IntegrityError, match="block 2"):
        data.read_into(0, memoryview(out), size)
    assert data.read_into(0, memoryview(out)[: 2 * 4096], size) == 2 * 4096
    data.close()


def test_names_are_bound_to_their_place() -> None:
    with _secret(bytes(range(64))) as key:
        names = NameCipher(key)
    ct = names.encrypt_name(1, b"secret.txt")
    assert names.encrypt_name(1, b"secret.txt") == ct
    assert names.decrypt_name(1, ct) == b"secret.txt"
    with pytest.raises(IntegrityError):
        names.decrypt_name(2, ct)
    target = names.encrypt_target(5, b"/etc/passwd")
    with pytest.raises(IntegrityError):
        names.decrypt_target(6, target)
    xname = names.encrypt_xattr_name(5, b"user.a")
    value = names.encrypt_xattr_value(5, xname, b"")
    assert names.decrypt_xattr_value(5, xname, value) == b""
    with pytest.raises(IntegrityError):
        names.decrypt_xattr_value(5, names.encrypt_xattr_name(5, b"user.b"), value)


# The columns of a regular file's inode row, for metadata tests.
_FILE_FIELDS: dict[str, int] = dict(
    mode=0o100644, uid=0, gid=0, nlink=1, rdev=0, size=0, atime_ns=1, mtime_ns=2, ctime_ns=3,
    key_version=1, key_epoch=0, block_writes=0,
)  # fmt: skip


def _metadata_with_root(tmp_path: Path) -> Metadata:
    md = Metadata(tmp_path / "meta.db", hmac.HMAC(b"m" * 32, hashes.SHA256()), create=True)
    md.create_inode(**{**_FILE_FIELDS, "mode": 0o40755, "nlink": 2})
    return md


def test_entries_with_their_inodes(tmp_path: Path) -> None:
    """The joined queries return the same entries and inodes as the single ones,
    take known inodes as given, and check the MACs of the others."""
    md = _metadata_with_root(tmp_path)
    fields = _FILE_FIELDS
    root = md.get_inode(1)
    files = [md.create_inode(**fields) for _ in range(3)]
    with md.transaction():
        for i, f in enumerate(files):
            md.add_entry(root, b"n%d" % i, f.id)
        md.set_xattr(files[1], b"x", b"v")
        md.save_inode(files[1])  # with its xattr set digest, as the caller of set_xattr does
    listed = md.entries_with_inodes(1, 0, 10, {})
    assert [(e.name, i) for e, i in listed] == [(b"n%d" % k, f) for k, f in enumerate(files)]
    assert [e for e, _ in md.entries_with_inodes(1, listed[0][0].id, 10, {})] == [e for e, _ in listed[1:]]
    known = {files[0].id: files[0]}
    assert md.entries_with_inodes(1, 0, 1, known)[0][1] is files[0]
    found = md.lookup_with_inode(1, b"n2", {})
    assert found is not None and found[1] == files[2]
    assert md.lookup_with_inode(1, b"missing", {}) is None
    assert md.inodes_with_xattrs(limit=1) == {files[1].id}
    with md.transaction():
        md.set_xattr(files[2], b"x", b"v")
        md.save_inode(files[2])
    assert md.inodes_with_xattrs(limit=1) is None  # too many to keep: the caller asks per inode
    md.db.execute("UPDATE inodes SET size=5 WHERE id=?", (files[2].id,))
    with pytest.raises(IntegrityError):
        md.lookup_with_inode(1, b"n2", {})
    md.close()


def test_a_taken_name_is_not_added_again(tmp_path: Path) -> None:
    """add_entry leaves a taken name as it was and says so, and adds a free one."""
    md = _metadata_with_root(tmp_path)
    root = md.get_inode(1)
    a, b = md.create_inode(**_FILE_FIELDS), md.create_inode(**_FILE_FIELDS)
    with md.transaction():
        assert md.add_entry(root, b"n", a.id)
        digest = root.entries
        assert digest != 0
        assert not md.add_entry(root, b"n", b.id)
        assert root.entries == digest  # a name not added is not in the digest
    assert md.lookup(1, b"n").inode == a.id
    with md.transaction():
        md.remove_entry(root, b"n", a.id)
        assert root.entries == 0  # the empty set
        assert md.add_entry(root, b"n", b.id)
    assert md.lookup(1, b"n").inode == b.id
    md.close()


def test_next_file_walks_the_tree_in_listing_order(tmp_path: Path) -> None:
    """From any file, and from the position its own guess returned, the next file of a
    depth-first walk in listing order: into directories, out of finished ones, past
    empty ones and symlinks, and on past the entries read ahead in one query."""
    md = _metadata_with_root(tmp_path)
    fields = _FILE_FIELDS
    walk_order: list[int] = []

    def make(parent: Inode, layout: list[object]) -> None:
        for i, item in enumerate(layout):
            if item == "f":
                inode = md.create_inode(**fields)
                walk_order.append(inode.id)
            elif item == "l":
                inode = md.create_inode(**{**fields, "mode": 0o120777})
            else:
                inode = md.create_inode(**{**fields, "mode": 0o40755, "nlink": 2})
            md.add_entry(parent, b"e%d" % i, inode.id)
            if isinstance(item, list):
                make(inode, item)

    with md.transaction():
        make(md.get_inode(1), [
            "f", [["f", "l", []], "f"], "l", [], ["f"], [[[["f"]]]],
            # Directories of more entries than one query reads ahead, and of exactly as many.
            ["f"] * (2 * WALK_READ_AHEAD + 5) + [["f"]], ["f"] * WALK_READ_AHEAD, "f",
        ])  # fmt: skip
    expected = list(zip(walk_order[:-1], walk_order[1:], strict=True))
    assert [(f, found[0].id) for f, _ in expected if (found := md.next_file(f))] == expected
    # Following the positions it returns, as the daemon does for the files it guessed right.
    chain, position, current = [], (), walk_order[0]
    while (found := md.next_file(current, position)) is not None:
        current, position = found[0].id, found[1]
        chain.append(current)
    assert chain == walk_order[1:]
    assert md.next_file(walk_order[-1]) is None
    md.close()


def test_metadata_rows_are_macd(tmp_path: Path) -> None:
    mac = hmac.HMAC(b"m" * 32, hashes.SHA256())
    md = Metadata(tmp_path / "meta.db", mac, create=True)
    fields = {**_FILE_FIELDS, "size": 10}
    root = md.create_inode(**{**fields, "mode": 0o40755, "nlink": 2})
    child = md.create_inode(**fields)
    assert (root.id, child.id) == (1, 2)
    with md.transaction():
        md.add_entry(root, b"name-ct", 2)
    assert md.lookup(1, b"name-ct").inode == 2
    md.delete_inode(2)
    assert md.create_inode(**fields).id == 3  # ids are never reused
    skipped = md.allocate_inode_id()  # handed out (a prefetched key), never inserted
    assert md.create_inode(**fields).id == skipped + 1
    assert md.create_inode(skipped, **fields).id == skipped  # out of order is fine
    md.delete_inode(skipped + 1)
    md.close()
    md = Metadata(tmp_path / "meta.db", mac.copy())
    assert md.allocate_inode_id() == skipped + 2  # the highest id ever inserted counts, not max(id)
    db = sqlite3.connect(tmp_path / "meta.db")
    db.execute("UPDATE inodes SET size=11 WHERE id=3")
    db.execute("UPDATE dentries SET inode=3 WHERE parent=1")
    db.commit()
    db.close()
    with pytest.raises(IntegrityError):
        md.get_inode(3)
    with pytest.raises(IntegrityError):
        md.lookup(1, b"name-ct")
    md.close()


def test_frozen_metadata_stays_still_until_its_next_change(tmp_path: Path) -> None:
    """`Metadata.freeze` (the anchor's settled state): meta.db merged and kept as it is;
    the next change calls the hook first, and a write that bypasses the class fails."""
    md = Metadata(tmp_path / "meta.db", hmac.HMAC(b"m" * 32, hashes.SHA256()), create=True)
    md.group_commits()
    root = md.create_inode(**{**_FILE_FIELDS, "mode": 0o40755, "nlink": 2})
    assert not md.freeze(lambda: None)  # a group waits for its commit
    md.commit()
    calls: list[bytes] = []
    assert md.freeze(lambda: calls.append((tmp_path / "meta.db").read_bytes()))
    assert (tmp_path / "meta.db-wal").stat().st_size == 0
    still = (tmp_path / "meta.db").read_bytes()
    with pytest.raises(sqlite3.OperationalError):
        md.db.execute("UPDATE inodes SET size=1")
    root.mtime_ns += 1
    md.save_inode(root)
    assert calls == [still]  # called once, before the change touched anything
    md.commit()
    assert md.quiet_for() < 1
    md.sync()
    assert (tmp_path / "meta.db").read_bytes() != still
    md.close()


def test_a_one_statement_transaction_needs_no_savepoint_and_allows_no_second(tmp_path: Path) -> None:
    """Under group commits a one-statement transaction runs its statement without a savepoint
    (SQLite applies a statement whole or not at all); a second statement is a programming error,
    and so is any failure after the first: with no savepoint to take that one back alone, the
    group goes back to its last commit."""
    md = Metadata(tmp_path / "meta.db", hmac.HMAC(b"m" * 32, hashes.SHA256()), create=True)
    md.group_commits()
    root = md.create_inode(**{**_FILE_FIELDS, "mode": 0o40755, "nlink": 2})
    md.commit()
    statements: list[str] = []
    md.db.set_trace_callback(statements.append)
    with md.transaction(one_statement=True):
        assert md.add_entry(root, b"a", root.id)
    assert statements and not any("SAVEPOINT" in sql or "RELEASE" in sql for sql in statements), statements
    md.db.set_trace_callback(None)
    md.commit()
    with md.transaction(one_statement=True):
        assert md.add_entry(root, b"b", root.id)
    with pytest.raises(AssertionError), md.transaction(one_statement=True):
        md.add_entry(root, b"c", root.id)
        md.add_entry(root, b"d", root.id)  # refused before it runs
    assert md.group_rolled_back()
    with pytest.raises(sqlite3.OperationalError):
        md.commit()  # the group's loss is its commit's error
    assert md.lookup(root.id, b"a") is not None
    assert md.lookup(root.id, b"b") is None and md.lookup(root.id, b"c") is None
    with md.transaction():  # an ordinary transaction after them: savepoints as before
        assert md.add_entry(root, b"e", root.id)
    md.commit()
    assert md.lookup(root.id, b"e") is not None
    md.close()


def _inode_rows(md: Metadata) -> set[int]:
    return {row[0] for row in md.db.execute("SELECT id FROM inodes")}


def test_new_inode_rows_are_written_with_the_group(tmp_path: Path) -> None:
    """Under group commits a new inode's row waits for the commit, with the
    values of its last save, or for the first query that reads the inodes;
    a transaction that fails takes back its new inodes, its saves and
    deletes of them, and the rows a query wrote for them inside it."""
    md = Metadata(tmp_path / "meta.db", hmac.HMAC(b"m" * 32, hashes.SHA256()), create=True)
    md.group_commits()
    root = md.create_inode(**{**_FILE_FIELDS, "mode": 0o40755, "nlink": 2})
    assert _inode_rows(md) == set()
    kept, gone = md.create_inode(**_FILE_FIELDS), md.create_inode(**_FILE_FIELDS)
    kept.size = 10
    md.save_inode(kept)
    md.delete_inode(gone.id)
    with pytest.raises(RuntimeError), md.transaction():
        md.create_inode(**_FILE_FIELDS)
        kept.size = 99
        md.save_inode(kept)
        raise RuntimeError
    kept.size = 10
    with pytest.raises(RuntimeError), md.transaction():
        assert md.get_inode(root.id) == root  # a query: the rows are written, inside the savepoint
        assert _inode_rows(md) == {root.id, kept.id}
        raise RuntimeError
    assert _inode_rows(md) == set()  # rolled back with it, and waiting again
    with pytest.raises(AssertionError), md.transaction(one_statement=True):
        md.get_inode(root.id)  # the rows' insert would be a second, unguarded statement
    md.commit()
    assert _inode_rows(md) == {root.id, kept.id}
    md.close()
    md = Metadata(tmp_path / "meta.db", hmac.HMAC(b"m" * 32, hashes.SHA256()))
    stored = md.get_inode(kept.id)  # its MAC checked
    assert stored is not None and stored.size == 10
    md.close()


def test_throttled_warning_counts_what_it_held_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(fs.time, "monotonic", lambda: clock[0])
    warning = fs.ThrottledWarning(10.0)
    with caplog.at_level(logging.WARNING, logger="envfs.fs"):
        for _ in range(500):
            warning.warn("write: %s", "no space left")
            clock[0] += 0.01
        clock[0] += 10.0
        warning.warn("write: %s", "no space left")
    assert [r.getMessage() for r in caplog.records] == [
        "write: no space left",
        "write: no space left (and 499 more such failures since the last warning)",
    ]
