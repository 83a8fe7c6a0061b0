"""The HSM at work: derivations per open file, the key thread, a token that goes away, crash recovery."""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers import PIN, Envfs, data_file_ids, new_file, operations_in_process

from envfs import embedded
from envfs.errors import HsmError
from envfs.hsm import Hsm
from envfs.secret import Secret


def _settle(env: Envfs) -> dict[str, int]:
    """Counters once two reads in a row agree (SIGUSR1 is handled asynchronously)."""
    previous = env.counters()
    while True:
        time.sleep(0.2)
        current = env.counters()
        if current == previous:
            return current
        previous = current


@pytest.fixture
def token(store: Envfs, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Hsm, str]]:
    """An HSM session on the store's embedded token, and the label of its master key."""
    server = embedded.TokenServer(embedded.EmbeddedToken(store.data_home / "envfs"))
    monkeypatch.setenv("P11_KIT_SERVER_ADDRESS", server.start())
    try:
        hsm = Hsm(server.client_module, embedded.TOKEN_LABEL, PIN)
        try:
            yield hsm, str(store.status()["key_versions"][0]["label"])  # type: ignore[index]
        finally:
            hsm.close()
    finally:
        server.stop()


def _collected(hsm: Hsm, ticket: int | None) -> bytes:
    assert ticket is not None
    with Secret(32) as key:
        hsm.collect(ticket, key)
        return bytes(key.view)


def _derived(hsm: Hsm, label: str, info: bytes) -> bytes:
    with hsm.derive(label, info) as key:
        return bytes(key.view)


def test_keys_derived_ahead_are_the_keys_derived_at_once(token: tuple[Hsm, str]) -> None:
    """The key thread borrows the session between the owner's own calls: whatever it was doing
    (a derivation queued, one running, an operation started ahead), a derivation, a key lookup
    or a data object read of the owner's in between changes no key."""
    hsm, label = token
    infos = [f"file {i}".encode() for i in range(12)]
    expected = [_derived(hsm, label, info) for info in infos]
    tickets = [hsm.derive_ahead(label, info) for info in infos[:4]]
    assert _derived(hsm, label, b"in between") == _derived(hsm, label, b"in between")
    assert [_collected(hsm, t) for t in tickets] == expected[:4]
    for i in range(4, 12):
        ticket = hsm.derive_ahead(label, infos[i])
        if i % 3 == 0:
            assert not hsm.has_key(f"{label}-missing")
        elif i % 3 == 1:
            assert hsm.read_data(f"{label}-no-such-object") == []
        assert _collected(hsm, ticket) == expected[i]
    hsm.arm(label)
    assert _derived(hsm, label, infos[0]) == expected[0]


def test_forgotten_derivations_free_their_places(token: tuple[Hsm, str]) -> None:
    hsm, label = token
    tickets = [hsm.derive_ahead(label, b"%d" % i) for i in range(8)]
    assert None not in tickets
    assert hsm.derive_ahead(label, b"one too many") is None  # the queue is full: derived when needed
    hsm.forget(tickets[0])
    with pytest.raises(HsmError, match="cancelled"):
        _collected(hsm, tickets[0])
    for ticket in tickets[1:]:
        hsm.forget(ticket)
    assert not hsm.has_key(f"{label}-missing")  # takes the session back: the thread is idle then
    # Every place is free again: forgotten results were wiped and released, the running one's too.
    again = [hsm.derive_ahead(label, b"%d" % i) for i in range(8)]
    assert [_collected(hsm, t) for t in again] == [_derived(hsm, label, b"%d" % i) for i in range(8)]


def test_one_derivation_per_open_file(store: Envfs) -> None:
    store.mount()
    for i in range(20):
        (store.mnt / f"f{i}").write_bytes(os.urandom(5000))
    store.remount()
    before = _settle(store)
    for i in range(20):
        assert len((store.mnt / f"f{i}").read_bytes()) == 5000
    after = _settle(store)
    # In listing order each open finds its key derived ahead, at the previous
    # open: still one derivation per file, none wasted.
    assert after["hsm_derivations"] - before["hsm_derivations"] == 20
    assert after["key_wait_us"] > before["key_wait_us"]  # the time the opens spent getting their keys
    # Several handles on one file share one key: one derivation (f19, the last
    # file listed, has no next file whose key an open would prefetch).
    fds = [os.open(store.mnt / "f19", os.O_RDONLY | os.O_DIRECT) for _ in range(5)]
    for fd in fds:
        os.pread(fd, 4096, 0)
    held = _settle(store)
    for fd in fds:
        os.close(fd)
    assert held["hsm_derivations"] - after["hsm_derivations"] == 1
    assert held["open_files"] == 1


def test_keys_are_derived_two_files_ahead_and_a_skipped_file_wastes_one(store: Envfs) -> None:
    store.mount()
    for i in range(6):
        (store.mnt / f"f{i}").write_bytes(os.urandom(100))
    store.remount()
    before = _settle(store)
    (store.mnt / "f0").read_bytes()
    first = _settle(store)
    # f0's own key, and those of f1 and f2, the next two files listed.
    assert first["hsm_derivations"] - before["hsm_derivations"] == 3
    (store.mnt / "f2").read_bytes()  # f1 skipped: f2's key is ready, f3's is asked for
    (store.mnt / "f3").read_bytes()
    (store.mnt / "f4").read_bytes()
    (store.mnt / "f5").read_bytes()
    after = _settle(store)
    assert after["prefetched_keys_used"] - before["prefetched_keys_used"] == 4
    # One derivation per file opened, and one for f1, which nobody opened.
    assert after["hsm_derivations"] - before["hsm_derivations"] == 6


def test_reading_a_tree_in_find_order_finds_keys_derived_ahead(store: Envfs) -> None:
    store.mount()
    for d in ("a/b/empty", "a/d", "e", "f"):
        (store.mnt / d).mkdir(parents=True)
    for name in ("a/1", "a/2", "a/b/3", "a/d/4", "5", "f/6", "f/7"):
        (store.mnt / name).write_bytes(name.encode() * 1000)
    (store.mnt / "a/c").symlink_to("1")
    os.mkfifo(store.mnt / "a/fifo")
    store.remount()
    before = _settle(store)
    found = subprocess.run(["find", ".", "-type", "f"], cwd=store.mnt, capture_output=True, text=True, check=True)
    files = found.stdout.split()
    assert len(files) == 7
    for name in files:
        assert (store.mnt / name).read_bytes() == name[2:].encode() * 1000
    after = _settle(store)
    # Each open guessed the next file of the walk (over subdirectories, empty
    # ones, a symlink and a FIFO, and back up): every key but the first was
    # derived ahead, and none was derived twice or in vain.
    assert after["prefetched_keys_used"] - before["prefetched_keys_used"] == len(files) - 1
    assert after["hsm_derivations"] - before["hsm_derivations"] == len(files)


def _leftovers(store: Envfs) -> list[str]:
    result = store.run("fsck", str(store.store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith("leftover:")]


def test_a_create_finds_its_file_prepared_between_the_requests_before_it(store: Envfs) -> None:
    """After each create the daemon derives the next new file's key, and in the gaps
    between requests (pyfuse3's idle hook) makes that file's data file, and its cipher
    once the key is derived: the next create finds them ready. What was made for a
    create that never came is removed at unmount, and after a crash by the next mount."""
    store.mount()
    before = _settle(store)
    for i in range(30):
        (store.mnt / f"f{i}").write_bytes(b"x" * 100)
        with pytest.raises(OSError, match="No data available"):
            os.getxattr(store.mnt / f"f{i}", "user.none")
        # A gap after a request, which the daemon sees: a client that sends its next
        # request at once may have it queued before the daemon looks (both on one CPU).
        time.sleep(0.01)
    after = _settle(store)
    # The first create had nothing prepared, the others their data files; whether
    # a key is derived in time depends on the token (the test below checks the ciphers).
    assert after["creates_with_data_file_ahead"] - before["creates_with_data_file_ahead"] >= 28
    # One derivation per file, and one for the file after the last.
    assert after["hsm_derivations"] - before["hsm_derivations"] == 31
    assert len(data_file_ids(store)) == 31  # the 30, and the next one's, made ahead
    store.unmount()
    assert len(data_file_ids(store)) == 30
    assert _leftovers(store) == []
    store.mount()
    with open(store.mnt / "g", "wb", buffering=0) as f:
        f.write(b"y")
        os.fsync(f.fileno())  # commits: a crash keeps g
    deadline = time.monotonic() + 5
    while len(data_file_ids(store)) < 32 and time.monotonic() < deadline:
        with pytest.raises(OSError, match="No data available"):
            os.getxattr(store.mnt / "g", "user.none")  # a request, after which the idle hook runs
        time.sleep(0.01)
    store.kill_daemon()
    found = _leftovers(store)
    assert len(found) == 1 and "of an inode that does not exist" in found[0], found
    store.mount()  # clears the dead mount and the leftover
    assert sorted(os.listdir(store.mnt)) == sorted([f"f{i}" for i in range(30)] + ["g"])
    store.unmount()
    assert len(data_file_ids(store)) == 31 and _leftovers(store) == []


def test_the_idle_hook_makes_the_next_files_cipher_once_its_key_is_derived(
    store: Envfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    with operations_in_process(store, monkeypatch) as ops:
        first, fh = new_file(ops, b"a")
        trio.run(ops.release, fh)
        ids = data_file_ids(store)
        assert ops.idle() is True  # the next file's data file: made; its cipher still to come
        (ahead,) = data_file_ids(store) - ids
        assert ahead > first
        deadline = time.monotonic() + 10
        while ops.idle() and time.monotonic() < deadline:
            time.sleep(0.001)  # the key thread derives the key meanwhile
        assert ops.idle() is False  # nothing left to prepare
        second, fh = new_file(ops, b"b", b"data")
        trio.run(ops.release, fh)
        assert second == ahead
        counters = ops.counters()
        assert counters["creates_with_data_file_ahead"] == counters["creates_with_cipher_ahead"] == 1
        assert counters["hsm_derivations"] >= 3  # a's key, b's derived ahead, and the file after b's
    assert data_file_ids(store) == {first, second}  # the one made after b went with the shutdown


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def test_token_server_that_goes_away_is_reconnected(store: Envfs) -> None:
    store.mount()
    data = os.urandom(9000)
    (store.mnt / "a").write_bytes(data)
    (store.mnt / "b").write_bytes(data)
    fd = os.open(store.mnt / "a", os.O_RDONLY | os.O_DIRECT)
    servers = _children(store.daemon_pid())
    assert servers, "the embedded token server runs as a child of the daemon"
    for server in servers:  # the listener and, below it, the connection's p11-kit-remote
        for child in _children(server):
            os.kill(child, signal.SIGKILL)
        os.kill(server, signal.SIGKILL)
    # An open file keeps its key; a new open derives through a restarted server.
    assert os.pread(fd, 9000, 0) == data
    os.close(fd)
    with open(store.mnt / "b", "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    # Until the token is back, new opens get EIO; then they work again.
    deadline = time.monotonic() + 10
    while True:
        try:
            fd = os.open(store.mnt / "b", os.O_RDONLY | os.O_DIRECT)
            break
        except OSError as e:
            assert e.errno == errno.EIO
            assert time.monotonic() < deadline, "the daemon did not get its token back"
            time.sleep(0.2)
    try:
        assert os.pread(fd, 9000, 0) == data
    finally:
        os.close(fd)
    assert "reconnecting" in store.log_text()
    store.remount()
    assert (store.mnt / "a").read_bytes() == data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_orphans_of_a_killed_daemon_are_cleaned_at_next_mount(store: Envfs) -> None:
    store.mount()
    path = store.mnt / "orphan"
    path.write_bytes(os.urandom(20000))
    (store.mnt / "keep").write_text("kept")
    orphan, keep = os.stat(path).st_ino, os.stat(store.mnt / "keep").st_ino
    fd = os.open(path, os.O_RDONLY)
    os.unlink(path)
    _fsync_dir(store.mnt)  # the unlink is committed: the inode is an orphan, not a file
    assert {orphan, keep} <= data_file_ids(store)
    store.kill_daemon()
    try:
        os.close(fd)
    except OSError:
        pass
    store.mount()
    assert (store.mnt / "keep").read_text() == "kept"
    assert data_file_ids(store) == {keep}  # the orphan's, and the one made ahead, are gone
    assert "orphan inode" in store.log_text()


def _token_server_dir(env: Envfs) -> Path:
    """The socket directory of the mounted daemon's token server (`p11-kit server -n DIR/p11.sock`,
    a child of the daemon): found by process, not by listing /tmp, where other mounts add theirs."""
    daemon = str(env.daemon_pid())
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "stat").read_text().rsplit(")", 1)[1].split()[1] != daemon:
                continue
            args = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "-n" in args and args[args.index("-n") + 1].startswith(tempfile.gettempdir()):
            socket = Path(args[args.index("-n") + 1])
            assert socket.name == "p11.sock" and socket.parent.name.startswith(embedded.RUNTIME_PREFIX)
            return socket.parent
    raise AssertionError(f"no token server under daemon {daemon}")


def test_socket_directory_of_a_killed_daemon_is_swept(store: Envfs) -> None:
    """The token server's socket directory outlives a daemon killed with SIGKILL;
    the sweep that every start runs removes it, and never a live server's."""
    store.mount()
    killed = _token_server_dir(store)
    store.kill_daemon()
    assert (killed / "p11.sock").exists()
    store.mount()
    live = _token_server_dir(store)
    assert live != killed
    # Aged past the sweep's grace period, which spares servers still starting (ours or
    # another session's), as the killed daemon's directory would be a minute later.
    old = time.time() - 120
    os.utime(killed, (old, old))
    assert embedded.remove_stale_runtimes() >= 1
    assert not killed.exists()
    assert live.is_dir()
    (store.mnt / "still").write_text("served")
    assert (store.mnt / "still").read_text() == "served"


def test_a_killed_daemon_loses_only_uncommitted_changes(store: Envfs) -> None:
    """Metadata changes are committed in groups: fsync commits at once, the timer
    within a fraction of a second; a kill loses nothing older than that."""
    store.mount()
    with open(store.mnt / "synced", "wb") as f:
        f.write(b"fsynced data")
        f.flush()
        os.fsync(f.fileno())
    (store.mnt / "dir").mkdir()
    (store.mnt / "dir" / "renamed-from").write_text("renamed and synced")
    os.rename(store.mnt / "dir" / "renamed-from", store.mnt / "dir" / "renamed")
    _fsync_dir(store.mnt / "dir")
    store.kill_daemon()
    store.mount()
    assert (store.mnt / "synced").read_bytes() == b"fsynced data"
    assert (store.mnt / "dir" / "renamed").read_text() == "renamed and synced"
    assert not (store.mnt / "dir" / "renamed-from").exists()

    (store.mnt / "settled").write_bytes(b"x" * 100_000)
    os.truncate(store.mnt / "synced", 3)
    time.sleep(1.5)  # the group commit timer (0.1 s) and the once-a-second housekeeping
    store.kill_daemon()
    store.mount()
    assert (store.mnt / "settled").read_bytes() == b"x" * 100_000
    assert (store.mnt / "synced").read_bytes() == b"fsy"


def _tree_tarball(path: Path, directories: int, files: int) -> dict[str, bytes]:
    """A tarball of `directories` directories of `files` files each, of 0 to 30,000 random bytes."""
    rng = random.Random(7)
    contents: dict[str, bytes] = {}
    with tarfile.open(path, "w") as tar:
        for d in range(directories):
            directory = tarfile.TarInfo(f"tree/d{d:03d}")
            directory.type, directory.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(directory)
            for f in range(files):
                name = f"tree/d{d:03d}/f{f:03d}"
                contents[name] = rng.randbytes(rng.randrange(30_000))
                member = tarfile.TarInfo(name)
                member.size, member.mode = len(contents[name]), 0o644
                tar.addfile(member, io.BytesIO(contents[name]))
    return contents


@pytest.mark.timeout(180)
def test_a_crash_in_the_middle_of_an_untar_leaves_no_damage(store: Envfs, tmp_path: Path) -> None:
    """The daemon killed while tar makes directories and files, whose rows (new inodes'
    with the group commit) and data files are all in flight: fsck finds no damage, and
    after the next mount every file there reads as the start of what tar wrote to it."""
    tarball = tmp_path / "tree.tar"
    contents = _tree_tarball(tarball, directories=60, files=40)
    store.mount()
    tar = subprocess.Popen(
        ["tar", "xf", str(tarball), "-C", str(store.mnt)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (store.mnt / "tree" / "d010").exists():  # some 400 files made, most of them still to come
            assert tar.poll() is None and time.monotonic() < deadline, "tar ended before the crash"
            time.sleep(0.01)
        store.kill_daemon()
    finally:
        tar.kill()
        tar.wait()
    result = store.run("fsck", str(store.store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    store.mount()
    found = 0
    for name, data in contents.items():
        path = store.mnt / name
        if path.exists():
            kept = path.read_bytes()
            assert kept == data[: len(kept)], name
            found += 1
    assert found >= 40 * 10 // 2, found  # what the commits before the crash kept
    store.unmount()
    result = store.run("fsck", str(store.store), check=False)
    assert result.returncode == 0 and "leftovers: 0" in result.stdout, result.stdout + result.stderr


def test_read_atimes_are_saved_by_the_commit_timer(store: Envfs) -> None:
    """relatime: a read of a file whose atime is older than its mtime moves the atime to
    now; envfs saves that change lazily, but within the group commit window, so a kill
    after it loses nothing. A second read leaves the atime alone."""
    store.mount()
    for name in ("read", "unread"):
        (store.mnt / name).write_bytes(b"data" * 1000)
        os.utime(store.mnt / name, ns=(1_000_000_000, 2_000_000_000))
    store.remount()  # the reads below reach the daemon, not the page cache
    before = time.time_ns()
    assert (store.mnt / "read").read_bytes() == b"data" * 1000
    atime = os.stat(store.mnt / "read").st_atime_ns
    assert atime >= before
    assert (store.mnt / "read").read_bytes() == b"data" * 1000
    assert os.stat(store.mnt / "read").st_atime_ns == atime  # newer than mtime and ctime: left alone
    time.sleep(1.0)  # the group commit timer runs every 0.05 s
    store.kill_daemon()
    store.mount()
    assert os.stat(store.mnt / "read").st_atime_ns == atime
    assert os.stat(store.mnt / "unread").st_atime_ns == 1_000_000_000
