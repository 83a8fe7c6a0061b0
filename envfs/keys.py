"""The store's key ring: derives every key in the HSM and hands out ciphers.

Nothing outside this module (and `hsm`, `secret`) holds key bytes: callers
get a `BlockCipher`, a `NameCipher` or a keyed HMAC context, and each
`Secret` is wiped as soon as the object it keyed exists.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from hmac import compare_digest
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes, hmac

from . import kdf
from .blocks import BlockCipher
from .errors import CorruptStore, KeyNotFound, WrongKey
from .hsm import DERIVED_KEY_BYTES, Hsm
from .names import NameCipher
from .secret import Secret
from .store import Superblock

log = logging.getLogger(__name__)

CHECK_VALUE_BYTES = 16
# How many file keys may be derived ahead at once: two absorb the jitter of the
# HSM's round trips when a reader opens files faster than one derivation takes.
PREFETCH_DEPTH = 2
_SUPERBLOCK_MAC_LABEL = b"envfs superblock v1\x00"


class KeyRing:
    """Derived keys of one store, for the HSM session given."""

    def __init__(self, hsm: Hsm, superblock: Superblock) -> None:
        self.hsm = hsm
        self.superblock = superblock
        self.derivations = 0
        self.prefetch_hits = 0  # file keys that were ready when asked for
        self.key_wait_ns = 0  # time file_cipher spent on keys: waiting for one derived ahead, or deriving
        # Keyed metadata MAC contexts by key version (two while a rotation runs).
        self._metadata_macs: dict[int, hmac.HMAC] = {}
        # Keys being derived ahead (by the HSM's key thread), oldest first, at
        # most PREFETCH_DEPTH of them.
        self._prefetched: deque[_Prefetched] = deque()

    def _derive(self, key_version: int, info: bytes) -> Secret:
        self.derivations += 1
        return self.hsm.derive(self.superblock.key(key_version).label, info)

    def check_value(self, key_version: int) -> str:
        with self._derive(key_version, kdf.key_check_info(self.superblock.uuid, key_version)) as secret:
            return bytes(secret.view[:CHECK_VALUE_BYTES]).hex()

    def verify(self) -> None:
        """Refuse a token whose keys are not the ones this store was made with."""
        for key in self.superblock.keys:
            if key.version != self.superblock.current_key_version and not self.hsm.has_key(key.label):
                continue  # a retired version; only the current one must be present
            if not self.hsm.has_key(key.label):
                raise KeyNotFound(f"master key {key.label!r} (version {key.version}) is not in the token")
            if not compare_digest(self.check_value(key.version), key.check):
                raise WrongKey(
                    f"master key {key.label!r} in token {self.hsm.token_label!r} is not the key this store "
                    "was created with (key check value mismatch)"
                )
        if not compare_digest(self.superblock_mac(self.superblock), self.superblock.mac):
            raise CorruptStore(f"superblock of store {self.superblock.uuid} fails its MAC: damaged or edited")

    def metadata_mac(self, key_version: int | None = None) -> hmac.HMAC:
        """A keyed HMAC-SHA256 context for metadata rows, of `key_version`
        (default: the current one); `.copy()` it per use."""
        version = self.superblock.current_key_version if key_version is None else key_version
        if version not in self._metadata_macs:
            with self._derive(version, kdf.metadata_mac_info(self.superblock.uuid, version)) as secret:
                self._metadata_macs[version] = secret.build(lambda key: hmac.HMAC(key, hashes.SHA256()))
        return self._metadata_macs[version]

    def superblock_mac(self, superblock: Superblock) -> str:
        """The MAC of `superblock`, under the metadata MAC key of its own current version."""
        h = self.metadata_mac(superblock.current_key_version).copy()
        h.update(_SUPERBLOCK_MAC_LABEL + superblock.mac_input())
        return h.finalize().hex()

    def name_cipher(self, key_version: int | None = None) -> NameCipher:
        """The AES-SIV cipher of names, targets and xattrs, of `key_version` (default: current)."""
        version = self.superblock.current_key_version if key_version is None else key_version
        key = Secret(64)
        try:
            for half in (1, 2):
                with self._derive(version, kdf.name_key_info(self.superblock.uuid, version, half)) as part:
                    key.view[(half - 1) * 32 : half * 32] = part.view
            return NameCipher(key)
        finally:
            key.wipe()

    def file_cipher(self, inode_id: int, key_version: int, key_epoch: int) -> BlockCipher:
        """The data cipher of one file: from its prefetched key if there is one.

        Keys prefetched before it are for files that were skipped, and are
        wiped; those after it stay, for the files that come next.
        """
        started = time.perf_counter_ns()
        try:
            return self._file_cipher(inode_id, key_version, key_epoch)
        finally:
            self.key_wait_ns += time.perf_counter_ns() - started

    def _file_cipher(self, inode_id: int, key_version: int, key_epoch: int) -> BlockCipher:
        wanted = (inode_id, key_version, key_epoch)
        if any(prefetched.wanted == wanted for prefetched in self._prefetched):
            while (prefetched := self._prefetched.popleft()).wanted != wanted:
                self.hsm.forget(prefetched.ticket)
            dek = Secret(DERIVED_KEY_BYTES)
            try:
                self.hsm.collect(prefetched.ticket, dek)
            except Exception as e:
                dek.wipe()
                log.warning("prefetched key for inode %d failed (%s); deriving it again", inode_id, e)
            else:
                self.prefetch_hits += 1
                with dek:
                    return BlockCipher(dek, self.superblock.uuid, inode_id, key_version, key_epoch)
        info = kdf.file_dek_info(self.superblock.uuid, key_version, inode_id, key_epoch)
        with self._derive(key_version, info) as dek:
            cipher = BlockCipher(dek, self.superblock.uuid, inode_id, key_version, key_epoch)
        self.hsm.arm(self.superblock.key(key_version).label)
        return cipher

    def prefetched_key_ready(self, inode_id: int, key_version: int, key_epoch: int) -> bool | None:
        """Whether the file's prefetched key is derived, so that `file_cipher`
        would not wait for the HSM (True), or is still being derived (False);
        None where it is not prefetched."""
        wanted = (inode_id, key_version, key_epoch)
        for prefetched in self._prefetched:
            if prefetched.wanted == wanted:
                return self.hsm.done(prefetched.ticket)
        return None

    def prefetch_file_cipher(self, inode_id: int, key_version: int, key_epoch: int) -> None:
        """Start deriving the key of a file about to be opened or created, in the HSM's key thread.

        The HSM round trips (most of a create's cost, and of a first open's)
        then overlap with the requests that come before the open or create;
        `file_cipher` collects the result. The thread derives the keys in
        the order asked for, and once a key is out it arms the derivation
        after it. At most PREFETCH_DEPTH prefetched keys exist: the oldest
        is dropped (and wiped) to make room.
        """
        while len(self._prefetched) >= PREFETCH_DEPTH:
            self.hsm.forget(self._prefetched.popleft().ticket)
        label = self.superblock.key(key_version).label
        info = kdf.file_dek_info(self.superblock.uuid, key_version, inode_id, key_epoch)
        ticket = self.hsm.derive_ahead(label, info)
        if ticket is None:
            return  # file_cipher derives it when it is needed
        self.derivations += 1
        self._prefetched.append(_Prefetched((inode_id, key_version, key_epoch), ticket, time.monotonic()))

    def drop_prefetched(self, *, older_than: float = 0.0) -> None:
        """Drop (and wipe) the prefetched keys, those older than `older_than` seconds."""
        now = time.monotonic()
        while self._prefetched and now - self._prefetched[0].at >= older_than:
            self.hsm.forget(self._prefetched.popleft().ticket)

    def close(self) -> None:
        self.drop_prefetched()
        self._metadata_macs.clear()


class _Prefetched(NamedTuple):
    """A file key being derived ahead: for which (inode, key version, key
    epoch), the HSM's ticket for it, asked for `at`."""

    wanted: tuple[int, int, int]
    ticket: int
    at: float
