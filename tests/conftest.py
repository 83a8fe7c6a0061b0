"""Fixtures: every test gets its own SoftHSM2 token, store and mount.

Nothing is left behind, even when a test fails: the mount fixture unmounts,
kills a daemon that does not exit, lazily detaches a dead mount, and the
session checks that no envfs mount or daemon survived.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Envfs, envfs_mounts, process_gone  # noqa: E402

from envfs import embedded  # noqa: E402


@pytest.fixture
def envfs(tmp_path: Path) -> Iterator[Envfs]:
    """A private envfs environment: token directory, PIN, store path, mountpoint."""
    env = Envfs(tmp_path)
    try:
        yield env
    finally:
        env.cleanup()


@pytest.fixture
def store(envfs: Envfs) -> Envfs:
    envfs.init()
    return envfs


@pytest.fixture
def mounted(store: Envfs) -> Path:
    store.mount()
    return store.mnt


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Leave no envfs mount, daemon or token server socket of this session behind."""
    roots = [str(root) for root in Envfs.created]
    if not roots:
        return
    for mountpoint in envfs_mounts():
        if any(mountpoint.startswith(root) for root in roots):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(root in cmdline for root in roots):
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 5
            while not process_gone(int(pid_dir.name)) and time.monotonic() < deadline:
                time.sleep(0.05)
    # Daemons the tests killed on purpose left their token servers' socket directories.
    # Not the youngest: a server another test session is starting does not answer yet.
    embedded.remove_stale_runtimes(min_age=10)
