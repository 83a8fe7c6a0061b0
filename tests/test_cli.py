"""The `envfs` command line, run for real: refusals, PINs, init, status, unmounting
from outside, a killed daemon, --allow-other and the kernel's permission checks, and the exit codes.

A refused `mount` must say why on exactly one line of stderr, exit with the code
of its error class, and change nothing: the store is byte-identical (and nothing
new in it), the mountpoint is untouched and not mounted, and no daemon or
p11-kit process is left.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ENVFS, PIN, Envfs, envfs_mounts, process_gone

from envfs import errors

# -- helpers -------------------------------------------------------------------------

Snapshot = dict[str, bytes | None] | bytes | None


def snapshot(path: Path) -> Snapshot:
    """Every entry under `path` (file bytes, None for a directory), its bytes if a file, None if absent."""
    if not os.path.lexists(path):
        return None
    if not path.is_dir():
        return path.read_bytes()
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), path) + "/"] = None
        for name in filenames:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, path)] = Path(full).read_bytes()
    return found


def processes_of(root: Path) -> dict[int, str]:
    """Live (not zombie) processes whose command line or environment names `root`."""
    needle = str(root).encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if (needle in cmdline or needle in environ) and not process_gone(int(entry.name)):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid` with its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            ppid = parent_of(int(entry.name))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if child in found or process_gone(child):
            continue
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        todo.extend(children.get(child, []))
    return found


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("envfs: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def run_hsm(env: Envfs, *args: str, run_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an envfs command that starts the token server."""
    return env.run(*args, check=False, env=run_env)


def init(env: Envfs, *extra: str, path: Path | None = None, run_env: dict[str, str] | None = None) -> str:
    result = run_hsm(env, "init", str(path or env.store), *extra, run_env=run_env)
    assert result.returncode == 0, f"envfs init exited {result.returncode}: {result.stderr}"
    return result.stderr


def mount(env: Envfs, *extra: str, store: Path | None = None, mnt: Path | None = None,
          log: Path | None = None, run_env: dict[str, str] | None = None) -> None:  # fmt: skip
    mnt = mnt or env.mnt
    result = run_hsm(env, "mount", str(store or env.store), str(mnt), "--log", str(log or env.log), *extra,
                     run_env=run_env)  # fmt: skip
    assert result.returncode == 0, f"envfs mount exited {result.returncode}: {result.stderr}"
    assert str(mnt) in envfs_mounts()


def remount(env: Envfs) -> None:
    env.unmount()
    mount(env)


def assert_refused(
    env: Envfs,
    expected: type[errors.EnvfsError] | tuple[type[errors.EnvfsError], ...],
    *words: str,
    store: Path | None = None,
    mnt: Path | None = None,
    run_env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    already_mounted: bool = False,
    store_in_use: bool = False,
) -> str:
    """Run `envfs mount` that must be refused; check it changed nothing. Returns the stderr line.

    `already_mounted`: the mountpoint is an envfs mount (so it is not walked); `store_in_use`:
    a live daemon serves the store, and rewrites the counters in its lock record every second.
    The exit code is checked last, so that a wrong error class is reported only after every
    other property has been checked.
    """
    store = store or env.store
    mnt = mnt or env.mnt

    def store_state() -> Snapshot:
        state = snapshot(store)
        if store_in_use and isinstance(state, dict):
            record = json.loads(state.pop("lock") or b"{}")
            state["lock: holder"] = json.dumps([record.get("pid"), record.get("mountpoint")]).encode()
        return state

    store_before = store_state()
    mnt_before = None if already_mounted else snapshot(mnt)
    processes_before = processes_of(env.root)
    result = run_hsm(env, "mount", str(store), str(mnt), "--log", str(env.log), *extra, run_env=run_env)
    assert result.returncode != 0, f"mount was not refused: {result.stderr}"
    line = one_line(result.stderr)
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    assert result.stdout == ""
    assert store_state() == store_before, "a refused mount changed the store"
    if already_mounted:
        assert str(mnt) in envfs_mounts()
    else:
        assert str(mnt) not in envfs_mounts()
        assert not os.path.ismount(mnt)
        assert snapshot(mnt) == mnt_before, "a refused mount changed the mountpoint"
    wait_until(
        lambda: processes_of(env.root).keys() <= processes_before.keys(),
        f"no process left by the refused mount (before: {processes_before})",
    )
    codes = [c.exit_code for c in (expected if isinstance(expected, tuple) else (expected,))]
    assert result.returncode in codes, f"exit code {result.returncode}, expected {codes}: {line}"
    return line


def documented_codes() -> set[int]:
    """Every exit code envfs.errors defines."""
    return {cls.exit_code for _, cls in inspect.getmembers(errors, inspect.isclass) if hasattr(cls, "exit_code")}


def superblock_json(env: Envfs) -> dict:
    return json.loads((env.store / "envfs.json").read_text())


def write_superblock_json(env: Envfs, data: dict) -> None:
    with open(env.store / "envfs.json", "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def key_label(env: Envfs) -> str:
    return superblock_json(env)["keys"][0]["label"]


TOKEN_TOOL = """
import os, sys
from envfs import embedded
from envfs.hsm import HsmAdmin
server = embedded.TokenServer(embedded.EmbeddedToken())
os.environ["P11_KIT_SERVER_ADDRESS"] = server.start()
try:
    admin = HsmAdmin(server.client_module, embedded.TOKEN_LABEL, os.environ["ENVFS_PIN"])
    try:
        if sys.argv[1] == "destroy":
            admin.destroy_key(sys.argv[2])
        else:
            admin.import_master_key(sys.argv[2], bytes.fromhex(sys.argv[3]))
        print(admin.has_key(sys.argv[2]))
    finally:
        admin.close()
finally:
    server.stop()
"""


def token_tool(env: dict[str, str], *args: str) -> str:
    """Manage the embedded token of `env` through HsmAdmin, in a process of its own."""
    result = subprocess.run(
        [sys.executable, "-c", TOKEN_TOOL, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def status_json(env: Envfs, *args: str) -> object:
    return json.loads(env.run("status", *args, "--json").stdout)


def env_without_pin(env: Envfs) -> dict[str, str]:
    clean = dict(env.env)
    clean.pop("ENVFS_PIN")
    return clean


def can_mount_tmpfs(path: Path) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "envfs-test", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def store(envfs: Envfs) -> Envfs:
    """conftest's `store`, with the start-up race retried."""
    init(envfs)
    return envfs


@pytest.fixture
def mounted(store: Envfs) -> Path:
    mount(store)
    return store.mnt


@pytest.fixture
def used_store(store: Envfs) -> Envfs:
    """A store that has been mounted once (so its lock file exists) and holds one file."""
    mount(store)
    (store.mnt / "hello").write_text("hello\n")
    store.unmount()
    return store


# -- refusals of `envfs mount` -------------------------------------------------------------


def test_mount_refuses_wrong_pin(used_store: Envfs) -> None:
    wrong = dict(used_store.env, ENVFS_PIN="not-the-pin")
    assert_refused(used_store, errors.PinError, "PIN", run_env=wrong)
    mount(used_store)
    assert (used_store.mnt / "hello").read_text() == "hello\n"


def test_refused_mount_of_a_new_store_creates_nothing(store: Envfs) -> None:
    wrong = dict(store.env, ENVFS_PIN="not-the-pin")
    before = snapshot(store.store)
    run_hsm(store, "mount", str(store.store), str(store.mnt), "--log", str(store.log), run_env=wrong)
    assert snapshot(store.store) == before


def test_mount_refuses_missing_token(used_store: Envfs) -> None:
    nowhere = used_store.root / "no-token-here"
    elsewhere = dict(used_store.env, XDG_DATA_HOME=str(nowhere))
    # The exact class is pinned by test_missing_token_exits_with_token_not_found.
    assert_refused(used_store, (errors.TokenNotFound, errors.HsmError), "token", run_env=elsewhere)
    assert not nowhere.exists()


def test_missing_token_exits_with_token_not_found(store: Envfs) -> None:
    elsewhere = dict(store.env, XDG_DATA_HOME=str(store.root / "no-token-here"))
    result = store.run("mount", str(store.store), str(store.mnt), "--log", str(store.log), check=False, env=elsewhere)
    assert result.returncode == errors.TokenNotFound.exit_code, result.stderr


def test_mount_refuses_key_missing_from_token(used_store: Envfs) -> None:
    label = key_label(used_store)
    assert token_tool(used_store.env, "destroy", label) == "False"
    line = assert_refused(used_store, errors.KeyNotFound, label)
    assert "not in the token" in line


def test_mount_refuses_other_key_with_the_same_label(used_store: Envfs) -> None:
    """A second token holds a different key under the store's key label."""
    (used_store.root / "b").mkdir()
    other = Envfs(used_store.root / "b")
    try:
        init(other)  # creates the second token
        token_tool(other.env, "import", key_label(used_store), os.urandom(32).hex())
        line = assert_refused(used_store, errors.WrongKey, "check value", run_env=other.env)
        assert key_label(used_store) in line
    finally:
        other.cleanup()
    mount(used_store)
    assert (used_store.mnt / "hello").read_text() == "hello\n"


def test_mount_refuses_edited_superblock(used_store: Envfs) -> None:
    """An edited key check value, or any other edited field, is caught by the key check or the MAC."""
    path = used_store.store / "envfs.json"
    original = path.read_bytes()

    data = json.loads(original)
    check = data["keys"][0]["check"]
    data["keys"][0]["check"] = ("0" if check[0] != "0" else "1") + check[1:]
    write_superblock_json(used_store, data)
    line = assert_refused(used_store, (errors.WrongKey, errors.CorruptStore))
    if "check value" not in line:
        assert "MAC" in line and "edited" in line, line

    data = json.loads(original)
    data["rekey_after_block_writes"] = 1000
    write_superblock_json(used_store, data)
    assert_refused(used_store, errors.CorruptStore, "MAC", "edited")

    path.write_bytes(original)
    mount(used_store)
    assert (used_store.mnt / "hello").read_text() == "hello\n"


def test_mount_refuses_store_already_mounted(mounted: Path, envfs: Envfs) -> None:
    with open(mounted / "f", "w") as f:
        f.write("still here")
        f.flush()
        os.fsync(f.fileno())  # committed now, not by the daemon's timer during the snapshots below
    pid = envfs.daemon_pid()
    mnt2 = envfs.root / "mnt2"
    mnt2.mkdir()
    assert_refused(envfs, errors.StoreBusy, str(envfs.mnt), mnt=mnt2, store_in_use=True)
    assert_refused(envfs, (errors.StoreBusy, errors.BadMountpoint), "already", already_mounted=True, store_in_use=True)
    assert envfs.daemon_pid() == pid and not process_gone(pid)
    assert status_json(envfs, str(envfs.store))["mountpoint"] == str(mounted)  # type: ignore[index]
    assert (mounted / "f").read_text() == "still here"


@pytest.mark.parametrize("damage", ["garbage", "empty", "missing"])
def test_mount_names_a_damaged_token_configuration(store: Envfs, damage: str) -> None:
    config = store.data_home / "envfs" / "softhsm" / "softhsm2.conf"
    if damage == "missing":
        config.unlink()
    else:
        config.write_bytes(os.urandom(200) if damage == "garbage" else b"")
    line = assert_refused(store, errors.HsmError, "softhsm2.conf")
    assert "CKR" not in line


def test_mount_refuses_a_store_without_its_metadata_and_creates_none(store: Envfs) -> None:
    (store.store / "meta.db").unlink()
    assert_refused(store, errors.CorruptStore, "metadata database missing")
    assert not (store.store / "meta.db").exists()


@pytest.mark.parametrize("kind", ["empty", "random", "missing", "file", "other-json"])
def test_mount_refuses_non_store(envfs: Envfs, kind: str) -> None:
    path = envfs.root / "not-a-store"
    if kind == "empty":
        path.mkdir()
    elif kind == "random":
        (path / "sub").mkdir(parents=True)
        (path / "a.txt").write_bytes(os.urandom(100))
        (path / "sub" / "b").write_text("b")
    elif kind == "file":
        path.write_text("not a directory\n")
    elif kind == "other-json":
        path.mkdir()
        (path / "envfs.json").write_text('{"format": "something-else", "format_version": 1}\n')
    assert_refused(envfs, errors.NotAStore, "store", store=path)
    assert os.path.lexists(path) == (kind != "missing")


def _set_field(field: str, value: object) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        data = json.loads(raw)
        if value is None:
            del data[field]
        else:
            data[field] = value
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"

    return edit


SUPERBLOCK_DAMAGE: list[tuple[str, Callable[[bytes], bytes], type[errors.EnvfsError], tuple[str, ...]]] = [
    ("newer format", _set_field("format_version", 99), errors.UnsupportedFormat, ("99", "newer")),
    ("truncated", lambda raw: raw[: len(raw) // 2], errors.CorruptStore, ("damaged",)),
    ("empty", lambda raw: b"", errors.CorruptStore, ("damaged",)),
    ("binary", lambda raw: os.urandom(300), errors.CorruptStore, ("damaged",)),
    ("no uuid", _set_field("uuid", None), errors.CorruptStore, ("damaged",)),
    ("keys not a list", _set_field("keys", 7), errors.CorruptStore, ("damaged",)),
]


def test_mount_refuses_newer_or_damaged_superblock(store: Envfs) -> None:
    """Refused before the daemon starts, so not even the lock file of a new store appears."""
    path = store.store / "envfs.json"
    original = path.read_bytes()
    for name, damage, expected, words in SUPERBLOCK_DAMAGE:
        path.write_bytes(damage(original))
        try:
            assert_refused(store, expected, *words)
        except AssertionError as e:
            raise AssertionError(f"superblock {name}: {e}") from e
    path.write_bytes(original)
    mount(store)


def test_mount_refuses_bad_mountpoint(store: Envfs) -> None:
    root = store.root
    (root / "a-file").write_text("x")
    (root / "non-empty").mkdir()
    (root / "non-empty" / "something").write_text("x")
    (root / "link-to-file").symlink_to(root / "a-file")
    cases = [
        ("missing", root / "missing", ("mountpoint", "does not exist")),
        ("file", root / "a-file", ("mountpoint", "not a directory")),
        ("non-empty", root / "non-empty", ("mountpoint", "not empty")),
        ("symlink to a file", root / "link-to-file", ("mountpoint", "not a directory")),
    ]
    for name, mnt, words in cases:
        try:
            assert_refused(store, errors.BadMountpoint, *words, mnt=mnt)
        except AssertionError as e:
            raise AssertionError(f"mountpoint {name}: {e}") from e
    tmpfs = root / "tmpfs"
    tmpfs.mkdir()
    if not can_mount_tmpfs(tmpfs):
        return
    try:
        before = snapshot(store.store)
        result = store.run("mount", str(store.store), str(tmpfs), "--log", str(store.log), check=False)
        assert "already a mountpoint" in one_line(result.stderr)
        assert result.returncode == errors.BadMountpoint.exit_code
        assert snapshot(store.store) == before
        assert str(tmpfs) not in envfs_mounts() and os.path.ismount(tmpfs)
        assert not processes_of(store.root)
    finally:
        subprocess.run(["umount", str(tmpfs)], capture_output=True)


def test_mount_refuses_without_pin(store: Envfs) -> None:
    """Refused before the daemon starts, so not even the lock file of a new store appears."""
    (store.root / "empty-pin").write_text("\n")
    cases = [
        ("no PIN at all", (), ("no PIN", "ENVFS_PIN", "--pin-file")),
        ("missing PIN file", ("--pin-file", str(store.root / "no-such-pin")), ("no-such-pin",)),
        ("empty PIN file", ("--pin-file", str(store.root / "empty-pin")), ("empty",)),
    ]
    for name, extra, words in cases:
        try:
            assert_refused(store, errors.PinError, *words, run_env=env_without_pin(store), extra=extra)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


# -- PIN sources -------------------------------------------------------------------------


def test_pin_file_and_environment(envfs: Envfs) -> None:
    pin_file = envfs.root / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    no_pin = env_without_pin(envfs)
    init(envfs, "--pin-file", str(pin_file), run_env=no_pin)
    mount(envfs, "--pin-file", str(pin_file), run_env=no_pin)
    (envfs.mnt / "f").write_text("via pin file")
    envfs.unmount()
    mount(envfs)  # ENVFS_PIN
    assert (envfs.mnt / "f").read_text() == "via pin file"
    envfs.unmount()
    # An explicit --pin-file is used even when ENVFS_PIN is set (to something wrong).
    mount(envfs, "--pin-file", str(pin_file), run_env=dict(envfs.env, ENVFS_PIN="wrong"))
    assert (envfs.mnt / "f").read_text() == "via pin file"


# -- init -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["non-empty", "file", "store"])
def test_init_refuses_non_empty(envfs: Envfs, kind: str) -> None:
    if kind == "non-empty":
        envfs.store.mkdir()
        (envfs.store / "precious").write_text("keep me")
    elif kind == "file":
        envfs.store.write_text("keep me")
    else:
        init(envfs)
    before = snapshot(envfs.store)
    token_before = snapshot(envfs.data_home)
    result = envfs.run("init", str(envfs.store), check=False)
    line = one_line(result.stderr)
    assert str(envfs.store) in line
    assert result.returncode == errors.StoreExists.exit_code
    assert snapshot(envfs.store) == before
    assert snapshot(envfs.data_home) == token_before  # no token created, no key added


def test_init_existing_empty_directory(envfs: Envfs) -> None:
    envfs.store.mkdir(mode=0o700)
    stderr = init(envfs)
    assert "created the embedded SoftHSM2 token" in stderr
    assert {p.name for p in envfs.store.iterdir()} >= {"envfs.json", "meta.db"}
    mount(envfs)
    (envfs.mnt / "f").write_text("ok")
    remount(envfs)
    assert (envfs.mnt / "f").read_text() == "ok"


def test_two_stores_in_one_token_mounted_at_once(envfs: Envfs) -> None:
    init(envfs)
    store2, mnt2 = envfs.root / "store2", envfs.root / "mnt2"
    mnt2.mkdir()
    assert "created the embedded SoftHSM2 token" not in init(envfs, path=store2)
    mount(envfs)
    try:
        mount(envfs, store=store2, mnt=mnt2, log=envfs.root / "daemon2.log")
        assert {str(envfs.mnt), str(mnt2)} <= set(envfs_mounts())
        (envfs.mnt / "one").write_text("first store")
        (mnt2 / "two").write_text("second store")
        (envfs.mnt / "same").write_text("1")
        (mnt2 / "same").write_text("2")
        assert sorted(os.listdir(envfs.mnt)) == ["one", "same"]
        assert sorted(os.listdir(mnt2)) == ["same", "two"]
        s1, s2 = status_json(envfs, str(envfs.mnt)), status_json(envfs, str(mnt2))
        assert isinstance(s1, dict) and isinstance(s2, dict)
        assert (s1["store"], s2["store"]) == (str(envfs.store), str(store2))
        assert s1["uuid"] != s2["uuid"] and s1["pid"] != s2["pid"]
        assert s1["key_versions"] != s2["key_versions"] and s1["hsm"] == s2["hsm"]
        envfs.run("unmount", str(mnt2))
        remount(envfs)
        mount(envfs, store=store2, mnt=mnt2, log=envfs.root / "daemon2.log")
        assert (envfs.mnt / "same").read_text() == "1" and (mnt2 / "same").read_text() == "2"
        assert (envfs.mnt / "one").read_text() == "first store" and (mnt2 / "two").read_text() == "second store"
    finally:
        if str(mnt2) in envfs_mounts():
            envfs.run("unmount", str(mnt2), check=False)


# -- unmounting ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["envfs unmount", "umount", "fusermount3 -u"])
def test_unmount_ends_the_daemon_cleanly(store: Envfs, how: str) -> None:
    mount(store)
    data = os.urandom(50_000)
    (store.mnt / "data").write_bytes(data)
    (store.mnt / "dir").mkdir()
    (store.mnt / "dir" / "small").write_text("small")
    pid = store.daemon_pid()
    children = descendants(pid)
    assert any("p11-kit" in cmd or cmd.startswith("server ") for cmd in children.values()), children
    if how == "envfs unmount":
        store.run("unmount", str(store.mnt))
        assert process_gone(pid), "envfs unmount returned before the daemon exited"
        assert status_json(store, str(store.store))["mounted"] is False  # type: ignore[index]
    else:
        result = subprocess.run([*how.split(), str(store.mnt)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: process_gone(pid), f"the daemon {pid} to exit after {how}", timeout=20)
    assert str(store.mnt) not in envfs_mounts()
    wait_until(lambda: all(process_gone(child) for child in children), f"the daemon's children {children} to exit")
    assert not processes_of(store.root)
    assert status_json(store, str(store.store))["mounted"] is False  # type: ignore[index]
    log_before = store.log_text()
    assert "unmounted" in log_before
    mount(store)
    assert (store.mnt / "data").read_bytes() == data
    assert (store.mnt / "dir" / "small").read_text() == "small"
    assert "not unmounted cleanly" not in store.log_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_terminating_signal_unmounts(store: Envfs, signum: int) -> None:
    """SIGTERM, SIGINT or SIGHUP to the daemon unmounts, as `envfs unmount` does: no dead
    mount is left behind, and what was written is there at the next mount."""
    mount(store)
    (store.mnt / "kept").write_bytes(b"kept")
    pid = store.daemon_pid()
    os.kill(pid, signum)
    wait_until(lambda: process_gone(pid), "the signalled daemon to exit")
    assert str(store.mnt) not in envfs_mounts()
    mount(store)
    assert (store.mnt / "kept").read_bytes() == b"kept"


def test_sigkill_leaves_nothing_and_next_mount_works(store: Envfs) -> None:
    mount(store)
    data = os.urandom(20_000)
    with open(store.mnt / "kept", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    pid = store.daemon_pid()
    children = descendants(pid)
    sockets = [arg for cmd in children.values() for arg in cmd.split() if arg.endswith("p11.sock")]
    assert sockets, children
    socket_dir = os.path.dirname(sockets[0])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_gone(pid), "the killed daemon to die")

    def leftovers() -> dict[int, str]:
        found = {child: cmd for child, cmd in children.items() if not process_gone(child)}
        found.update(descendants(pid))
        for other, cmd in processes_of(store.root).items():
            found[other] = cmd
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and not process_gone(int(entry.name)):
                try:
                    if socket_dir.encode() in (entry / "cmdline").read_bytes():
                        found[int(entry.name)] = socket_dir
                except OSError:
                    pass
        return found

    wait_until(lambda: not leftovers(), "no process left by the killed daemon", timeout=10)
    assert status_json(store, str(store.store))["mounted"] is False  # type: ignore[index]
    assert str(store.mnt) in envfs_mounts()  # the dead FUSE mount is still there
    with pytest.raises(OSError) as dead:
        os.stat(store.mnt)
    assert dead.value.errno == errno.ENOTCONN
    mount(store)  # clears the dead mount by itself
    assert envfs_mounts().count(str(store.mnt)) == 1
    assert (store.mnt / "kept").read_bytes() == data
    (store.mnt / "after").write_text("after")
    remount(store)
    assert (store.mnt / "after").read_text() == "after"


@pytest.mark.parametrize("kind", ["plain-dir", "missing", "tmpfs"])
def test_unmount_of_a_non_mount(envfs: Envfs, kind: str) -> None:
    path = envfs.root / "target"
    if kind != "missing":
        path.mkdir()
    if kind == "tmpfs" and not can_mount_tmpfs(path):
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = envfs.run("unmount", str(path), check=False)
        line = one_line(result.stderr)
        assert "not an envfs mount" in line
        assert result.returncode == errors.NotMounted.exit_code
        assert os.path.ismount(path) == (kind == "tmpfs")  # a foreign mount is left alone
    finally:
        if kind == "tmpfs":
            subprocess.run(["umount", str(path)], capture_output=True)


def test_unmount_of_a_busy_mount_fails_and_keeps_it(mounted: Path, envfs: Envfs) -> None:
    pid = envfs.daemon_pid()
    with open(mounted / "open", "w") as f:
        result = envfs.run("unmount", str(mounted), check=False)
        line = one_line(result.stderr)
        assert result.returncode == errors.MountFailed.exit_code, line
        assert "busy" in line.lower()
        f.write("still works")
    assert not process_gone(pid)
    assert (mounted / "open").read_text() == "still works"
    envfs.unmount()
    assert process_gone(pid)


# -- status -------------------------------------------------------------------------------------


def test_status(store: Envfs) -> None:
    sb = superblock_json(store)
    uuid, label = sb["uuid"], sb["keys"][0]["label"]
    text = store.run("status", str(store.store)).stdout
    fields = dict(line.split(":", 1) for line in text.strip().splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["uuid"] == uuid
    assert fields["format_version"] == "1"
    assert fields["key_versions"] == f"v1 ({label})"
    assert fields["hsm"] == "type=embedded token=envfs"
    assert fields["mounted"] == "False"
    assert fields["files"] == "0" and fields["inodes"] == "1"

    info = status_json(store, str(store.store))
    assert isinstance(info, dict)
    assert info["store"] == str(store.store) and info["uuid"] == uuid and info["format_version"] == 1
    assert info["key_versions"] == [{"version": 1, "label": label}] and info["current_key_version"] == 1
    assert info["hsm"] == {"type": "embedded", "token": "envfs"}
    assert info["mounted"] is False and "pid" not in info
    assert (info["inodes"], info["files"]) == (1, 0)

    mount(store)
    (store.mnt / "d").mkdir()
    (store.mnt / "a").write_bytes(b"a" * 100)
    (store.mnt / "d" / "b").write_bytes(b"b" * 5000)
    (store.mnt / "c").touch()
    os.symlink("a", store.mnt / "link")
    paths = [store.mnt, store.mnt / "d", store.mnt / "a", store.mnt / "d" / "b", store.mnt / "c", store.mnt / "link"]
    total = sum(os.lstat(p).st_size for p in paths)
    by_mnt = status_json(store, str(store.mnt))
    by_store = status_json(store, str(store.store))
    assert isinstance(by_mnt, dict) and isinstance(by_store, dict)
    for info in (by_mnt, by_store):
        assert info["uuid"] == uuid and info["store"] == str(store.store)
        assert info["mounted"] is True and info["mountpoint"] == str(store.mnt)
        assert info["pid"] == store.daemon_pid()
        assert (info["inodes"], info["files"], info["bytes"]) == (6, 3, total)
    text = store.run("status", str(store.mnt)).stdout
    assert "mounted:             True" in text and f"mountpoint:          {store.mnt}" in text

    everything = status_json(store)
    assert isinstance(everything, list)
    ours = [i for i in everything if i["store"] == str(store.store)]
    assert len(ours) == 1 and ours[0]["mountpoint"] == str(store.mnt) and ours[0]["uuid"] == uuid
    text = store.run("status").stdout
    assert f"store:               {store.store}\n" in text and uuid in text

    store.unmount()
    everything = status_json(store)
    assert isinstance(everything, list)
    assert not [i for i in everything if i["store"] == str(store.store)]
    info = status_json(store, str(store.store))
    assert isinstance(info, dict)
    assert info["mounted"] is False and (info["inodes"], info["files"], info["bytes"]) == (6, 3, total)


def test_status_into_a_closed_pipe_ends_quietly(store: Envfs) -> None:
    """`envfs status | head -1` and the like: the reader is gone, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*ENVFS, "status", str(store.store)], env=store.env, stdout=write_end, stderr=subprocess.PIPE,
            text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


def test_unmount_says_when_the_daemon_died_before_closing_the_store(store: Envfs) -> None:
    """A daemon killed while mounted: `envfs unmount` clears its mount, and says in one line
    (exit code 33) that the store was not closed; the next mount and unmount are clean."""
    mount(store)
    with open(store.mnt / "f", "w") as f:
        f.write("kept")
        f.flush()
        os.fsync(f.fileno())  # a daemon killed loses what was not fsynced, as a crash does
    store.kill_daemon()
    result = store.run("unmount", str(store.mnt), check=False)
    assert result.returncode == errors.UncleanUnmount.exit_code == 33, result.stderr
    assert "without closing the store" in one_line(result.stderr)
    assert str(store.mnt) not in envfs_mounts()
    mount(store)
    assert (store.mnt / "f").read_text() == "kept"
    result = store.run("unmount", str(store.mnt), check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_status_of_all_mounts_survives_a_mount_without_its_store(mounted: Path, envfs: Envfs) -> None:
    pid = envfs.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_gone(pid), "the killed daemon to die")
    moved = envfs.root / "store-moved"
    envfs.store.rename(moved)
    try:
        result = envfs.run("status", "--json", check=False)
        assert result.returncode == 0, result.stderr
        assert str(mounted) in result.stdout
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mounted)], capture_output=True)
        moved.rename(envfs.store)


def test_status_of_a_non_store(envfs: Envfs) -> None:
    result = envfs.run("status", str(envfs.mnt), check=False)
    one_line(result.stderr)
    assert result.returncode == errors.NotAStore.exit_code


# -- --allow-other -------------------------------------------------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NOBODY_PYTHON = "/usr/bin/python3"  # the test's interpreter may sit under /root, out of nobody's reach

NOBODY_SCRIPT = r"""
import errno, json, os, sys
m = sys.argv[1]
out = {}

def attempt(name, fn):
    try:
        result = fn()
        out[name] = "ok" if result is None else result
    except OSError as e:
        out[name] = errno.errorcode[e.errno]

def create(path, mode=0o666):
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    os.write(fd, b"nobody")
    os.close(fd)

def mode_of(path):
    st = os.stat(path)
    return [st.st_uid, st.st_gid, st.st_mode & 0o7777]

if sys.argv[2] == "stat-root":
    attempt("stat", lambda: os.stat(m) and None)
    attempt("listdir", lambda: os.listdir(m) and None)
else:
    os.umask(0o027)
    attempt("create", lambda: create(f"{m}/pub/mine"))
    attempt("mine", lambda: mode_of(f"{m}/pub/mine"))
    attempt("mkdir", lambda: os.mkdir(f"{m}/pub/mydir", 0o777))
    attempt("mydir", lambda: mode_of(f"{m}/pub/mydir"))
    attempt("read_root_file", lambda: open(f"{m}/pub/roots").read() and None)
    attempt("write_root_file", lambda: open(f"{m}/pub/roots", "w").close())
    attempt("chmod_other", lambda: os.chmod(f"{m}/pub/roots", 0o666))
    attempt("chown_other", lambda: os.chown(f"{m}/pub/roots", 65534, 65534))
    attempt("chown_own_to_root", lambda: os.chown(f"{m}/pub/mine", 0, 0))
    attempt("chmod_own", lambda: os.chmod(f"{m}/pub/mine", 0o600))
    attempt("unlink_other_in_sticky", lambda: os.unlink(f"{m}/sticky/roots"))
    attempt("rename_other_in_sticky", lambda: os.rename(f"{m}/sticky/roots", f"{m}/sticky/moved"))
    attempt("create_in_sticky", lambda: create(f"{m}/sticky/mine"))
    attempt("unlink_own_in_sticky", lambda: os.unlink(f"{m}/sticky/mine"))
    attempt("unlink_other_in_plain", lambda: os.unlink(f"{m}/pub/roots2"))
    attempt("list_private", lambda: os.listdir(f"{m}/private") and None)
    attempt("stat_private_file", lambda: os.stat(f"{m}/private/secret") and None)
    attempt("create_in_root_dir", lambda: create(f"{m}/nobody-here"))
print(json.dumps(out))
"""


def as_nobody(mnt: Path, action: str) -> dict[str, object]:
    result = subprocess.run(
        [*NOBODY, NOBODY_PYTHON, "-c", NOBODY_SCRIPT, str(mnt), action],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def public_mnt(store: Envfs) -> Iterator[Path]:
    """A mountpoint that uid 65534 can reach (pytest's own temporary root is 0700)."""
    if not os.path.exists(NOBODY_PYTHON) or shutil.which("setpriv") is None:
        pytest.skip("needs /usr/bin/python3 and setpriv")
    base = Path(tempfile.mkdtemp(prefix="envfs-cli-"))
    base.chmod(0o755)
    store.mnt = base / "mnt"
    store.mnt.mkdir()
    try:
        yield store.mnt
    finally:
        store.cleanup()
        if str(store.mnt) not in envfs_mounts():
            shutil.rmtree(base, ignore_errors=True)


def test_allow_other_permissions(store: Envfs, public_mnt: Path) -> None:
    mount(store, "--allow-other")
    m = public_mnt
    (m / "pub").mkdir()
    (m / "pub").chmod(0o777)
    for name in ("roots", "roots2"):
        (m / "pub" / name).write_text("root's")
        (m / "pub" / name).chmod(0o644)
    (m / "sticky").mkdir()
    (m / "sticky").chmod(0o1777)
    (m / "sticky" / "roots").write_text("root's")
    (m / "sticky" / "roots").chmod(0o666)
    (m / "private").mkdir(mode=0o700)
    (m / "private" / "secret").write_text("secret")
    assert stat.S_IMODE(os.stat(m / "sticky").st_mode) == 0o1777

    out = as_nobody(m, "ops")
    expected = {
        "create": "ok",
        "mine": [65534, 65534, 0o640],  # 0666 asked, umask 027
        "mkdir": "ok",
        "mydir": [65534, 65534, 0o750],
        "read_root_file": "ok",
        "write_root_file": "EACCES",
        "chmod_other": "EPERM",
        "chown_other": "EPERM",
        "chown_own_to_root": "EPERM",
        "chmod_own": "ok",
        "unlink_other_in_sticky": "EPERM",
        "rename_other_in_sticky": "EPERM",
        "create_in_sticky": "ok",
        "unlink_own_in_sticky": "ok",
        "unlink_other_in_plain": "ok",  # no sticky bit: the directory's write permission is enough
        "list_private": "EACCES",
        "stat_private_file": "EACCES",
        "create_in_root_dir": "EACCES",
    }
    assert out == expected

    mine = os.stat(m / "pub" / "mine")
    assert (mine.st_uid, mine.st_gid, stat.S_IMODE(mine.st_mode)) == (65534, 65534, 0o600)
    roots = os.stat(m / "pub" / "roots")
    assert (roots.st_uid, roots.st_gid, stat.S_IMODE(roots.st_mode)) == (0, 0, 0o644)
    assert (m / "pub" / "roots").read_text() == "root's"
    assert (m / "sticky" / "roots").read_text() == "root's"
    assert not (m / "sticky" / "moved").exists() and not (m / "pub" / "roots2").exists()
    assert os.listdir(m / "private") == ["secret"]

    remount(store)  # ownership and modes are stored, not made up by the mount
    mine = os.stat(m / "pub" / "mine")
    assert (mine.st_uid, mine.st_gid, stat.S_IMODE(mine.st_mode)) == (65534, 65534, 0o600)
    assert stat.S_IMODE(os.stat(m / "sticky").st_mode) == 0o1777


def test_without_allow_other_other_users_are_kept_out(store: Envfs, public_mnt: Path) -> None:
    mount(store)
    (public_mnt / "f").write_text("root only")
    os.chmod(public_mnt, 0o777)
    assert as_nobody(public_mnt, "stat-root") == {"stat": "EACCES", "listdir": "EACCES"}
    assert (public_mnt / "f").read_text() == "root only"


# Root without a capability: the one caller the kernel's checks hold back where only root may enter.
CAPLESS_ROOT = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


def mount_options(mnt: Path) -> set[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mnt):
            return set(fields[3].split(","))
    raise AssertionError(f"{mnt} is not mounted")


@pytest.mark.parametrize(
    "options, kernel_checks",
    [([], False), (["--default-permissions"], True), (["--allow-other"], True)],
    ids=["root-only", "default-permissions", "allow-other"],
)
def test_the_kernel_checks_permissions_unless_only_root_may_enter(
    store: Envfs, options: list[str], kernel_checks: bool
) -> None:
    """A root-only mount goes without the kernel's checks, which every capable root passes
    (test_against_ext4 runs its battery both ways); --default-permissions keeps them."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    mount(store, *options)
    secret = store.mnt / "secret"
    secret.write_text("another's")
    secret.chmod(0o600)
    os.chown(secret, 65534, 65534)
    assert ("default_permissions" in mount_options(store.mnt)) == kernel_checks
    result = subprocess.run([*CAPLESS_ROOT, "cat", str(secret)], capture_output=True, text=True, timeout=60)
    if kernel_checks:
        assert result.returncode == 1 and "Permission denied" in result.stderr, result
    else:
        assert result.returncode == 0 and result.stdout == "another's", result


# -- exit codes and usage ------------------------------------------------------------------------

# The documented exit codes (envfs/errors.py): an ABI for scripts. Changing errors.py must fail here.
EXIT_CODES = {
    "EnvfsError": 1,
    "UsageError": 2,
    "PinError": 10,
    "TokenNotFound": 11,
    "KeyNotFound": 12,
    "WrongKey": 13,
    "HsmError": 14,
    "NotAStore": 20,
    "UnsupportedFormat": 21,
    "CorruptStore": 22,
    "StoreExists": 23,
    "StoreBusy": 24,
    "RotationUnfinished": 25,
    "StoreReadOnly": 26,
    "StoreRolledBack": 27,
    "BadMountpoint": 30,
    "MountFailed": 31,
    "NotMounted": 32,
    "UncleanUnmount": 33,
    "DamageFound": 40,
}


@pytest.mark.parametrize("name", sorted(EXIT_CODES, key=EXIT_CODES.get))  # type: ignore[arg-type]
def test_exit_code_is_stable(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.EnvfsError)
    assert cls.exit_code == EXIT_CODES[name]


def test_every_error_class_has_a_documented_unique_code() -> None:
    classes = {
        name: cls for name, cls in inspect.getmembers(errors, inspect.isclass) if cls.__module__ == errors.__name__
    }
    envfs_errors = {name for name, cls in classes.items() if issubclass(cls, errors.EnvfsError)}
    assert envfs_errors == set(EXIT_CODES), "a new error class needs a documented exit code here"
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES), "exit codes must be unique"
    assert not issubclass(errors.IntegrityError, errors.EnvfsError)
    assert documented_codes() == set(EXIT_CODES.values())


@pytest.mark.parametrize(
    "args",
    [
        ("mount",),
        ("frobnicate",),
        ("status", "--bogus"),
        ("init", "STORE", "--pkcs11-module", "/nonexistent.so"),
        ("mount", "STORE", "MNT", "--spin", "1001"),
        ("mount", "STORE", "MNT", "--spin", "-1"),
    ],
    ids=[
        "missing-arguments",
        "unknown-command",
        "unknown-option",
        "module-without-token",
        "spin-too-long",
        "spin-negative",
    ],
)
def test_usage_errors_exit_2(envfs: Envfs, args: tuple[str, ...]) -> None:
    places = {"STORE": str(envfs.store), "MNT": str(envfs.mnt)}
    result = envfs.run(*[places.get(a, a) for a in args], check=False)
    assert result.returncode == errors.UsageError.exit_code == 2, result.stderr
    assert result.stderr.strip() and "Traceback" not in result.stderr
    assert not envfs.store.exists() and not envfs.data_home.exists()


# -- the token server's start-up ----------------------------------------------------------------

SLOW_P11_KIT = """#!/usr/bin/python3
# p11-kit as it behaves under load, slowed down: the socket file exists (bind) a while
# before the server accepts connections (listen), then the real p11-kit takes over.
import os, socket, sys, time
args = sys.argv[1:]
path = args[args.index("-n") + 1]
early = socket.socket(socket.AF_UNIX)
early.bind(path)
time.sleep(1.5)
early.close()
os.unlink(path)
os.execv(REAL, [REAL, *args])
"""


def test_token_server_accepts_connections_when_start_returns(store: Envfs) -> None:
    real = shutil.which("p11-kit")
    assert real is not None
    bin_dir = store.root / "slow-bin"
    bin_dir.mkdir()
    fake = bin_dir / "p11-kit"
    fake.write_text(SLOW_P11_KIT.replace("REAL", repr(real)))
    fake.chmod(0o755)
    slow = dict(store.env, PATH=f"{bin_dir}:{store.env['PATH']}")
    result = store.run("mount", str(store.store), str(store.mnt), "--log", str(store.log), check=False, env=slow)
    assert result.returncode == 0, result.stderr


# -- the daemon's spin -------------------------------------------------------------------------


def _request_thread_sleeps(pid: int) -> int:
    """Voluntary context switches of the daemon's request thread (its main thread) so far."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches:"))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the client needs a CPU of its own while the daemon spins")
def test_spin_keeps_the_daemon_awake_between_requests(store: Envfs) -> None:
    """A client that waits for each reply: without a spin the daemon sleeps and is woken for
    about every request; with one it finds most requests without sleeping (patch 6 of
    patches/pyfuse3, `envfs mount --spin`)."""
    requests = 2000
    sleeps = {}
    for spin in ("0", "1000"):
        store.mount("--spin", spin)
        try:
            pid = store.daemon_pid()
            assert f"spin {spin} us" in store.log_text()
            before = _request_thread_sleeps(pid)
            for i in range(requests):  # a lookup each: no name is in the kernel's cache
                with pytest.raises(FileNotFoundError):
                    os.stat(store.mnt / f"missing-{spin}-{i}")
            sleeps[spin] = _request_thread_sleeps(pid) - before
        finally:
            store.unmount()
    assert sleeps["0"] > requests // 3, sleeps  # measured: 1,489 of 2,000
    assert sleeps["1000"] < requests // 10, sleeps  # measured: 1
