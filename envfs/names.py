"""Encryption of names, symlink targets and extended attributes.

All of them use deterministic AES-SIV (RFC 5297) under one 512-bit name key,
so an encrypted name can be looked up with an index query. The associated
data binds each ciphertext to its purpose and owner: a directory entry's
name to its parent directory, a target or an xattr to its inode, an xattr
value to its inode and (encrypted) name. Moving a ciphertext anywhere else
makes it fail authentication.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from .errors import IntegrityError
from .secret import Secret

NAME_MAX = 255

_NAME = b"envfs name\x00"
_SYMLINK = b"envfs symlink\x00"
_XATTR_NAME = b"envfs xattr name\x00"
_XATTR_VALUE = b"envfs xattr value\x00"


class NameCipher:
    """AES-SIV for everything that is not file content."""

    def __init__(self, name_key: Secret) -> None:
        if len(name_key) != 64:
            raise ValueError("the name key is 64 bytes")
        self._siv: AESSIV | None = name_key.build(AESSIV)

    def close(self) -> None:
        """Drop the OpenSSL contexts holding the key."""
        self._siv = None

    def _cipher(self) -> AESSIV:
        if self._siv is None:
            raise ValueError("name cipher closed")
        return self._siv

    def _seal(self, plaintext: bytes, ad: bytes) -> bytes:
        return self._cipher().encrypt(plaintext, [ad])

    def _open(self, ciphertext: bytes, ad: bytes, what: str) -> bytes:
        cipher = self._cipher()  # a closed cipher is a programming error, not a failed tag
        try:
            return cipher.decrypt(ciphertext, [ad])
        except (InvalidTag, ValueError) as e:
            raise IntegrityError(f"{what}: authentication failed") from e

    def encrypt_name(self, parent_id: int, name: bytes) -> bytes:
        return self._seal(name, _NAME + struct.pack(">Q", parent_id))

    def decrypt_name(self, parent_id: int, ciphertext: bytes) -> bytes:
        return self._open(ciphertext, _NAME + struct.pack(">Q", parent_id), f"name in directory {parent_id}")

    def encrypt_target(self, inode_id: int, target: bytes) -> bytes:
        return self._seal(target, _SYMLINK + struct.pack(">Q", inode_id))

    def decrypt_target(self, inode_id: int, ciphertext: bytes) -> bytes:
        return self._open(ciphertext, _SYMLINK + struct.pack(">Q", inode_id), f"symlink target of inode {inode_id}")

    def encrypt_xattr_name(self, inode_id: int, name: bytes) -> bytes:
        return self._seal(name, _XATTR_NAME + struct.pack(">Q", inode_id))

    def decrypt_xattr_name(self, inode_id: int, ciphertext: bytes) -> bytes:
        return self._open(ciphertext, _XATTR_NAME + struct.pack(">Q", inode_id), f"xattr name of inode {inode_id}")

    def encrypt_xattr_value(self, inode_id: int, name_ciphertext: bytes, value: bytes) -> bytes:
        return self._seal(value, _XATTR_VALUE + struct.pack(">Q", inode_id) + name_ciphertext)

    def decrypt_xattr_value(self, inode_id: int, name_ciphertext: bytes, ciphertext: bytes) -> bytes:
        return self._open(
            ciphertext, _XATTR_VALUE + struct.pack(">Q", inode_id) + name_ciphertext, f"xattr value of inode {inode_id}"
        )
