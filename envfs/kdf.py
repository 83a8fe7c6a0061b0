"""HKDF info layouts: the one place that builds an info string.

Every derived key is HKDF-Expand(PRK = master key version v, info, L = 32),
computed in the HSM. An info string is

    label (ASCII) || 0x00 || store UUID (16 bytes) || key version (u32 BE) || fields

with the purpose-specific fields listed beside each builder and in
docs/FORMAT.md. A new purpose is a new label; no existing vector changes.
"""

from __future__ import annotations

import struct
import uuid

LABEL_FILE_DEK = b"envfs file data key v1"
LABEL_NAME_KEY = b"envfs name key v1"
LABEL_METADATA_MAC = b"envfs metadata mac key v1"
LABEL_KEY_CHECK = b"envfs key check v1"


def _prefix(label: bytes, store_uuid: uuid.UUID, key_version: int) -> bytes:
    return label + b"\x00" + store_uuid.bytes + struct.pack(">I", key_version)


def file_dek_info(store_uuid: uuid.UUID, key_version: int, inode_id: int, key_epoch: int) -> bytes:
    """Data key of one file: fields = inode id (u64 BE) || key epoch (u32 BE)."""
    return _prefix(LABEL_FILE_DEK, store_uuid, key_version) + struct.pack(">QI", inode_id, key_epoch)


def name_key_info(store_uuid: uuid.UUID, key_version: int, half: int) -> bytes:
    """One half of the 64-byte AES-SIV key for names: fields = half (u8, 1 or 2)."""
    if half not in (1, 2):
        raise ValueError("half must be 1 or 2")
    return _prefix(LABEL_NAME_KEY, store_uuid, key_version) + bytes([half])


def metadata_mac_info(store_uuid: uuid.UUID, key_version: int) -> bytes:
    """HMAC-SHA256 key for metadata rows: no further fields."""
    return _prefix(LABEL_METADATA_MAC, store_uuid, key_version)


def key_check_info(store_uuid: uuid.UUID, key_version: int) -> bytes:
    """Key check value (first 16 bytes kept in the superblock): no further fields."""
    return _prefix(LABEL_KEY_CHECK, store_uuid, key_version)
