"""A store opened outside a mount, for the operator tools (`rotate`, `fsck`).

The store lock keeps daemons and other tools out while a tool works. The
token is reached as a mount reaches it (the embedded token behind its own
`p11-kit server` process). Deriving keys (`Hsm`) and managing them
(`HsmAdmin`, python-pkcs11) each initialise the PKCS#11 module on their own
terms, so they take turns: `admin()` closes the key ring first.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from .anchor import Anchor
from .errors import CorruptStore, StoreReadOnly, StoreRolledBack
from .hsm import HsmAdmin
from .keys import KeyRing
from .metadata import Metadata
from .mount import TokenAccess, hsm_for, token_for
from .store import Store, Superblock


class OfflineStore:
    """One store, locked for `operation` ("rotate", "retire", "fsck"), with its token at hand."""

    def __init__(self, path: str, pin: str, operation: str) -> None:
        self.store = Store(path)
        # Read once before the lock (a non-store is refused before a lock file is
        # made in it) and again under it (a tool that held it may have changed it).
        self.superblock: Superblock = self.store.read_superblock()
        self._pin = pin
        self._operation = operation
        self._stack = ExitStack()
        self._keys_stack: ExitStack | None = None
        self._keys: KeyRing | None = None
        self._metadata: Metadata | None = None
        self._anchor: Anchor | None = None
        self._access: TokenAccess | None = None
        # fsck: why meta.db is not what the store's HSM anchor describes (then
        # fsck reports it, and leaves the anchor as it is).
        self.anchor_problem: str | None = None
        # reanchor: take the store as it is for the anchor's new state.
        self.accept_store = False
        # fsck reads a store on a read-only filesystem (a snapshot, a backup)
        # without the lock: nothing can change it there.
        self.read_only = False

    def __enter__(self) -> OfflineStore:
        os.umask(0o077)  # what the tool writes (data files, SQLite's -wal and -shm) is the owner's alone
        try:
            try:
                self._stack.callback(self.store.lock(None, self._operation).release)
            except StoreReadOnly:
                if self._operation != "fsck":
                    raise
                self.read_only = True
            self.superblock = self.store.read_superblock()
            self._access = token_for(self.superblock, self._stack)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_keys()
        self._stack.close()

    def keys(self) -> KeyRing:
        """A key ring on a logged-in session, its keys checked against the
        superblock, and the store against its HSM anchor."""
        if self._keys is None:
            assert self._access is not None, "use OfflineStore in a with statement"
            stack = ExitStack()
            try:
                keys = KeyRing(hsm_for(self._access, stack, self._pin), self.superblock)
                stack.callback(keys.close)
                keys.verify()
                # Before the tool changes anything, in the token or the store.
                self._begin_anchor(keys)
            except BaseException:
                stack.close()
                raise
            self._keys, self._keys_stack = keys, stack
        return self._keys

    def metadata(self) -> Metadata:
        """The metadata database, keyed with the version its rows are under: the
        current one, or during a rotation that switched them, the new one."""
        if self._metadata is None:
            keys = self.keys()
            path, read_only = self.store.metadata_path, False
            if self.read_only or self.anchor_problem is not None:
                # Nothing of a store on read-only media, or of one its anchor
                # refuses (the evidence), may change.
                path, read_only = self.store.metadata_to_read(self._stack)
            metadata = Metadata(path, keys.metadata_mac(), read_only=read_only)
            try:
                rows_version = metadata.rows_key_version()
            except sqlite3.DatabaseError as e:
                metadata.close()
                raise CorruptStore(f"{path}: metadata database unreadable: {e}") from e
            if rows_version != self.superblock.rotating_to:
                self.superblock.check_metadata_key_version(rows_version)  # else the tool finishes that rotation
            if rows_version != self.superblock.current_key_version:
                metadata.close()
                metadata = Metadata(path, keys.metadata_mac(rows_version), read_only=read_only)
            try:
                metadata.upgrade()
            except BaseException:
                metadata.close()
                raise
            self._metadata = metadata
        return self._metadata

    def _begin_anchor(self, keys: KeyRing) -> None:
        """Check the store against its HSM anchor before meta.db is opened (and
        before a rotation generates a key), and mark the anchor in use
        (FORMAT.md section 12). fsck reports a store that fails the check
        instead of refusing it; a store on read-only media is only checked."""
        anchor = Anchor(keys, self.store)
        if self.read_only:
            self.anchor_problem = anchor.problem(anchor.read())
            return
        try:
            anchor.begin(accept=self.accept_store)
        except StoreRolledBack as e:
            if self._operation != "fsck":
                raise
            self.anchor_problem = str(e)
            return
        self._anchor = anchor

    def close_keys(self) -> None:
        """Close the metadata (recording its new state in the HSM anchor) and
        the key ring (their keys are wiped)."""
        try:
            if self._metadata is not None:
                metadata, self._metadata = self._metadata, None
                metadata.close()
        finally:
            if self._anchor is not None:
                anchor, self._anchor = self._anchor, None
                anchor.end()  # leaves the anchor in use if meta.db was not closed whole
            if self._keys_stack is not None:
                stack, self._keys_stack, self._keys = self._keys_stack, None, None
                stack.close()

    @contextmanager
    def admin(self) -> Iterator[HsmAdmin]:
        """A key management session on the store's token (the key ring closed first)."""
        assert self._access is not None, "use OfflineStore in a with statement"
        self.close_keys()
        admin = HsmAdmin(self._access.module, self._access.token, self._pin)
        try:
            yield admin
        finally:
            admin.close()
