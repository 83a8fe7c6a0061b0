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

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import IntegrityError
from .secret import Secret

BLOCK_SIZE = 4096
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_OVERHEAD = NONCE_SIZE + TAG_SIZE
SLOT_SIZE = BLOCK_SIZE + BLOCK_OVERHEAD
AAD_VERSION = 1

_ZERO_SLOT = bytes(SLOT_SIZE)
_ZERO_BLOCK = bytes(BLOCK_SIZE)
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


class BlockCipher:
    """AES-256-GCM for the blocks of one file under one data key.

    The key bytes are copied into OpenSSL's contexts when this object is
    built; the caller wipes its `Secret` straight after. OpenSSL cleanses
    its copies when this object is freed.
    """

    def __init__(self, dek: Secret, store_uuid: uuid.UUID, inode_id: int, key_version: int, key_epoch: int):
        self._aead: AESGCM | None = dek.build(AESGCM)
        self._aad_prefix = block_aad(store_uuid, inode_id, key_version, key_epoch, 0)[:-8]
        self.inode_id = inode_id
        self.key_version = key_version
        self.key_epoch = key_epoch

    def _aad(self, index: int) -> bytes:
        return self._aad_prefix + index.to_bytes(8, "big")

    def encrypt_into(self, index: int, plaintext: memoryview, slot: memoryview) -> int:
        """Encrypt one block into `slot` (nonce || ciphertext || tag); return its length."""
        return self.encrypt_blocks_into(index, plaintext, slot)

    def encrypt_blocks_into(self, first_index: int, plaintext: memoryview, slots: memoryview) -> int:
        """Encrypt consecutive blocks (each 4096 bytes, the last one possibly
        shorter) into consecutive slots; return the length of what was written.

        The per-block work of a large request in one loop: one call for all the
        nonces, no per-block method calls but OpenSSL's.
        """
        aead = self._aead
        if aead is None:
            raise ValueError("block cipher closed")
        count = -(-len(plaintext) // BLOCK_SIZE)
        nonces = os.urandom(NONCE_SIZE * count)
        encrypt, prefix = aead.encrypt_into, self._aad_prefix
        at = 0
        for k in range(count):
            nonce = nonces[k * NONCE_SIZE : (k + 1) * NONCE_SIZE]
            while nonce == _ZERO_NONCE:  # an all-zero slot means "hole"
                nonce = os.urandom(NONCE_SIZE)
            block = plaintext[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE]
            slots[at : at + NONCE_SIZE] = nonce
            end = at + NONCE_SIZE + len(block) + TAG_SIZE
            encrypt(nonce, block, prefix + (first_index + k).to_bytes(8, "big"), slots[at + NONCE_SIZE : end])
            at = end
        return at

    def decrypt_blocks_into(self, first_index: int, slots: memoryview, plaintext: memoryview) -> None:
        """Authenticate and decrypt whole slots (4124 bytes each, holes allowed)
        into consecutive 4096-byte blocks of `plaintext`."""
        aead = self._aead
        if aead is None:
            raise ValueError("block cipher closed")
        decrypt, prefix = aead.decrypt_into, self._aad_prefix
        for k in range(len(slots) // SLOT_SIZE):
            at = k * SLOT_SIZE
            block = plaintext[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE]
            if not slots[at] and is_hole(slots[at : at + SLOT_SIZE]):  # a non-zero first byte settles most
                block[:] = _ZERO_BLOCK
                continue
            index = first_index + k
            try:
                nonce, sealed = slots[at : at + NONCE_SIZE], slots[at + NONCE_SIZE : at + SLOT_SIZE]
                decrypt(nonce, sealed, prefix + index.to_bytes(8, "big"), block)
            except InvalidTag as e:
                raise IntegrityError(f"inode {self.inode_id} block {index}: authentication failed") from e

    def decrypt_into(self, index: int, slot: memoryview, plaintext: memoryview) -> int:
        """Authenticate and decrypt one slot into `plaintext`; return the plaintext length."""
        if self._aead is None:
            raise ValueError("block cipher closed")
        if len(slot) <= BLOCK_OVERHEAD:
            raise IntegrityError(f"inode {self.inode_id} block {index}: slot of {len(slot)} bytes")
        try:
            return self._aead.decrypt_into(
                bytes(slot[:NONCE_SIZE]), slot[NONCE_SIZE:], self._aad(index), plaintext[: len(slot) - BLOCK_OVERHEAD]
            )
        except InvalidTag as e:
            raise IntegrityError(f"inode {self.inode_id} block {index}: authentication failed") from e

    def close(self) -> None:
        """Drop the OpenSSL contexts (and with them the key schedules)."""
        self._aead = None
