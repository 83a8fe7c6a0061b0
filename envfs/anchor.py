"""The store's anchor in the HSM: an older copy of the store is refused.

Every row of meta.db is authenticated, but so is every row of an older copy
of it: a store put back from a backup or snapshot, or meta.db alone, reads as
if nothing had happened since. The anchor is a data object in the token,
beside the master keys and out of the reach of anyone who has only the
store, that says what meta.db was when its last writer closed it: the
SHA-256 of the file. Every writer of meta.db (a mount, `rotate`, `retire`,
`fsck`, `reanchor`) works between `begin` and `end`:

- `begin`, before meta.db is opened: a store whose meta.db is not the file
  the anchor describes is refused (`StoreRolledBack`); then the anchor is
  marked "in use", so that it never describes a file that is changing.
- `end`, once meta.db is closed with nothing left in its -wal file: the
  anchor gets the new digest and the next generation.

A mount also settles its anchor while it is quiet: with meta.db merged and
kept still (`Metadata.freeze`), `settle` records it as clean, and `resume`
marks the anchor in use again before the next change. A writer that died
(SIGKILL, a power cut) while the anchor was in use leaves it so: the next
`begin` cannot tell the store it left from an older copy, accepts it and
logs that. Byte layout and rules: docs/FORMAT.md, section 12.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptStore, HsmError, StoreRolledBack
from .keys import KeyRing
from .store import Store

log = logging.getLogger(__name__)

ANCHOR_VERSION = 1
CLEAN = 0  # meta.db is the file `digest` describes
IN_USE = 1  # a writer has the store (or died with it): `digest` is the last clean one
# version (u8) || state (u8) || generation (u64 BE) || SHA-256 of meta.db (32 bytes)
_LAYOUT = struct.Struct(">BBQ32s")
_NO_DIGEST = bytes(32)
_UNCHECKED = (
    "the store's last writer did not close it (a crash?): its metadata cannot be checked against the HSM anchor"
)


def anchor_label(store_uuid: object) -> str:
    """The label of a store's anchor object in its token."""
    return f"envfs-{store_uuid}-anchor"


@dataclass(frozen=True)
class AnchorValue:
    """What the anchor object holds."""

    state: int
    generation: int  # +1 at every clean state (a close, a settled mount); for messages
    digest: bytes

    def order(self) -> int:
        """Later states are larger: clean g < in use g < clean g + 1."""
        return 2 * self.generation + (self.state == IN_USE)

    def pack(self) -> bytes:
        return _LAYOUT.pack(ANCHOR_VERSION, self.state, self.generation, self.digest)

    @classmethod
    def unpack(cls, raw: bytes, label: str) -> AnchorValue:
        if len(raw) != _LAYOUT.size:
            raise CorruptStore(f"HSM anchor {label!r}: {len(raw)} bytes, expected {_LAYOUT.size}")
        version, state, generation, digest = _LAYOUT.unpack(raw)
        if version != ANCHOR_VERSION or state not in (CLEAN, IN_USE):
            raise CorruptStore(f"HSM anchor {label!r}: unknown version {version} or state {state}")
        return cls(state, generation, digest)


def metadata_digest(path: Path) -> bytes:
    """SHA-256 of meta.db's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise CorruptStore(f"{path}: metadata database missing") from None
    return digest.digest()


class Anchor:
    """The anchor of one store, read and written through its key ring's token."""

    def __init__(self, keys: KeyRing, store: Store) -> None:
        self._keys = keys
        self._store = store
        self.label = anchor_label(keys.superblock.uuid)
        self._written: AnchorValue | None = None  # what this writer last wrote, from `begin` to `end`

    def read(self) -> AnchorValue | None:
        """The anchor as the token holds it; None for a store that has none yet.
        Of two objects (a writer died while replacing one) the later counts."""
        values = [AnchorValue.unpack(raw, self.label) for raw in self._keys.hsm.read_data(self.label)]
        return max(values, key=AnchorValue.order, default=None)

    def _write(self, value: AnchorValue) -> None:
        self._keys.hsm.replace_data(self.label, value.pack())

    def problem(self, value: AnchorValue | None, remedy: str | None = None) -> str | None:
        """Why meta.db is not the file a clean anchor describes, with what to do
        about it (by default: `envfs reanchor`); None if it is, or if the anchor
        cannot tell (none yet, or in use)."""
        if value is None or value.state != CLEAN:
            return None
        if metadata_digest(self._store.metadata_path) == value.digest:
            return None
        return (
            f"{self._store.metadata_path} is not the file envfs left at the last clean close "
            f"(HSM anchor {self.label!r}, generation {value.generation}): the store was put back "
            f"to an older copy or replaced; "
            + (remedy or f"if that was done on purpose, run 'envfs reanchor {self._store.path}'")
        )

    def check(self, *, remedy: str) -> None:
        """For a reader that changes nothing (a read-only mount): refuse a store
        that is not what a clean anchor describes, naming `remedy`; the anchor
        stays as it is."""
        value = self.read()
        if value is not None and value.state == IN_USE:
            log.warning(_UNCHECKED)
        if (problem := self.problem(value, remedy)) is not None:
            raise StoreRolledBack(problem)

    def begin(self, *, accept: bool = False) -> None:
        """Before meta.db is opened for writing: refuse a store that is not what
        the anchor says (unless `accept`: an operator's restore), then mark the
        anchor in use."""
        value = self.read()
        if value is None:
            log.info("the store has no HSM anchor yet; it gets one (%s)", self.label)
        elif value.state == IN_USE:
            log.warning(_UNCHECKED)
        elif not accept and (problem := self.problem(value)) is not None:
            raise StoreRolledBack(problem)
        elif not accept:
            # Everything was checkpointed before the anchor was written: a -wal
            # file now is a resurrected, already merged one, or someone else's.
            self._remove_sidecars()
        begun = AnchorValue(IN_USE, value.generation if value else 0, value.digest if value else _NO_DIGEST)
        try:
            self._write(begun)
        except HsmError as e:
            if value is not None:
                raise  # the anchor would describe a file about to change
            log.warning("the token cannot hold the store's HSM anchor (%s): a store put back to an older copy "
                        "is not detected", e)  # fmt: skip
            return
        self._written = begun

    @property
    def settled(self) -> bool:
        """Whether the anchor describes meta.db as it is while the store is open."""
        return self._written is not None and self._written.state == CLEAN

    def settle(self) -> None:
        """While the store stays open, with meta.db merged and kept still until
        the next change (`Metadata.freeze`, whose `on_change` is `resume`):
        record it as clean, so that a crash from now on leaves a store the
        next writer checks."""
        written = self._written
        if written is None or written.state == CLEAN:
            return
        settled = AnchorValue(CLEAN, written.generation + 1, metadata_digest(self._store.metadata_path))
        self._write(settled)
        self._written = settled

    def resume(self) -> None:
        """Before the first change after `settle`: the anchor is in use again.

        If the token cannot be written now, the change goes ahead all the
        same (refusing it would lose what the user was told is written), and
        the log says so: a crash, or an unmount while the token is still out
        of reach, before the next clean state then makes the next writer
        refuse the store until `envfs reanchor`.
        """
        written = self._written
        if written is None or written.state == IN_USE:
            return
        resumed = AnchorValue(IN_USE, written.generation, written.digest)
        try:
            self._write(resumed)
        except HsmError as e:
            log.error("HSM anchor not marked in use (%s): after a crash before the next clean close, the "
                      "store must be taken back with 'envfs reanchor'", e)  # fmt: skip
        self._written = resumed

    def end(self) -> None:
        """Once meta.db is closed: record its digest as the new clean state.

        Left "in use" when meta.db was not closed whole (a -wal file with
        frames in it) or the token cannot be written: the next `begin` then
        accepts the store as after a crash.
        """
        written, self._written = self._written, None
        if written is None:
            return
        try:
            if self._store.metadata_wal_in_use():
                log.warning("meta.db was not closed cleanly (its -wal file remains); the HSM anchor stays 'in use'")
                if written.state == CLEAN:
                    self._write(AnchorValue(IN_USE, written.generation, written.digest))
                return
            digest = metadata_digest(self._store.metadata_path)
            if written.state == CLEAN and written.digest == digest:
                return  # settled, and nothing changed since
            self._write(AnchorValue(CLEAN, written.generation + 1, digest))
        except (HsmError, CorruptStore, OSError) as e:
            log.warning("HSM anchor not updated (%s); it stays 'in use'", e)

    def create(self) -> None:
        """For a new store: its first clean anchor."""
        self._written = AnchorValue(IN_USE, 0, _NO_DIGEST)
        self.end()

    def _remove_sidecars(self) -> None:
        if self._store.metadata_wal_in_use():
            log.warning("removed meta.db-wal beside a meta.db its anchor describes: nothing in it was the store's")
        for sidecar in (self._store.metadata_wal_path, self._store.metadata_shm_path):
            try:
                os.unlink(sidecar)
            except FileNotFoundError:
                pass
