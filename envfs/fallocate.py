"""fallocate(2), which Python's os module lacks (it has posix_fallocate: mode 0 only)."""

from __future__ import annotations

import ctypes
import errno
import os

# Mode bits (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, start: int, length: int) -> bool:
    """fallocate(2); False where the filesystem does not support `mode`."""
    if _libc.fallocate(fd, mode, start, length) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(error, os.strerror(error))
