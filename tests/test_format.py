"""docs/FORMAT.md, checked: every test vector, and a second implementation.

The vectors below are copied from docs/FORMAT.md ("Test vectors"); each one
is checked against envfs's own code and, where it is a derivation, against
two independent HKDF computations. `IndependentReader` decrypts a real store
using nothing but FORMAT.md, hashlib, hmac, cryptography, sqlite3 and json:
if it recovers what was written through a mount, the document is complete.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import stat
import struct
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from helpers import PIN, Envfs

from envfs import blocks, kdf, store
from envfs.embedded import TOKEN_LABEL, EmbeddedToken, TokenServer
from envfs.hsm import Hsm
from envfs.keys import KeyRing
from envfs.metadata import Dentry, Inode, Metadata
from envfs.names import NameCipher
from envfs.secret import Secret

# -- the vectors of docs/FORMAT.md ---------------------------------------------

MASTER_KEY = bytes(range(32))  # 00 01 02 ... 1f
STORE_UUID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
KEY_VERSION = 1
KEY_LABEL = "envfs-00112233-4455-6677-8899-aabbccddeeff-v1"

INFO = {
    "dek 2/0": "656e7666732066696c652064617461206b65792076310000112233445566778899aabbccddeeff"
    "00000001000000000000000200000000",
    "dek 2/1": "656e7666732066696c652064617461206b65792076310000112233445566778899aabbccddeeff"
    "00000001000000000000000200000001",
    "dek 2^63+5/0": "656e7666732066696c652064617461206b65792076310000112233445566778899aabbccddeeff"
    "00000001800000000000000500000000",
    "name half 1": "656e766673206e616d65206b65792076310000112233445566778899aabbccddeeff0000000101",
    "name half 2": "656e766673206e616d65206b65792076310000112233445566778899aabbccddeeff0000000102",
    "metadata mac": "656e766673206d65746164617461206d6163206b65792076310000112233445566778899aabbccddeeff00000001",
    "key check": "656e766673206b657920636865636b2076310000112233445566778899aabbccddeeff00000001",
}
OKM = {
    "dek 2/0": "7bc87c4510c4736bad35c93af7d42a1a9e921027e5d9c663f958456c5dbf2695",
    "dek 2/1": "dca27f069fd54c83af17d9c1cecc11838918badc54d78c17b8be2f7eba3d5a27",
    "dek 2^63+5/0": "e191a3762dd05f7a514dad76b42c75e8df9fa7ac9f8112cbaeeb2a6b8529d5c3",
    "name half 1": "469e3013abafd21d3d2b150675f62db1a1065ce3f564348e89ad440062374d16",
    "name half 2": "a51b1733c894eeeec9094b89f4c53468459b4a35109459fa8275bed3f9bca805",
    "metadata mac": "ac34b4aa5b0e0250745737572df7972c7762cc2cb2ebf91ae39216198bd82ed6",
    "key check": "4eb3f231d1eec00b39456c1dfc615fe12508e702b7d7fb70d1e885f17ba1f4f1",
}
DEK_INPUTS = {"dek 2/0": (2, 0), "dek 2/1": (2, 1), "dek 2^63+5/0": (2**63 + 5, 0)}
KEY_CHECK_VALUE = "4eb3f231d1eec00b39456c1dfc615fe1"
NAME_KEY = OKM["name half 1"] + OKM["name half 2"]

# Block vector: DEK "dek 2/0", block index 5.
BLOCK_PLAINTEXT = bytes(i % 251 for i in range(4096))
BLOCK_PLAINTEXT_SHA256 = "d67c656e01756650d77717b0839985a056ec28ffe174601d690fc407a2ceffca"
BLOCK_NONCE = bytes(range(0xA0, 0xAC))
BLOCK_INDEX = 5
BLOCK_AAD = "0100112233445566778899aabbccddeeff000000000000000200000001000000000000000000000005"
BLOCK_CT_SHA256 = "62dcad9f049033e52fe42cead316d436e41283f758989c7f0dd0c0cbb78182f1"  # ciphertext || tag
BLOCK_CT_FIRST32 = "c0aa0dd30251b2a5ac64193cdc0b817bac089394aa3959d0cb80265ba775d27e"
BLOCK_CT_LAST32 = "7afc92820dad59c399e17ed1bf0e5873efec17dd9b1df5781d9347671b2403dc"  # before the tag
BLOCK_TAG = "87a1a84b1c1338344e4457f0c9e7910a"
BLOCK_SLOT_SHA256 = "42525226da879f82da9c04b03bddd46987b46cbec4262e134a2a87c6494e9fb5"  # nonce || ct || tag

# Short (last) block vector: DEK "dek 2/0", block index 6, stored exactly.
SHORT_PLAINTEXT = b"envfs test vector\n"
SHORT_INDEX = 6
SHORT_SLOT = "b0b1b2b3b4b5b6b7b8b9babba2ff87fc8e58b6e8127b47cc2a68ca7e6443675fb3af1f366688cfa3b9bd7cfd1f17"

# AES-SIV vectors under NAME_KEY.
NAME_CT = "f2bb230c0b480d213915b53470ddaf4886e8dcf4207caa1983"  # b"hello.txt" in directory 1
SYMLINK_CT = "9e045192f8ff0a6e6d6a01d700cf00de7a7d71b0204ef042e7da99436006"  # b"../target/file", inode 3
XATTR_NAME_CT = "d49b632c0377993104c7e4d0d383fbf89749ceef7846fcc6f7812d29"  # b"user.comment", inode 2
XATTR_VALUE_CT = "145443528ec2a1ed08fafa9b364c1b1f55f9d9709e936455"  # b"hi there"

# Metadata MAC vectors under the metadata MAC key.
INODE_ROW = dict(
    id=2, mode=0o100644, uid=1000, gid=1000, nlink=1, rdev=0, size=12345,
    atime_ns=1700000000123456789, mtime_ns=1700000001000000000, ctime_ns=1700000002000000000,
    key_version=1, key_epoch=0, block_writes=4,
)  # fmt: skip
INODE_PACKED = (
    "0000000000000002000081a4000003e8000003e8000000000000000100000000000000000000000000003039"
    "17979cfe3d85cd1517979cfe71c4ca0017979cfead5f940000000001000000000000000000000004"
)
INODE_MAC = "147b7baac1b917b8e8deeb5cd92ee0822701db954174abe4422843644665636f"
DENTRY_MAC = "d08d20bed3a7b711ec31d12970f11fce79a59e3d6e54370927b358a067aab96c"  # parent 1, inode 2, NAME_CT
# The root directory holding that one entry: the entry's element, the pad of
# the documented nonce, the sealed digest and the directory's inode MAC.
ENTRY_ELEMENT = "b5873518fa171f3c3050765e985bdf2d0a108eb29d34bf8a8f17e07c33883f1a"
SEAL_NONCE = bytes(range(16))
SEAL_PAD = "48ee60df8320662e1baa656631559d20ac500455344de85576e9c0d46906eaab"
SEALED_DIGEST = "000102030405060708090a0b0c0d0e0ffd6955c7793779122bfa1338a90e420da6408ae7a97957dff9fe20a85a8ed5b1"
DIR_ROW = dict(
    id=1, mode=0o40755, uid=1000, gid=1000, nlink=2, rdev=0, size=0,
    atime_ns=1700000000123456789, mtime_ns=1700000001000000000, ctime_ns=1700000002000000000,
    key_version=1, key_epoch=0, block_writes=0,
)  # fmt: skip
DIR_MAC = "7ecdbd26e5155b273bde3f7af1b7c0fb01762194be294cee7432ec0fba141291"
# The file of INODE_ROW with the one xattr above (user.comment = "hi there"): its
# element, the pad of the same nonce, the sealed xattr digest and the row's MAC.
XATTR_ELEMENT = "fbc7bd229d80bd332588be1c37251f06f4a33c1566bb83d9e1b43df66e297fbe"
XATTR_PAD = "2a2f4b7d89e31b7f667fdb19d8286966043c7823edd0daf8795472420eee1e73"
XATTR_SEALED = "000102030405060708090a0b0c0d0e0fd1e8f65f1463a64c43f76505ef0d7660f09f44368b6b592198e04fb460c761cd"
INODE_MAC_WITH_XATTR = "2a49c67dd39066738182d84f0f894d9389350be8b9077722a975b67dcb85f222"
SUPERBLOCK_CANONICAL = (
    '{"block_size":4096,"current_key_version":1,"format":"envfs","format_version":1,'
    '"hsm":{"token":"envfs","type":"embedded"},'
    '"keys":[{"check":"4eb3f231d1eec00b39456c1dfc615fe1",'
    '"label":"envfs-00112233-4455-6677-8899-aabbccddeeff-v1","version":1}],'
    '"rekey_after_block_writes":2147483648,"uuid":"00112233-4455-6677-8899-aabbccddeeff"}'
)
SUPERBLOCK_MAC = "3fc7377ba6e27a05d532c79537539f0e8986d59fa508b5656263d6eefe8af5f4"

DATA_FILE_PATHS = {
    (2, 1, 0): "data/02/0000000000000002.1.0",
    (0x1234, 1, 7): "data/34/0000000000001234.1.7",
    (2**63 + 5, 2, 0): "data/05/8000000000000005.2.0",
}


# -- three HKDF-Expand implementations ---------------------------------------------


def hkdf_from_scratch(prk: bytes, info: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) built from hashlib alone, over info || 0x01."""
    key = prk.ljust(64, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + info + b"\x01").digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in key) + inner).digest()


def hkdf_hmac_module(prk: bytes, info: bytes) -> bytes:
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def hkdf_cryptography(prk: bytes, info: bytes) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(prk)


def secret_of(value: bytes) -> Secret:
    s = Secret(len(value))
    s.view[:] = value
    return s


def document_superblock(label: str = KEY_LABEL) -> store.Superblock:
    return store.Superblock(
        uuid=STORE_UUID,
        hsm=store.HsmLocator(type="embedded", token="envfs"),
        keys=[store.KeyVersion(KEY_VERSION, label, KEY_CHECK_VALUE)],
        current_key_version=KEY_VERSION,
    )


# -- layouts -------------------------------------------------------------------------


def test_info_layouts() -> None:
    built = {
        **{
            name: kdf.file_dek_info(STORE_UUID, KEY_VERSION, inode, epoch)
            for name, (inode, epoch) in DEK_INPUTS.items()
        },
        "name half 1": kdf.name_key_info(STORE_UUID, KEY_VERSION, 1),
        "name half 2": kdf.name_key_info(STORE_UUID, KEY_VERSION, 2),
        "metadata mac": kdf.metadata_mac_info(STORE_UUID, KEY_VERSION),
        "key check": kdf.key_check_info(STORE_UUID, KEY_VERSION),
    }
    assert {k: v.hex() for k, v in built.items()} == INFO
    # Lengths given in FORMAT.md: prefix = len(label) + 1 + 16 + 4.
    assert [len(bytes.fromhex(INFO[k])) for k in INFO] == [55, 55, 55, 39, 39, 46, 39]


def test_block_constants_and_aad() -> None:
    assert (blocks.BLOCK_SIZE, blocks.NONCE_SIZE, blocks.TAG_SIZE, blocks.SLOT_SIZE) == (4096, 12, 16, 4124)
    aad = blocks.block_aad(STORE_UUID, 2, KEY_VERSION, 0, BLOCK_INDEX)
    assert len(aad) == 41
    assert aad.hex() == BLOCK_AAD
    # Length rules of FORMAT.md section 4.4.
    for size, shortest, longest in [
        (0, 0, 0), (1, 29, 4124), (4096, 4124, 4124), (4097, 4153, 8248), (12345, 12457, 16496),
    ]:  # fmt: skip
        assert (blocks.min_data_length(size), blocks.max_data_length(size)) == (shortest, longest)


def test_data_file_names(tmp_path: Path) -> None:
    s = store.Store(tmp_path)
    for (inode, version, epoch), relative in DATA_FILE_PATHS.items():
        assert s.data_file(inode, version, epoch) == tmp_path / relative


def test_nonce_bound() -> None:
    assert store.DEFAULT_REKEY_AFTER == 2**31
    n = store.DEFAULT_REKEY_AFTER
    # Birthday bound n(n-1)/2 / 2^96 < n^2 / 2^97.
    assert n * (n - 1) / 2 / 2**96 < n**2 / 2**97 == 2.0**-35


# -- derivations ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(INFO))
def test_derivation_vectors_in_software(name: str) -> None:
    info = bytes.fromhex(INFO[name])
    results = {hkdf_from_scratch(MASTER_KEY, info), hkdf_hmac_module(MASTER_KEY, info)}
    results.add(hkdf_cryptography(MASTER_KEY, info))
    assert {r.hex() for r in results} == {OKM[name]}


def test_key_check_value_and_name_key() -> None:
    assert OKM["key check"][:32] == KEY_CHECK_VALUE
    assert len(bytes.fromhex(NAME_KEY)) == 64


@pytest.mark.timeout(120)
def test_derivation_vectors_through_the_hsm(envfs: Envfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The master key imported into a SoftHSM2 token gives the documented keys."""
    key_file = tmp_path / "master.hex"
    key_file.write_text(MASTER_KEY.hex() + "\n")
    envfs.init("--import-master-key-file", str(key_file))
    on_disk = json.loads((envfs.store / "envfs.json").read_text())
    real_uuid = uuid.UUID(on_disk["uuid"])
    label = on_disk["keys"][0]["label"]
    assert label == f"envfs-{real_uuid}-v1"

    server = TokenServer(EmbeddedToken(envfs.data_home / "envfs"))
    monkeypatch.setenv("P11_KIT_SERVER_ADDRESS", server.start())
    try:
        hsm = Hsm(server.client_module, TOKEN_LABEL, PIN)
        try:
            # Raw derivations through kdf.py and hsm.py.
            for name, (inode, epoch) in DEK_INPUTS.items():
                with hsm.derive(label, kdf.file_dek_info(STORE_UUID, KEY_VERSION, inode, epoch)) as dek:
                    assert bytes(dek.view).hex() == OKM[name]
            for name in ("name half 1", "name half 2", "metadata mac", "key check"):
                with hsm.derive(label, bytes.fromhex(INFO[name])) as key:
                    assert bytes(key.view).hex() == OKM[name]
            # Armed ahead (C_SignInit before the message is known), and armed but
            # then asked something else first: the same keys.
            for name, (inode, epoch) in DEK_INPUTS.items():
                hsm.arm(label)
                with hsm.derive(label, kdf.file_dek_info(STORE_UUID, KEY_VERSION, inode, epoch)) as dek:
                    assert bytes(dek.view).hex() == OKM[name]
                hsm.arm(label)
                assert not hsm.has_key(f"{label}-missing")
                with hsm.derive(label, kdf.file_dek_info(STORE_UUID, KEY_VERSION, inode, epoch)) as dek:
                    assert bytes(dek.view).hex() == OKM[name]
            # The key ring of a store with the documented UUID (same master key, the token's label).
            ring = KeyRing(hsm, document_superblock(label))
            assert ring.check_value(KEY_VERSION) == KEY_CHECK_VALUE
            assert ring.superblock_mac(document_superblock()) == SUPERBLOCK_MAC
            assert ring.name_cipher().encrypt_name(1, b"hello.txt").hex() == NAME_CT
            metadata = Metadata(tmp_path / "vectors.db", ring.metadata_mac(), create=True)
            try:
                assert metadata.inode_mac(Inode(**INODE_ROW), None, None).hex() == INODE_MAC
                assert metadata.dentry_mac(1, 2, bytes.fromhex(NAME_CT)).hex() == DENTRY_MAC
            finally:
                metadata.close()
            cipher = ring.file_cipher(2, KEY_VERSION, 0)
            out = bytearray(4096)
            slot = BLOCK_NONCE + AESGCM(bytes.fromhex(OKM["dek 2/0"])).encrypt(
                BLOCK_NONCE, BLOCK_PLAINTEXT, bytes.fromhex(BLOCK_AAD)
            )
            assert cipher.decrypt_into(BLOCK_INDEX, memoryview(slot), memoryview(out)) == 4096
            assert out == BLOCK_PLAINTEXT
            cipher.close()
            # A key derived ahead in the ring's thread, after an armed derivation.
            ring.prefetch_file_cipher(2, KEY_VERSION, 0)
            cipher = ring.file_cipher(2, KEY_VERSION, 0)
            assert ring.prefetch_hits == 1
            assert cipher.decrypt_into(BLOCK_INDEX, memoryview(slot), memoryview(out)) == 4096
            assert out == BLOCK_PLAINTEXT
            cipher.close()
            ring.close()
            # The real store: its check value and MAC follow the same rules.
            real_check = hkdf_hmac_module(MASTER_KEY, kdf.key_check_info(real_uuid, 1))[:16].hex()
            assert on_disk["keys"][0]["check"] == real_check
            assert KeyRing(hsm, store.Store(envfs.store).read_superblock()).check_value(1) == real_check
        finally:
            hsm.close()
    finally:
        server.stop()


# -- blocks --------------------------------------------------------------------------


def test_block_vector() -> None:
    assert hashlib.sha256(BLOCK_PLAINTEXT).hexdigest() == BLOCK_PLAINTEXT_SHA256
    dek = bytes.fromhex(OKM["dek 2/0"])
    ct = AESGCM(dek).encrypt(BLOCK_NONCE, BLOCK_PLAINTEXT, bytes.fromhex(BLOCK_AAD))
    assert len(ct) == 4096 + 16
    assert hashlib.sha256(ct).hexdigest() == BLOCK_CT_SHA256
    assert ct[:32].hex() == BLOCK_CT_FIRST32
    assert ct[-48:-16].hex() == BLOCK_CT_LAST32
    assert ct[-16:].hex() == BLOCK_TAG
    slot = BLOCK_NONCE + ct
    assert len(slot) == blocks.SLOT_SIZE
    assert hashlib.sha256(slot).hexdigest() == BLOCK_SLOT_SHA256

    cipher = blocks.BlockCipher(secret_of(dek), STORE_UUID, 2, KEY_VERSION, 0)
    out = bytearray(4096)
    assert cipher.decrypt_into(BLOCK_INDEX, memoryview(slot), memoryview(out)) == 4096
    assert out == BLOCK_PLAINTEXT
    # The same slot anywhere else fails: other index, other epoch, other inode.
    for index, epoch, inode in [(BLOCK_INDEX + 1, 0, 2), (BLOCK_INDEX, 1, 2), (BLOCK_INDEX, 0, 3)]:
        other = blocks.BlockCipher(secret_of(dek), STORE_UUID, inode, KEY_VERSION, epoch)
        with pytest.raises(Exception, match="authentication failed"):
            other.decrypt_into(index, memoryview(slot), memoryview(out))
    # A fresh encryption by envfs round-trips through plain AESGCM.
    fresh = bytearray(blocks.SLOT_SIZE)
    n = cipher.encrypt_into(BLOCK_INDEX, memoryview(BLOCK_PLAINTEXT), memoryview(fresh))
    assert n == blocks.SLOT_SIZE and fresh[:12] != bytes(12)
    assert AESGCM(dek).decrypt(bytes(fresh[:12]), bytes(fresh[12:]), bytes.fromhex(BLOCK_AAD)) == BLOCK_PLAINTEXT


def test_short_block_vector() -> None:
    dek = bytes.fromhex(OKM["dek 2/0"])
    slot = bytes.fromhex(SHORT_SLOT)
    assert len(slot) == len(SHORT_PLAINTEXT) + 28
    aad = struct.pack(">B16sQIIQ", 1, STORE_UUID.bytes, 2, KEY_VERSION, 0, SHORT_INDEX)
    assert AESGCM(dek).encrypt(slot[:12], SHORT_PLAINTEXT, aad) == slot[12:]
    cipher = blocks.BlockCipher(secret_of(dek), STORE_UUID, 2, KEY_VERSION, 0)
    out = bytearray(4096)
    assert cipher.decrypt_into(SHORT_INDEX, memoryview(slot), memoryview(out)) == len(SHORT_PLAINTEXT)
    assert out[: len(SHORT_PLAINTEXT)] == SHORT_PLAINTEXT
    assert blocks.is_hole(bytes(4124)) and blocks.is_hole(bytes(46)) and not blocks.is_hole(slot)


# -- names and metadata ----------------------------------------------------------------


def test_name_vectors() -> None:
    key = bytes.fromhex(NAME_KEY)
    siv = AESSIV(key)
    assert siv.encrypt(b"hello.txt", [b"envfs name\x00" + struct.pack(">Q", 1)]).hex() == NAME_CT
    assert siv.encrypt(b"../target/file", [b"envfs symlink\x00" + struct.pack(">Q", 3)]).hex() == SYMLINK_CT
    xname = bytes.fromhex(XATTR_NAME_CT)
    assert siv.encrypt(b"user.comment", [b"envfs xattr name\x00" + struct.pack(">Q", 2)]) == xname
    assert siv.encrypt(b"hi there", [b"envfs xattr value\x00" + struct.pack(">Q", 2) + xname]).hex() == XATTR_VALUE_CT

    names = NameCipher(secret_of(key))
    assert names.encrypt_name(1, b"hello.txt").hex() == NAME_CT
    assert names.decrypt_name(1, bytes.fromhex(NAME_CT)) == b"hello.txt"
    assert names.encrypt_target(3, b"../target/file").hex() == SYMLINK_CT
    assert names.encrypt_xattr_name(2, b"user.comment").hex() == XATTR_NAME_CT
    assert names.encrypt_xattr_value(2, xname, b"hi there").hex() == XATTR_VALUE_CT
    with pytest.raises(Exception, match="authentication failed"):
        names.decrypt_name(4, bytes.fromhex(NAME_CT))  # the same name under another parent


def test_metadata_mac_vectors(tmp_path: Path) -> None:
    mac_key = bytes.fromhex(OKM["metadata mac"])
    row = struct.pack(">QIIIQQqqqqIIQ", *INODE_ROW.values())
    assert len(row) == 84 and row.hex() == INODE_PACKED
    # The two sealed digest columns follow, each as a length byte (0: NULL) and its bytes.
    assert hmac.new(mac_key, b"envfs inode v2\x00" + row + b"\x00\x00", hashlib.sha256).hexdigest() == INODE_MAC
    dentry = b"envfs dentry v1\x00" + struct.pack(">QQ", 1, 2) + bytes.fromhex(NAME_CT)
    assert hmac.new(mac_key, dentry, hashlib.sha256).hexdigest() == DENTRY_MAC
    # The entry set digest of a directory holding that one entry, sealed with a given nonce.
    element = b"envfs entry element v1\x00" + struct.pack(">QQ", 1, 2) + bytes.fromhex(NAME_CT)
    assert hmac.new(mac_key, element, hashlib.sha256).hexdigest() == ENTRY_ELEMENT
    pad = b"envfs entry set seal v1\x00" + struct.pack(">Q", 1) + SEAL_NONCE
    assert hmac.new(mac_key, pad, hashlib.sha256).hexdigest() == SEAL_PAD
    masked = int(ENTRY_ELEMENT, 16) ^ int(SEAL_PAD, 16)
    sealed = SEAL_NONCE + masked.to_bytes(32)
    assert sealed.hex() == SEALED_DIGEST
    dir_row = struct.pack(">QIIIQQqqqqIIQ", *DIR_ROW.values())
    dir_input = b"envfs inode v2\x00" + dir_row + b"\x30" + sealed + b"\x00"
    assert hmac.new(mac_key, dir_input, hashlib.sha256).hexdigest() == DIR_MAC
    # The xattr set digest of the file with one xattr.
    xname, xvalue = bytes.fromhex(XATTR_NAME_CT), bytes.fromhex(XATTR_VALUE_CT)
    element = b"envfs xattr element v1\x00" + struct.pack(">QI", 2, len(xname)) + xname + xvalue
    assert hmac.new(mac_key, element, hashlib.sha256).hexdigest() == XATTR_ELEMENT
    pad = b"envfs xattr set seal v1\x00" + struct.pack(">Q", 2) + SEAL_NONCE
    assert hmac.new(mac_key, pad, hashlib.sha256).hexdigest() == XATTR_PAD
    xsealed = SEAL_NONCE + (int(XATTR_ELEMENT, 16) ^ int(XATTR_PAD, 16)).to_bytes(32)
    assert xsealed.hex() == XATTR_SEALED
    file_input = b"envfs inode v2\x00" + row + b"\x00\x30" + xsealed
    assert hmac.new(mac_key, file_input, hashlib.sha256).hexdigest() == INODE_MAC_WITH_XATTR

    metadata = Metadata(tmp_path / "m.db", crypto_hmac.HMAC(mac_key, hashes.SHA256()), create=True)
    try:
        assert metadata.inode_mac(Inode(**INODE_ROW), None, None).hex() == INODE_MAC
        assert metadata.xattr_element(2, xname, xvalue) == int(XATTR_ELEMENT, 16)
        assert metadata.inode_mac(Inode(**INODE_ROW), None, xsealed).hex() == INODE_MAC_WITH_XATTR
        assert metadata.dentry_mac(1, 2, bytes.fromhex(NAME_CT)).hex() == DENTRY_MAC
        assert metadata.entry_element(Dentry(7, 1, bytes.fromhex(NAME_CT), 2)) == int(ENTRY_ELEMENT, 16)
        directory = Inode(**DIR_ROW)
        assert metadata.inode_mac(directory, bytes.fromhex(SEALED_DIGEST), None).hex() == DIR_MAC
        columns, marks = ", ".join(DIR_ROW), ", ".join("?" * len(DIR_ROW))
        for values, entries, xattrs, mac in [
            (DIR_ROW, bytes.fromhex(SEALED_DIGEST), None, DIR_MAC),
            (INODE_ROW, None, xsealed, INODE_MAC_WITH_XATTR),
        ]:
            metadata.db.execute(
                f"INSERT INTO inodes ({columns}, entries, xattrs, mac) VALUES ({marks}, ?, ?, ?)",
                (*values.values(), entries, xattrs, bytes.fromhex(mac)),
            )
        read_back = metadata.get_inode(1)
        assert read_back is not None and read_back.entries == int(ENTRY_ELEMENT, 16) and read_back.xattrs == 0
        read_back = metadata.get_inode(2)
        assert read_back is not None and read_back.entries == 0 and read_back.xattrs == int(XATTR_ELEMENT, 16)
        assert metadata.get_setting("schema_version") == 2
    finally:
        metadata.close()


def test_superblock_vector() -> None:
    sb = document_superblock()
    assert sb.mac_input().decode() == SUPERBLOCK_CANONICAL
    mac_key = bytes.fromhex(OKM["metadata mac"])
    mac = hmac.new(mac_key, b"envfs superblock v1\x00" + SUPERBLOCK_CANONICAL.encode(), hashlib.sha256).hexdigest()
    assert mac == SUPERBLOCK_MAC
    # Round trip through the on-disk JSON: "mac" is outside the MAC input.
    sb.mac = SUPERBLOCK_MAC
    again = store.Superblock.from_json(json.loads(json.dumps(sb.to_json())), "vector")
    assert again.mac_input().decode() == SUPERBLOCK_CANONICAL and again.mac == SUPERBLOCK_MAC


# -- a second implementation -----------------------------------------------------------


class IndependentReader:
    """Reads a store from docs/FORMAT.md alone: no envfs import is used here."""

    SLOT, BLOCK, OVERHEAD = 4124, 4096, 28

    def __init__(self, store_dir: Path, master_key: bytes) -> None:
        self.dir = store_dir
        self.master = master_key
        sb = json.loads((store_dir / "envfs.json").read_text())
        assert sb["format"] == "envfs" and sb["format_version"] == 1 and sb["block_size"] == 4096
        self.uuid = uuid.UUID(sb["uuid"]).bytes
        self.version = sb["current_key_version"]
        key = next(k for k in sb["keys"] if k["version"] == self.version)
        assert key["check"] == self.derive(b"envfs key check v1", self.version)[:16].hex(), "wrong master key"
        self.mac_key = self.derive(b"envfs metadata mac key v1", self.version)
        body = {k: v for k, v in sb.items() if k != "mac"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        assert hmac.compare_digest(self.mac(b"envfs superblock v1\x00", canonical).hex(), sb["mac"])
        self.db = sqlite3.connect(f"file:{store_dir / 'meta.db'}?mode=ro", uri=True)
        assert self.db.execute("SELECT value FROM settings WHERE name='schema_version'").fetchone() == (2,)
        rows_version = self.db.execute("SELECT value FROM settings WHERE name='metadata_key_version'").fetchone()
        assert (rows_version or (1,))[0] == self.version, "a rotation stopped half-way"
        name_key = b"".join(self.derive(b"envfs name key v1", self.version, bytes([h])) for h in (1, 2))
        self.siv = AESSIV(name_key)
        # The sealed entry and xattr set digests, opened by `inodes`.
        self.digests: dict[int, int] = {}
        self.xattr_digests: dict[int, int] = {}

    def derive(self, label: bytes, version: int, fields: bytes = b"") -> bytes:
        info = label + b"\x00" + self.uuid + struct.pack(">I", version) + fields
        return hmac.new(self.master, info + b"\x01", hashlib.sha256).digest()

    def mac(self, *parts: bytes) -> bytes:
        return hmac.new(self.mac_key, b"".join(parts), hashlib.sha256).digest()

    def inodes(self) -> dict[int, tuple[int, ...]]:
        rows = {}
        self.digests.clear()
        self.xattr_digests.clear()
        for row in self.db.execute(
            "SELECT id, mode, uid, gid, nlink, rdev, size, atime_ns, mtime_ns, ctime_ns, key_version, key_epoch,"
            " block_writes, mac, entries, xattrs FROM inodes"
        ):
            packed = struct.pack(">QIIIQQqqqqIIQ", *row[:13])
            for sealed in row[14:16]:
                packed += b"\x00" if sealed is None else bytes((len(sealed),)) + sealed
            assert hmac.compare_digest(self.mac(b"envfs inode v2\x00", packed), row[13]), f"inode {row[0]}"
            rows[row[0]] = row[:13]
            for sealed, label, digests in [
                (row[14], b"envfs entry set seal v1\x00", self.digests),
                (row[15], b"envfs xattr set seal v1\x00", self.xattr_digests),
            ]:
                if sealed is not None:
                    pad = self.mac(label, struct.pack(">Q", row[0]), sealed[:16])
                    digests[row[0]] = int.from_bytes(sealed[16:]) ^ int.from_bytes(pad)
        return rows

    def entries(self) -> dict[int, list[tuple[bytes, int]]]:
        """Every directory's entries, checked against its entry set digest (`inodes` first)."""
        children: dict[int, list[tuple[bytes, int]]] = {}
        digests: dict[int, int] = {}
        for parent, name_ct, inode, mac in self.db.execute("SELECT parent, name, inode, mac FROM dentries"):
            expected = self.mac(b"envfs dentry v1\x00", struct.pack(">QQ", parent, inode), name_ct)
            assert hmac.compare_digest(expected, mac), f"entry in {parent}"
            name = self.siv.decrypt(name_ct, [b"envfs name\x00" + struct.pack(">Q", parent)])
            children.setdefault(parent, []).append((name, inode))
            element = self.mac(b"envfs entry element v1\x00", struct.pack(">QQ", parent, inode), name_ct)
            digests[parent] = digests.get(parent, 0) ^ int.from_bytes(element)
        assert digests == self.digests, "a directory's entries do not match its entry set digest"
        return children

    def symlink(self, inode: int) -> bytes:
        (ct,) = self.db.execute("SELECT target FROM symlinks WHERE inode=?", (inode,)).fetchone()
        return self.siv.decrypt(ct, [b"envfs symlink\x00" + struct.pack(">Q", inode)])

    def xattrs(self, inode: int) -> dict[bytes, bytes]:
        """An inode's xattrs, checked against its xattr set digest (`inodes` first)."""
        found, digest = {}, 0
        for name_ct, value_ct in self.db.execute("SELECT name, value FROM xattrs WHERE inode=?", (inode,)):
            name = self.siv.decrypt(name_ct, [b"envfs xattr name\x00" + struct.pack(">Q", inode)])
            found[name] = self.siv.decrypt(value_ct, [b"envfs xattr value\x00" + struct.pack(">Q", inode) + name_ct])
            length = struct.pack(">QI", inode, len(name_ct))
            digest ^= int.from_bytes(self.mac(b"envfs xattr element v1\x00", length, name_ct, value_ct))
        assert digest == self.xattr_digests.get(inode, 0), f"inode {inode}: xattrs do not match their digest"
        return found

    def content(self, row: tuple[int, ...]) -> tuple[bytes, int]:
        """The plaintext of a regular file, and how many hole slots it has."""
        inode, size, version, epoch = row[0], row[6], row[10], row[11]
        path = self.dir / "data" / f"{inode & 0xFF:02x}" / f"{inode:016x}.{version}.{epoch}"
        if size == 0:
            return b"", 0
        data = path.read_bytes()
        count = -(-size // self.BLOCK)
        full, rest = divmod(size, self.BLOCK)
        assert full * self.SLOT + (rest + self.OVERHEAD if rest else 0) <= len(data) <= count * self.SLOT
        aead = AESGCM(self.derive(b"envfs file data key v1", version, struct.pack(">QI", inode, epoch)))
        aad_prefix = struct.pack(">B16sQII", 1, self.uuid, inode, version, epoch)
        out, holes = bytearray(), 0
        for index in range(count):
            n = min(self.BLOCK, size - index * self.BLOCK)
            slot = data[index * self.SLOT : (index + 1) * self.SLOT]
            assert len(slot) >= n + self.OVERHEAD, f"inode {inode} block {index} cut short"
            if slot.count(0) == len(slot):
                out += bytes(n)
                holes += 1
                continue
            plain = aead.decrypt(slot[:12], slot[12:], aad_prefix + struct.pack(">Q", index))
            assert len(plain) in (n, self.BLOCK) and plain[n:].count(0) == len(plain) - n
            out += plain[:n]
        return bytes(out), holes

    def tree(self) -> tuple[dict[str, object], dict[str, int], int]:
        """{path: content} from the root (inode 1), {path: inode id}, and the number of holes."""
        inodes, children = self.inodes(), self.entries()
        links: dict[int, int] = {}
        for entries in children.values():
            for _, inode in entries:
                links[inode] = links.get(inode, 0) + 1
        tree: dict[str, object] = {}
        ids: dict[str, int] = {}
        holes = 0
        pending = [("", 1)]
        while pending:
            prefix, directory = pending.pop()
            for name, inode in children.get(directory, []):
                path = f"{prefix}/{name.decode()}"
                row = inodes[inode]
                ids[path] = inode
                mode = row[1]
                if stat.S_ISDIR(mode):
                    subdirs = sum(stat.S_ISDIR(inodes[i][1]) for _, i in children.get(inode, []))
                    assert row[4] == 2 + subdirs
                    tree[path] = ("dir", stat.S_IMODE(mode))
                    pending.append((path, inode))
                elif stat.S_ISLNK(mode):
                    target = self.symlink(inode)
                    assert row[6] == len(target)
                    tree[path] = ("symlink", target)
                else:
                    assert stat.S_ISREG(mode) and row[4] == links[inode]
                    data, file_holes = self.content(row)
                    holes += file_holes
                    tree[path] = ("file", stat.S_IMODE(mode), data, self.xattrs(inode))
        return tree, ids, holes


def _pattern(n: int, seed: bytes) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:n])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rotated", [False, True], ids=["as-written", "after-rotation"])
def test_independent_decryptor(envfs: Envfs, tmp_path: Path, rotated: bool) -> None:
    """The reader of FORMAT.md section 10 decrypts a store written through a mount;
    after a rotation (section 8), with the new version's master key alone."""
    key_file = tmp_path / "master.hex"
    key_file.write_text(MASTER_KEY.hex())
    envfs.init("--import-master-key-file", str(key_file))
    envfs.mount()
    mnt = envfs.mnt
    big = _pattern(3 * 4096 + 1234, b"big")
    sparse_head, sparse_tail, sparse_gap = b"head of a sparse file", b"its tail", 5 * 4096 + 10
    nested = b"a file in a subdirectory\n"
    expected: dict[str, object] = {}

    (mnt / "big.bin").write_bytes(big)
    with open(mnt / "big.bin", "r+b") as f:  # rewrite a range across a block boundary
        f.seek(4000)
        f.write(b"X" * 200)
    big = big[:4000] + b"X" * 200 + big[4200:]
    os.chmod(mnt / "big.bin", 0o640)
    os.setxattr(mnt / "big.bin", "user.comment", b"multi-block, partial last block")
    os.link(mnt / "big.bin", mnt / "big-link")
    (mnt / "sub" / "dir").mkdir(parents=True)
    os.chmod(mnt / "sub", 0o750)
    (mnt / "sub" / "dir" / "nested.txt").write_bytes(nested)
    with open(mnt / "sparse.bin", "wb") as f:
        f.write(sparse_head)
        f.seek(sparse_gap)
        f.write(sparse_tail)
    with open(mnt / "grown", "wb") as f:
        f.write(b"x")
        f.truncate(100_000)
    (mnt / "empty").write_bytes(b"")
    os.symlink("sub/dir/nested.txt", mnt / "link")
    st_ino = {f"/{p.relative_to(mnt)}": os.lstat(p).st_ino for p in mnt.rglob("*")}
    envfs.unmount()

    file_mode = 0o644 & ~_umask()
    dir_mode = 0o777 & ~_umask()
    big_entry = ("file", 0o640, big, {b"user.comment": b"multi-block, partial last block"})
    expected = {
        "/big.bin": big_entry,
        "/big-link": big_entry,
        "/sub": ("dir", 0o750),
        "/sub/dir": ("dir", dir_mode),
        "/sub/dir/nested.txt": ("file", file_mode, nested, {}),
        "/sparse.bin": ("file", file_mode, sparse_head + bytes(sparse_gap - len(sparse_head)) + sparse_tail, {}),
        "/grown": ("file", file_mode, b"x" + bytes(100_000 - 1), {}),
        "/empty": ("file", file_mode, b"", {}),
        "/link": ("symlink", b"sub/dir/nested.txt"),
    }
    master_key = MASTER_KEY
    if rotated:
        master_key = hashlib.sha256(b"the second master key").digest()
        key_file.write_text(master_key.hex())
        envfs.run("rotate", str(envfs.store), "--import-master-key-file", str(key_file), "--retire")
    reader = IndependentReader(envfs.store, master_key)
    try:
        assert reader.version == (2 if rotated else 1)
        tree, ids, holes = reader.tree()
    finally:
        reader.db.close()
    assert tree == expected
    assert ids == st_ino  # the inode id is st_ino
    assert ids["/big.bin"] == ids["/big-link"]
    # sparse.bin: blocks 1-4 are holes; grown: block 0 written, blocks 1-24 holes.
    assert holes == 4 + 24


def _downgrade_to_schema_1(store_dir: Path, master_key: bytes) -> None:
    """Make a store's metadata what schema version 1 wrote: no entry set digests,
    inode MACs with the version 1 prefix (FORMAT.md 9)."""
    reader = IndependentReader(store_dir, master_key)
    db = reader.db
    reader.db = sqlite3.connect(store_dir / "meta.db")
    db.close()
    with reader.db as db:
        for row in db.execute("SELECT * FROM inodes").fetchall():
            packed = struct.pack(">QIIIQQqqqqIIQ", *row[:13])
            db.execute("UPDATE inodes SET mac=? WHERE id=?", (reader.mac(b"envfs inode v1\x00", packed), row[0]))
        db.execute("ALTER TABLE inodes DROP COLUMN entries")
        db.execute("ALTER TABLE inodes DROP COLUMN xattrs")
        db.execute("UPDATE settings SET value=1 WHERE name='schema_version'")
    reader.db.close()


@pytest.mark.timeout(120)
def test_schema_1_store_is_upgraded(envfs: Envfs, tmp_path: Path) -> None:
    """A store whose metadata schema version 1 wrote gets its entry set digests at
    the next mount, and reads as before: through the mount, for FORMAT.md's reader
    and for fsck; from then on a deleted entry is detected there as well."""
    key_file = tmp_path / "master.hex"
    key_file.write_text(MASTER_KEY.hex())
    envfs.init("--import-master-key-file", str(key_file))
    envfs.mount()
    (envfs.mnt / "sub" / "deeper").mkdir(parents=True)
    for i in range(40):
        (envfs.mnt / "sub" / f"f{i}").write_bytes(b"%d" % i)
    (envfs.mnt / "sub" / "deeper" / "x").write_bytes(b"x")
    os.setxattr(envfs.mnt / "sub" / "f3", "user.k", b"value")
    os.setxattr(envfs.mnt / "sub", "user.d", b"on a directory")
    os.symlink("sub/f1", envfs.mnt / "link")
    (envfs.mnt / "empty-dir").mkdir()
    envfs.unmount()
    _downgrade_to_schema_1(envfs.store, MASTER_KEY)
    db = sqlite3.connect(envfs.store / "meta.db")
    assert db.execute("SELECT value FROM settings WHERE name='schema_version'").fetchone() == (1,)
    db.close()
    envfs.forget_anchor()  # a store of schema version 1 was made before anchors

    envfs.mount()
    assert sorted(os.listdir(envfs.mnt / "sub")) == sorted([f"f{i}" for i in range(40)] + ["deeper"])
    assert (envfs.mnt / "sub" / "f7").read_bytes() == b"7"
    assert os.getxattr(envfs.mnt / "sub" / "f3", "user.k") == b"value"
    assert os.listxattr(envfs.mnt / "sub") == ["user.d"]
    assert sorted(os.listdir(envfs.mnt)) == ["empty-dir", "link", "sub"]
    os.rmdir(envfs.mnt / "empty-dir")
    envfs.unmount()
    reader = IndependentReader(envfs.store, MASTER_KEY)
    try:
        tree, _, _ = reader.tree()  # checks every directory's digest
        assert reader.db.execute("SELECT value FROM settings WHERE name='schema_version'").fetchone() == (2,)
    finally:
        reader.db.close()
    assert tree["/sub/deeper/x"][2] == b"x"
    assert tree["/sub/f3"][3] == {b"user.k": b"value"}
    result = envfs.run("fsck", str(envfs.store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_tampering_as_documented(envfs: Envfs) -> None:
    """FORMAT.md section 4.6 (an attacker and a data file), one case per file."""
    envfs.init()
    envfs.mount()
    partial = _pattern(3 * 4096 + 100, b"partial")  # last slot stored exactly: 128 bytes
    aligned = _pattern(3 * 4096, b"aligned")
    cases = {
        "zeroed": partial, "cut-in-last": partial, "cut-at-boundary": partial, "appended-partial": partial,
        "appended-aligned": aligned, "swapped": partial, "transplanted": partial, "victim": partial,
    }  # fmt: skip
    for name, data in cases.items():
        (envfs.mnt / name).write_bytes(data)
    ids = {name: os.stat(envfs.mnt / name).st_ino for name in cases}
    envfs.unmount()

    def path(name: str) -> Path:
        return envfs.store / "data" / f"{ids[name] & 0xFF:02x}" / f"{ids[name]:016x}.1.0"

    slot = 4124
    with open(path("zeroed"), "r+b") as f:
        f.seek(slot)
        f.write(bytes(slot))
    os.truncate(path("cut-in-last"), 3 * slot + 50)
    os.truncate(path("cut-at-boundary"), 2 * slot)
    with open(path("appended-partial"), "ab") as f:
        f.write(os.urandom(2 * slot))
    with open(path("appended-aligned"), "ab") as f:
        f.write(os.urandom(2 * slot))
    raw = bytearray(path("swapped").read_bytes())
    raw[:slot], raw[slot : 2 * slot] = raw[slot : 2 * slot], raw[:slot]
    path("swapped").write_bytes(raw)
    path("victim").write_bytes(path("transplanted").read_bytes())  # same plaintext, other inode

    envfs.mount()

    def blocks_of(name: str) -> list[object]:
        """Each block's plaintext, or "EIO"."""
        result: list[object] = []
        fd = os.open(envfs.mnt / name, os.O_RDONLY)
        try:
            for index in range(-(-len(cases[name]) // 4096)):
                try:
                    result.append(os.pread(fd, 4096, index * 4096))
                except OSError as e:
                    assert e.errno == 5
                    result.append("EIO")
        finally:
            os.close(fd)
        return result

    def split(data: bytes) -> list[object]:
        return [data[i : i + 4096] for i in range(0, len(data), 4096)]

    p = split(partial)
    assert blocks_of("zeroed") == [p[0], bytes(4096), p[2], p[3]]  # the known gap: a zeroed slot is a hole
    assert blocks_of("cut-in-last") == [p[0], p[1], p[2], "EIO"]
    assert blocks_of("cut-at-boundary") == [p[0], p[1], "EIO", "EIO"]
    assert blocks_of("appended-partial") == [p[0], p[1], p[2], "EIO"]  # junk lands in the last slot
    assert blocks_of("appended-aligned") == split(aligned)  # beyond the last slot: cut off
    assert os.path.getsize(path("appended-aligned")) == 3 * slot
    assert blocks_of("swapped") == ["EIO", "EIO", p[2], p[3]]
    assert blocks_of("victim") == ["EIO"] * 4
    assert blocks_of("transplanted") == p
    envfs.unmount()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
