"""Block arithmetic and AES-256-GCM of one block with its AAD.

A file's plaintext is cut into 4096-byte blocks. Block i is stored in the
file's data file in the *slot* starting at i * 4124:

    nonce (12) || ciphertext (n) || tag (16)            n = 1 .. 4096

A slot of all zero bytes is a hole and reads as zeros. The AAD binds a block
to its store, file, key and place (see `block_aad`). docs/FORMAT.md has the
rules for the last block and for holes.
"""

from __future__ import annotations

import os
import struct
import uuid

from ._gcm import Gcm
from .errors import IntegrityError
from .secret import Secret

BLOCK_SIZE = 4096
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_OVERHEAD = NONCE_SIZE + TAG_SIZE
SLOT_SIZE = BLOCK_SIZE + BLOCK_OVERHEAD
AAD_VERSION = 1
# The largest plaintext size whose data file length fits in an off_t.
MAX_FILE_SIZE = (2**63 - 1) // SLOT_SIZE * BLOCK_SIZE

_ZERO_SLOT = bytes(SLOT_SIZE)
_ZERO_NONCE = bytes(NONCE_SIZE)


def block_aad(store_uuid: uuid.UUID, inode_id: int, key_version: int, key_epoch: int, index: int) -> bytes:
    """AAD v1: version (u8) || store UUID (16) || inode id (u64) || key version (u32)
    || key epoch (u32) || block index (u64), integers big-endian: 41 bytes."""
    return struct.pack(">B16sQIIQ", AAD_VERSION, store_uuid.bytes, inode_id, key_version, key_epoch, index)


def block_count(size: int) -> int:
    return -(-size // BLOCK_SIZE)


def min_data_length(size: int) -> int:
    """Shortest valid data file for a plaintext size (last block stored exactly)."""
    full, rest = divmod(size, BLOCK_SIZE)
    return full * SLOT_SIZE + (rest + BLOCK_OVERHEAD if rest else 0)


def max_data_length(size: int) -> int:
    """Longest valid data file for a plaintext size (last slot stored full)."""
    return block_count(size) * SLOT_SIZE


_ZERO_SLOT_VIEW = memoryview(_ZERO_SLOT)


def is_hole(slot: memoryview | bytes) -> bool:
    # Encryption never writes an all-zero nonce, so a non-zero first byte
    # settles most slots without comparing all of them.
    return not (len(slot) and slot[0]) and slot == _ZERO_SLOT_VIEW[: len(slot)]


def fresh_nonces(count: int) -> bytes:
    """`count` random 12-byte nonces, none all zero (an all-zero slot means "hole")."""
    nonces = os.urandom(NONCE_SIZE * count)
    # The substring test is one C pass; only its (astronomically rare) hit needs the exact check.
    while _ZERO_NONCE in nonces and any(
        nonces[k * NONCE_SIZE : (k + 1) * NONCE_SIZE] == _ZERO_NONCE for k in range(count)
    ):
        nonces = os.urandom(NONCE_SIZE * count)
    return nonces


class BlockCipher:
    """AES-256-GCM for the blocks of one file under one data key.

    The cipher runs in `envfs._gcm`, OpenSSL's EVP interface driven from C:
    a request's blocks go through in one call without the GIL, where
    `cryptography`'s AESGCM would cost a call with about 3.5 µs of set-up per
    4096-byte block, under the GIL (docs/PERFORMANCE.md). The key bytes are
    copied into OpenSSL's contexts when this object is built; the caller wipes
    its `Secret` straight after. OpenSSL cleanses its copies on `close`.
    """

    def __init__(self, dek: Secret, store_uuid: uuid.UUID, inode_id: int, key_version: int, key_epoch: int):
        prefix = block_aad(store_uuid, inode_id, key_version, key_epoch, 0)[:-8]
        self._gcm = dek.build(lambda key: Gcm(key, prefix))
        self.inode_id = inode_id
        self.key_version = key_version
        self.key_epoch = key_epoch

    def encrypt_into(self, index: int, plaintext: memoryview, slot: memoryview) -> int:
        """Encrypt one block into `slot` (nonce || ciphertext || tag); return its length."""
        return self.encrypt_blocks_into(index, plaintext, slot)

    def encrypt_blocks_into(self, first_index: int, plaintext: memoryview, slots: memoryview) -> int:
        """Encrypt consecutive blocks (each 4096 bytes, the last one possibly
        shorter) into consecutive slots; return the length of what was written."""
        return self._gcm.seal(first_index, fresh_nonces(block_count(len(plaintext))), plaintext, slots)

    def decrypt_blocks_into(self, first_index: int, slots: memoryview, plaintext: memoryview) -> int:
        """Authenticate and decrypt consecutive slots (4124 bytes each, the last
        one possibly shorter; all-zero slots are holes and give zeros) into
        consecutive 4096-byte blocks of `plaintext`; return the plaintext length."""
        got = self._gcm.open(first_index, slots, plaintext)
        if got < 0:
            raise IntegrityError(f"inode {self.inode_id} block {first_index - got - 1}: authentication failed")
        return got

    def decrypt_into(self, index: int, slot: memoryview, plaintext: memoryview) -> int:
        """Authenticate and decrypt one slot into `plaintext`; return the plaintext length."""
        if len(slot) <= BLOCK_OVERHEAD:
            raise IntegrityError(f"inode {self.inode_id} block {index}: slot of {len(slot)} bytes")
        return self.decrypt_blocks_into(index, slot[:SLOT_SIZE], plaintext)

    def close(self) -> None:
        """Drop the OpenSSL contexts (and with them the key schedules)."""
        self._gcm.close()
