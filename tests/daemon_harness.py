"""Run the envfs daemon in this process and pause after the session ends (tests only).

    python tests/daemon_harness.py STORE MOUNTPOINT LOGFILE

The environment carries the token (XDG_DATA_HOME) and ENVFS_PIN, as for
`envfs mount`. This does what `envfs mount --foreground` does, with the same
`envfs.mount.serve` (hardening, HSM server, key ring, metadata, pyfuse3),
but reports on stdout instead of exiting:

    ready PID     the filesystem is mounted and serving
    ended PID     the session is over (unmounted with `fusermount3 -u`):
                  `serve` has returned, everything it built is torn down
                  and freed, and the process waits for a line on stdin
                  (or EOF) before it exits like the daemon (os._exit)

The real daemon exits right after `serve` returns; the pause lets a test
scan its memory at that moment, the last one at which it still exists.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    store_path, mountpoint, log_file = sys.argv[1:4]
    from envfs.cli import read_pin
    from envfs.errors import EnvfsError
    from envfs.mount import MountOptions, _setup_logging, check_mountpoint, serve
    from envfs.store import Store

    _setup_logging(log_file, False)
    store = Store(store_path)
    superblock = store.read_superblock()
    rekey = os.environ.get("ENVFS_REKEY_AFTER")
    options = MountOptions(foreground=True, log_file=log_file, rekey_after=int(rekey) if rekey else None)
    errors: list[EnvfsError] = []

    def ready(error: EnvfsError | None) -> None:
        if error is not None:
            errors.append(error)
            return
        print(f"ready {os.getpid()}", flush=True)

    serve(store, superblock, check_mountpoint(mountpoint), read_pin(None), options, ready)
    if errors:
        print(f"error {errors[0]}", flush=True)
        os._exit(1)
    print(f"ended {os.getpid()}", flush=True)
    sys.stdin.readline()
    os._exit(0)


if __name__ == "__main__":
    main()
