"""Test helpers: run the real `envfs` command against a private token; drive
`Operations` in this process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import trio

from envfs import embedded
from envfs.fs import Operations
from envfs.metadata import ROOT_INODE
from envfs.offline import OfflineStore

ENVFS = [sys.executable, "-m", "envfs"]
PIN = "test-pin-1234"


def envfs_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " - fuse.envfs " in line]


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def flip(path: Path, offset: int) -> None:
    """Flip the lowest bit of one byte of a file in the store (an attacker's edit)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


_TOKEN_SCRIPT = """
import json, sys
import pkcs11
from pkcs11 import Attribute, ObjectClass
module, label, action, value = sys.argv[1:5]
token = pkcs11.lib(module).get_token(token_label="envfs")
with token.open(rw=True, user_pin=sys.stdin.read()) as session:
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label}))
    print(json.dumps([obj[Attribute.VALUE].hex() for obj in found]))
    if action == "destroy":
        for obj in found:
            obj.destroy()
    elif action == "add":
        session.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                               Attribute.PRIVATE: True, Attribute.LABEL: label,
                               Attribute.VALUE: bytes.fromhex(value)})
"""


def anchor_objects(env: Envfs, action: str = "read", value: str = "") -> list[bytes]:
    """The values of the store's anchor objects (FORMAT.md 12) in its embedded
    token, before `action`: "read", "destroy" (them all) or "add" (one holding
    `value`, hex). python-pkcs11 on SoftHSM2 directly, in a child process: a
    PKCS#11 module is not fork-safe, and this process must not keep it loaded."""
    uuid = json.loads((env.store / "envfs.json").read_text())["uuid"]
    module = next(p for p in embedded.SOFTHSM_MODULE_CANDIDATES if os.path.exists(p))
    child_env = dict(env.env, SOFTHSM2_CONF=str(env.data_home / "envfs" / "softhsm" / "softhsm2.conf"))
    result = subprocess.run(
        [sys.executable, "-c", _TOKEN_SCRIPT, module, f"envfs-{uuid}-anchor", action, value],
        input=PIN, env=child_env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [bytes.fromhex(v) for v in json.loads(result.stdout)]


class Envfs:
    """One test's envfs world: XDG_DATA_HOME (token), PIN, store and mountpoint."""

    created: ClassVar[list[Path]] = []  # every root of this test session, for the final sweep

    def __init__(self, root: Path) -> None:
        self.root = root
        Envfs.created.append(root)
        self.data_home = root / "xdg"
        self.store = root / "store"
        self.mnt = root / "mnt"
        self.mnt.mkdir()
        self.log = root / "daemon.log"
        self.env = dict(os.environ, XDG_DATA_HOME=str(self.data_home), ENVFS_PIN=PIN)
        self.env.pop("P11_KIT_SERVER_ADDRESS", None)
        self.env.pop("ENVFS_REKEY_AFTER", None)

    def run(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:  # fmt: skip
        result = subprocess.run(
            [*ENVFS, *args], env=env or self.env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"envfs {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def init(self, *extra: str) -> None:
        self.run("init", str(self.store), *extra)

    def mount(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.run("mount", str(self.store), str(self.mnt), "--log", str(self.log), *extra, env=env)
        assert str(self.mnt) in envfs_mounts()

    def unmount(self) -> None:
        self.run("unmount", str(self.mnt))
        assert str(self.mnt) not in envfs_mounts()

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def forget_anchor(self) -> None:
        """Destroy the store's anchor in the token, as if the store had been made
        before anchors: for a test of what the metadata's own MACs catch when
        the anchor cannot help (after a crash, or on a token without one), or
        of a copy of a store that shares its token with the original."""
        anchor_objects(self, "destroy")

    def kill_daemon(self) -> None:
        """SIGKILL the daemon (a crash) and wait until it is gone; its dead mount
        stays until the next mount clears it."""
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def counters(self) -> dict[str, int]:
        """The daemon's counters (FORMAT.md 1, `lock`), fresh: SIGUSR1, then the lock record."""
        os.kill(self.daemon_pid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            record = json.loads((self.store / "lock").read_text() or "{}")
            if "counters" in record:
                return dict(record["counters"])
            time.sleep(0.05)
        raise AssertionError("the daemon published no counters")

    def daemon_pid(self) -> int:
        holder = json.loads((self.store / "lock").read_text() or "{}")
        return int(holder["pid"])

    def status(self) -> dict[str, object]:
        return json.loads(self.run("status", str(self.store), "--json").stdout)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def cleanup(self) -> None:
        """Unmount and stop everything this test started, whatever state it is in."""
        pid = None
        try:
            pid = self.daemon_pid()
        except (OSError, ValueError, KeyError):
            pass
        if str(self.mnt) in envfs_mounts():
            result = self.run("unmount", str(self.mnt), "--timeout", "20", check=False, timeout=40)
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if pid is not None and not process_gone(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while not process_gone(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if str(self.mnt) in envfs_mounts():
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        shutil.rmtree(self.root / "scratch", ignore_errors=True)


def data_file_ids(env: Envfs) -> set[int]:
    """The inode ids of the store's data files (data/HH/<id>.<version>.<epoch>). While
    it is mounted, one may be of no inode yet: the data file envfs makes ahead for the
    next create, under an id above every file's (FORMAT.md section 7)."""
    return {int(path.name.split(".")[0], 16) for path in (env.store / "data").glob("*/*.*.*")}


def without_next_file(ids: set[int], files: set[int]) -> set[int]:
    """`ids` less the one data file that may be made ahead of the next create: an id
    above all of `files` (those of the regular files that exist)."""
    extra = ids - files
    if len(extra) == 1 and min(extra) > max(files, default=0):
        return ids - extra
    return ids


def run_threads(jobs: list[Callable[[], None]]) -> None:
    """Run `jobs` in threads of their own, all at once; raise the first failure here."""
    failures: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # raised again in the caller's thread
            failures.append(e)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


@contextlib.contextmanager
def operations_in_process(env: Envfs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Operations]:
    """`Operations` on `env`'s store in this process, as a mount has them (group commits,
    prefetched keys), without FUSE and without the mount's housekeeping."""
    for name, value in env.env.items():
        monkeypatch.setenv(name, value)
    offline = OfflineStore(str(env.store), PIN, "mount")
    try:
        with offline:
            keys, metadata = offline.keys(), offline.metadata()
            metadata.group_commits()
            operations = Operations(offline.store, metadata, keys, keys.name_cipher(), rekey_after=1 << 20)
            try:
                yield operations
            finally:
                operations.destroy()
    finally:
        offline.store.close_commit_room()  # if a test kept room, as the daemon does: after SQLite closed


# The request context of root's calls to `Operations` driven in this process.
ROOT_CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)


def setattr_fields(**changed: bool) -> Any:
    """pyfuse3's SetattrFields for `Operations.setattr`: the named ones True, the rest False."""
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid", "update_gid", "update_size")
    return SimpleNamespace(**{name: changed.get(name, False) for name in names})


def new_file(ops: Operations, name: bytes, data: bytes = b"") -> tuple[int, int]:
    """Create `name` in the root through `ops`, with `data` written: (inode id, open handle)."""
    info, entry = trio.run(ops.create, ROOT_INODE, name, stat.S_IFREG | 0o644, os.O_RDWR, ROOT_CTX)
    if data:
        assert trio.run(ops.write, info.fh, 0, bytes(bytearray(data))) == len(data)  # a copy: writes wipe theirs
    return entry.st_ino, info.fh
