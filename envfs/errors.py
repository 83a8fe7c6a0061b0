"""Every user-facing error of envfs, each with its stable exit code.

The CLI is the only place that turns these into a message and an exit status;
library code raises them. Exit codes are an ABI for scripts: a retired number
is never reused (the README lists them).
"""

from __future__ import annotations


class EnvfsError(Exception):
    """Base class: a one-line message for the operator and an exit code."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(EnvfsError):
    exit_code = 2


class PinError(EnvfsError):
    """Wrong, locked or unreadable PIN."""

    exit_code = 10


class TokenNotFound(EnvfsError):
    exit_code = 11


class KeyNotFound(EnvfsError):
    exit_code = 12


class WrongKey(EnvfsError):
    """The token's key does not match the store's key check value."""

    exit_code = 13


class HsmError(EnvfsError):
    """The PKCS#11 module failed to load or answered with an error."""

    exit_code = 14


class NotAStore(EnvfsError):
    exit_code = 20


class UnsupportedFormat(EnvfsError):
    """The store was written by a newer envfs."""

    exit_code = 21


class CorruptStore(EnvfsError):
    """Superblock or metadata damaged or tampered with."""

    exit_code = 22


class StoreExists(EnvfsError):
    exit_code = 23


class StoreBusy(EnvfsError):
    """Another daemon holds the store's lock."""

    exit_code = 24


class RotationUnfinished(EnvfsError):
    """A key rotation must be finished (`envfs rotate`) first: a mount right after
    the rotation switched the metadata, or `retire` during a rotation."""

    exit_code = 25


class StoreReadOnly(EnvfsError):
    """The store is on a read-only filesystem: a mount or rotation needs to write it."""

    exit_code = 26


class StoreRolledBack(EnvfsError):
    """meta.db is not the file the store's anchor in the HSM describes: an older
    copy of the store (or of meta.db) was put back, or it was replaced."""

    exit_code = 27


class BadMountpoint(EnvfsError):
    exit_code = 30


class MountFailed(EnvfsError):
    exit_code = 31


class NotMounted(EnvfsError):
    exit_code = 32


class UncleanUnmount(EnvfsError):
    """`unmount`: the mount is gone, but its daemon ended without closing the
    store (killed, crashed); the next mount recovers it."""

    exit_code = 33


class DamageFound(EnvfsError):
    """`envfs fsck` found damaged or inconsistent parts of the store."""

    exit_code = 40


class IntegrityError(Exception):
    """A block, name or metadata row failed authentication.

    Not an EnvfsError: inside the daemon it becomes EIO for one request, never
    an exit.
    """
