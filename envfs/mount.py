"""Wiring of a mount: HSM, key ring, metadata, pyfuse3 and trio.

`mount()` validates everything it can before it starts the daemon, so a
refusal changes nothing; the daemon (a new process, `envfs.daemon`, or this
process with --foreground) then takes the store lock, opens the HSM, checks
the keys and the store's anchor, mounts, and tells the waiting parent
"ready" or the error through a pipe. PKCS#11 modules are only ever loaded in
the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyfuse3
import trio

from . import embedded, errors
from .anchor import Anchor
from .errors import BadMountpoint, CorruptStore, EnvfsError, MountFailed, NotMounted, UncleanUnmount
from .fs import USAGE_WARNING_SECONDS, Operations, ThrottledWarning, delete_inode
from .hsm import Hsm
from .keys import KeyRing
from .metadata import GROUP_SECONDS, SCHEMA_VERSION, Metadata
from .secret import harden_process
from .store import RESERVE_BYTES, Store, StoreLock, Superblock, busy_with

log = logging.getLogger(__name__)

FSTYPE = "fuse.envfs"
READ_AHEAD_KB = 1024
# A read-write mount whose metadata has not changed for this long has its
# HSM anchor settled (`_settle_anchor`).
ANCHOR_IDLE_SECONDS = 5.0
# How long the daemon keeps looking for the next request after a reply before
# it sleeps (microseconds): a client that waits for each reply sends the next
# request within a few; being woken for it costs more than the request.
SPIN_MICROSECONDS = 50
MAX_SPIN_MICROSECONDS = 1000


@dataclass
class MountOptions:
    foreground: bool = False
    allow_other: bool = False
    default_permissions: bool = False  # the kernel's permission checks even where only root can enter
    debug: bool = False
    log_file: str | None = None
    rekey_after: int | None = None  # overrides the superblock (tests)
    read_only: bool = False
    copy: bool = False  # read-only: an older copy of the store, not checked against the anchor
    anchor_idle: float = ANCHOR_IDLE_SECONDS  # quiet seconds before the anchor is settled (tests: less)
    spin: int | None = None  # microseconds the daemon spins for the next request; None: default_spin()


# -- finding mounts ------------------------------------------------------------


@dataclass
class MountEntry:
    mountpoint: str
    source: str
    fstype: str
    device: str  # "major:minor"


def _unescape(field: str) -> str:
    """Undo the octal escapes (\\040 for a space) of /proc/self/mountinfo."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def envfs_mounts() -> list[MountEntry]:
    """envfs mounts in this mount namespace, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, source = right.split()[:2]
            if fstype == FSTYPE:
                found.append(MountEntry(_unescape(fields[4]), _unescape(source), fstype, fields[2]))
    return found


def find_mount(mountpoint: str) -> MountEntry | None:
    target = os.path.abspath(mountpoint)
    for entry in envfs_mounts():
        if entry.mountpoint == target:
            return entry
    return None


def store_of_source(source: str) -> Store:
    return Store(source.removeprefix("envfs:"))


# -- checks before mounting ------------------------------------------------------


def check_mountpoint(mountpoint: str) -> str:
    """Return the absolute mountpoint; clear a dead envfs mount left by a killed daemon."""
    path = os.path.abspath(mountpoint)
    stale = find_mount(path)
    if stale is not None:
        holder = store_of_source(stale.source).lock_holder()
        if holder is not None:
            raise BadMountpoint(f"{path} is already an envfs mount (pid {holder.get('pid')})")
        log.info("clearing the dead envfs mount on %s", path)
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, timeout=30)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadMountpoint(f"mountpoint {path} does not exist") from None
    except OSError as e:
        raise BadMountpoint(f"mountpoint {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BadMountpoint(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise BadMountpoint(f"{path} is already a mountpoint")
    if os.listdir(path):
        raise BadMountpoint(f"mountpoint {path} is not empty")
    return path


@dataclass
class TokenAccess:
    """How to reach the store's token: module, label, and a hook for reconnects."""

    module: str
    token: str
    before_reconnect: Callable[[], None] | None = None


def token_for(superblock: Superblock, stack: ExitStack) -> TokenAccess:
    """Where the store's token is; for the embedded token, start its server first."""
    if superblock.hsm.type != "embedded":
        return TokenAccess(str(superblock.hsm.module), superblock.hsm.token)
    server = embedded.TokenServer(embedded.EmbeddedToken())
    os.environ["P11_KIT_SERVER_ADDRESS"] = server.start()
    stack.callback(server.stop)

    def before_reconnect() -> None:
        if not server.running:
            log.warning("the embedded token server is gone; restarting it")
            server.stop()
            os.environ["P11_KIT_SERVER_ADDRESS"] = server.start()

    return TokenAccess(server.client_module, superblock.hsm.token, before_reconnect)


def hsm_for(access: TokenAccess, stack: ExitStack, pin: str) -> Hsm:
    """A logged-in HSM session, closed with the stack."""
    hsm = Hsm(access.module, access.token, pin, access.before_reconnect)
    stack.callback(hsm.close)
    return hsm


def recover(store: Store, metadata: Metadata) -> None:
    """Finish what a crashed daemon left: orphans and stale data files."""
    delete_orphans(store, metadata)
    if metadata.get_setting("mounted") != 1:
        return
    log.info("the store was not unmounted cleanly; checking data files")
    remove_stale_data_files(store, metadata)


def delete_orphans(store: Store, metadata: Metadata) -> None:
    """Delete the inodes no entry names any more (their last close never came)."""
    for inode_id in metadata.orphans():
        inode = metadata.get_inode(inode_id)
        if inode is not None:
            log.info("deleting orphan inode %d", inode_id)
            delete_inode(store, metadata, inode)


def remove_stale_data_files(store: Store, metadata: Metadata) -> None:
    """Remove data files that are not their inode's current (version, epoch), or have no inode."""
    for inode_id, key_version, key_epoch, path in store.data_files():
        inode = metadata.get_inode(inode_id)
        if inode is None or (inode.key_version, inode.key_epoch) != (key_version, key_epoch):
            log.info("removing stale data file %s", path.name)
            path.unlink(missing_ok=True)


# -- the daemon --------------------------------------------------------------------


def kernel_checks_permissions(options: MountOptions) -> bool:
    """Whether the mount asks the kernel to check modes and owners (FUSE's `default_permissions`).

    Without `allow_other` the kernel lets in only processes of the mounting user. When that user
    is root, every check the kernel would make passes for them anyway (capabilities), save the
    execute bit of a file, which the kernel checks without the option, and `access()`, which
    reaches `Operations.access`. So a root-only mount goes without it, as gocryptfs does: with it,
    every create makes the kernel fetch its directory's attributes again before the next path walk
    through it (a GETATTR per file an untar writes). Root that dropped its capabilities is the one
    caller the checks would still hold back; `default_permissions` keeps them for it.
    """
    return options.allow_other or options.default_permissions or os.geteuid() != 0


def serve(store: Store, superblock: Superblock, mountpoint: str, pin: str, options: MountOptions,
          ready: Callable[[EnvfsError | None], None]) -> None:  # fmt: skip
    """Run the filesystem until it is unmounted. Calls `ready` once, before serving."""
    harden_process()
    os.umask(0o077)  # store files (SQLite's -wal and -shm among them) are the owner's alone
    store.read_only = options.read_only
    with ExitStack() as stack:
        try:
            lock = store.lock(mountpoint)
            stack.callback(lock.release)
            stack.callback(store.close_commit_room)  # after the metadata's close, registered below
            hsm = hsm_for(token_for(superblock, stack), stack, pin)
            keys = KeyRing(hsm, superblock)
            stack.callback(keys.close)
            keys.verify()
            anchor = Anchor(keys, store)
            if options.read_only:
                metadata = _open_read_only(store, superblock, keys, None if options.copy else anchor, stack)
            else:
                metadata = _open_for_writing(store, superblock, keys, anchor, stack)
            names = keys.name_cipher()
            # One pending wake-up is enough: the task does all that is waiting.
            after_reply_send, after_reply_receive = trio.open_memory_channel[None](1)
            operations = Operations(
                store, metadata, keys, names,
                rekey_after=min(options.rekey_after or superblock.rekey_after_block_writes,
                                superblock.rekey_after_block_writes),
                wake_after_reply=functools.partial(_wake, after_reply_send),
            )  # fmt: skip
            fuse_options = {f"fsname=envfs:{_escape_option(str(store.path))}", "subtype=envfs"}
            if kernel_checks_permissions(options):
                fuse_options.add("default_permissions")
            if options.read_only:
                fuse_options.add("ro")
            if options.allow_other:
                fuse_options.add("allow_other")
            if options.debug:
                fuse_options.add("debug")
            try:
                pyfuse3.init(operations, mountpoint, fuse_options)
            except RuntimeError as e:
                raise MountFailed(f"mounting {mountpoint} failed: {e}") from e
        except EnvfsError as e:
            ready(e)
            return
        # Unmounted from outside (umount, fusermount3 -u): nothing left to unmount.
        clean = False

        def finish() -> None:
            pyfuse3.close(unmount=not clean)
            try:
                operations.destroy()
                if not options.read_only:
                    metadata.set_setting("mounted", 0)
                    metadata.sync()
            except (OSError, sqlite3.Error) as e:
                # A full or failing backing filesystem: what was not committed is
                # lost as in a crash, and the store stays marked as mounted, so
                # that the next mount recovers it.
                log.error("unmount: the last metadata changes were not written (%s); the next mount recovers", e)

        stack.callback(finish)
        settle = (
            functools.partial(_settle_anchor, operations, metadata, anchor, options.anchor_idle)
            if not options.read_only
            else lambda: None
        )
        spin = default_spin() if options.spin is None else options.spin
        pyfuse3.set_single_worker_spin(spin)
        pyfuse3.set_idle_hook(operations.idle)
        log.info("mounted %s on %s (pid %d; spin %d us)", store.path, mountpoint, os.getpid(), spin)
        ready(None)
        signals: list[int] = []
        trio.run(
            _main, after_reply_receive, lambda: _housekeeping(store, lock, operations, settle), operations,
            mountpoint, signals,
        )  # fmt: skip
        # A signal ends the session with the filesystem still mounted.
        clean = not signals
        log.info("unmounted %s", mountpoint)


def _open_for_writing(
    store: Store, superblock: Superblock, keys: KeyRing, anchor: Anchor, stack: ExitStack
) -> Metadata:
    """The metadata of a read-write mount: the store checked against its
    anchor, which says "in use" until the metadata is closed (or settled,
    `_settle_anchor`); upgraded, recovered after a crash, and marked as mounted."""
    anchor.begin()
    stack.callback(anchor.end)  # after the metadata's close, registered below
    metadata = Metadata(store.metadata_path, keys.metadata_mac())
    stack.callback(metadata.close)
    superblock.check_metadata_key_version(metadata.rows_key_version())
    if store.free_bytes() < RESERVE_BYTES:
        store.release_reserve()  # a full disk: the reserve is there for this
    try:
        metadata.upgrade()
        recover(store, metadata)
        metadata.set_setting("mounted", 1)
        metadata.sync()
    except sqlite3.Error as e:
        if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
            raise CorruptStore(f"{store.metadata_path}: metadata database damaged: {e}") from e
        raise MountFailed(f"{store.metadata_path}: cannot record the mount: {e}") from e
    metadata.group_commits()
    return metadata


def _open_read_only(
    store: Store, superblock: Superblock, keys: KeyRing, anchor: Anchor | None, stack: ExitStack
) -> Metadata:
    """The metadata of a read-only mount, as it is: nothing in the store or
    the anchor changes. The store is checked against its `anchor`, unless it
    is a copy (None: a backup or snapshot, older than the store the anchor
    follows)."""
    if anchor is not None:
        anchor.check(remedy="to read an older copy of the store, mount it with --read-only --copy")
    path, immutable = store.metadata_to_read(stack)
    if not immutable:
        log.info("a crash left changes in meta.db-wal: the read-only mount reads a private copy with them merged")
    metadata = Metadata(path, keys.metadata_mac(), read_only=immutable)
    stack.callback(metadata.close)
    superblock.check_metadata_key_version(metadata.rows_key_version())
    if metadata.schema_version != SCHEMA_VERSION:
        raise MountFailed(
            f"{store.metadata_path}: metadata schema version {metadata.schema_version} is upgraded by the "
            "first read-write mount (or envfs fsck); a read-only mount cannot"
        )
    return metadata


def default_spin() -> int:
    """SPIN_MICROSECONDS where the daemon has two CPUs or more, else 0: on one
    CPU the spin would only keep the client from sending the request."""
    return SPIN_MICROSECONDS if _cpus_available() >= 2 else 0


def _cpus_available() -> float:
    """The CPUs this process may run on, capped by its cgroup's CPU quota."""
    cpus = float(len(os.sched_getaffinity(0)))
    try:
        # cgroup v2: the line "0::/PATH"; a v1 hierarchy has none and no quota file.
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
        quota, period = Path("/sys/fs/cgroup", line[3:].lstrip("/"), "cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, StopIteration, ValueError, ZeroDivisionError):
        pass
    return cpus


async def _main(
    after_reply: trio.MemoryReceiveChannel[None], housekeeping: Callable[[], None], operations: Operations,
    mountpoint: str, signals: list[int],
) -> None:  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_widen_readahead, mountpoint)
        nursery.start_soon(_run_after_replies, after_reply, operations)
        nursery.start_soon(_terminate_on_signals, signals)
        nursery.start_soon(_every_second, housekeeping)
        nursery.start_soon(_group_commits, operations)
        # Handlers never wait (fs.py), so a second worker task could only take
        # turns with the first; one worker spares the hand-over on every request.
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


async def _group_commits(operations: Operations) -> None:
    """Commit grouped metadata changes that no request has committed in time."""
    while True:
        await trio.sleep(GROUP_SECONDS / 2)
        operations.commit_if_due()


def _settle_anchor(operations: Operations, metadata: Metadata, anchor: Anchor, idle: float) -> None:
    """Once the mount's metadata has not changed for `idle` seconds, merge it
    into meta.db and keep that still until the next change, and have the
    anchor describe it meanwhile: a crash while the mount is quiet (a power
    cut of an idle machine) then leaves a store the next mount checks."""
    if anchor.settled or operations.quiet_for() < idle:
        return
    try:
        if metadata.freeze(anchor.resume):
            anchor.settle()
    except (OSError, sqlite3.Error, EnvfsError) as e:
        _housekeeping_warnings.warn("HSM anchor not settled: %s", e)


def _housekeeping(store: Store, lock: StoreLock, operations: Operations, settle: Callable[[], None]) -> None:
    """Publish the counters in the lock record; wipe an unused prefetched key; settle the anchor
    of a quiet mount; top up the space reserve and SQLite's commit room (which settling empties).

    A backing filesystem that turned read-only or full fails the writes here:
    the daemon goes on serving what it can (an exception here would end the
    mount, and programs would write into the bare directory beneath it).
    """
    operations.drop_stale_prefetch()
    try:
        lock.update(operations.counters())
    except OSError as e:
        _housekeeping_warnings.warn("lock record not updated: %s", e)
    settle()
    try:
        store.keep_commit_room()
        store.keep_reserve()
    except OSError as e:
        log.debug("space reserve: %s", e)


_housekeeping_warnings = ThrottledWarning(USAGE_WARNING_SECONDS, log)


async def _every_second(housekeeping: Callable[[], None]) -> None:
    """Run `housekeeping` every second, and at once on SIGUSR1."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        while True:
            housekeeping()
            with trio.move_on_after(1):
                await signals.__anext__()


def _wake(channel: trio.MemorySendChannel[None]) -> None:
    with contextlib.suppress(trio.WouldBlock):
        channel.send_nowait(None)


async def _run_after_replies(wakeups: trio.MemoryReceiveChannel[None], operations: Operations) -> None:
    """Zero the last read buffers when no further request has done it (an idle mount)."""
    async for _ in wakeups:
        operations.replies_sent()


async def _terminate_on_signals(received: list[int]) -> None:
    """End the session on SIGTERM, SIGINT or SIGHUP, noting the signal in `received`."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            received.append(signum)
            pyfuse3.terminate()


async def _widen_readahead(mountpoint: str) -> None:
    """Widen the mount's readahead window so sequential reads arrive in large requests.

    The kernel sets the window when it handles the reply to FUSE_INIT, so this
    waits until that has happened.
    """
    await trio.sleep(0.5)
    # Not os.stat(): the daemon would wait on its own request, not yet being served.
    entry = find_mount(mountpoint)
    if entry is None:
        return
    path = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.info("cannot set %s: %s", path, e.strerror)


def _escape_option(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


# -- foreground and background ------------------------------------------------------


def mount(store_path: str, mountpoint: str, pin: str, options: MountOptions) -> None:
    """Mount a store; in the background unless options.foreground."""
    store = Store(store_path)
    superblock = store.read_superblock()
    mountpoint = check_mountpoint(mountpoint)
    holder = store.lock_holder()
    if holder is not None:
        raise errors.StoreBusy(f"{store.path} is {busy_with(holder)}")
    log_file = os.path.abspath(options.log_file or embedded.data_dir() / "logs" / f"{superblock.uuid}.log")
    if options.foreground:
        _setup_logging(None, options.debug)
        refusals: list[EnvfsError] = []
        serve(store, superblock, mountpoint, pin, options, lambda e: refusals.append(e) if e else None)
        if refusals:
            raise refusals[0]
        return
    _start_daemon(store, mountpoint, pin, replace(options, log_file=log_file))


# glibc hands freed chunks out again without clearing them, and a PKCS#11
# module's buffers (p11-kit-client's RPC message holding a derived key) are
# freed without being zeroed: the daemon runs with the per-thread cache off and
# every freed chunk overwritten, so no such residue outlives its free().
# Requests of up to 1 MiB come with buffers as large; served from the heap
# rather than a fresh mmap each (glibc's default above 128 KiB), they cost no
# page faults, and they too are overwritten when freed.
MALLOC_TUNABLES = (
    "glibc.malloc.tcache_count=0:glibc.malloc.perturb=165"
    ":glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=33554432"
)


def _start_daemon(store: Store, mountpoint: str, pin: str, options: MountOptions) -> None:
    """Start the daemon as a new process and wait until it is serving or refused."""
    ready_read, ready_write = os.pipe()
    pin_read, pin_write = os.pipe()
    spec = {
        "store": str(store.path), "mountpoint": mountpoint, "options": asdict(options),
        "ready_fd": ready_write, "pin_fd": pin_read,
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "ENVFS_PIN"}
    env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), MALLOC_TUNABLES)))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "envfs.daemon", json.dumps(spec)], env=env, cwd="/",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(ready_write, pin_read), start_new_session=True,
        )  # fmt: skip
    finally:
        os.close(ready_write)
        os.close(pin_read)
    with os.fdopen(pin_write, "wb") as pin_pipe:  # through a pipe: never argv or the environment
        pin_pipe.write(pin.encode())
    answer = _read_all(ready_read).decode(errors="replace").strip()
    if answer == "ok":
        return
    process.wait()
    if not answer:
        raise MountFailed(f"the envfs daemon exited before mounting; see {options.log_file}")
    name, _, message = answer.partition("\t")
    error_type = getattr(errors, name, MountFailed)
    if not (isinstance(error_type, type) and issubclass(error_type, EnvfsError)):
        error_type = MountFailed
    raise error_type(message)


def daemon_main(spec_json: str) -> None:
    """The daemon process (`python -m envfs.daemon SPEC`): serve until unmounted."""
    spec = json.loads(spec_json)
    options = MountOptions(**spec["options"])
    ready_fd = int(spec["ready_fd"])
    code = 0
    try:
        pin = _read_all(int(spec["pin_fd"])).decode()
        _setup_logging(options.log_file, options.debug)
        store = Store(spec["store"])

        def ready(error: EnvfsError | None) -> None:
            message = "ok" if error is None else f"{type(error).__name__}\t{error}"
            os.write(ready_fd, message.encode() + b"\n")
            os.close(ready_fd)

        try:
            superblock = store.read_superblock()
        except EnvfsError as e:
            ready(e)
            return
        serve(store, superblock, spec["mountpoint"], pin, options, ready)
    except BaseException:
        log.exception("daemon failed")
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _setup_logging(log_file: str | None, debug: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler: logging.Handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s envfs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


# -- unmount ---------------------------------------------------------------------


def unmount(mountpoint: str, timeout: float = 60.0) -> None:
    """Unmount and wait until the daemon has flushed, shredded keys and exited."""
    entry = find_mount(mountpoint)
    if entry is None:
        raise NotMounted(f"{os.path.abspath(mountpoint)} is not an envfs mount")
    store = store_of_source(entry.source)
    holder = store.lock_holder()
    pid = holder.get("pid") if holder else None
    # No holder: the daemon is dead, and only a lazy unmount clears its mount.
    lazy = ["-z"] if holder is None else []
    result = subprocess.run(["fusermount3", "-u", *lazy, entry.mountpoint], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "fusermount3 failed"
        raise MountFailed(f"unmounting {entry.mountpoint}: {message}")

    def running() -> bool:
        if isinstance(pid, int):
            return _alive(pid)
        # A read-only mount of a store on read-only media holds the lock
        # without a record of its pid: it has exited when the lock is free.
        return holder is not None and store.lock_holder() is not None

    deadline = time.monotonic() + timeout
    which = f" (pid {pid})" if isinstance(pid, int) else ""
    while running():
        if time.monotonic() > deadline:
            raise MountFailed(f"the envfs daemon{which} did not exit within {timeout:.0f} s")
        time.sleep(0.02)
    left = store.record_of_dead_holder()
    # The daemon unmounted here (or, with no holder, the one that had died before).
    if left is not None and left.get("operation", "mount") == "mount" and (holder is None or left.get("pid") == pid):
        raise UncleanUnmount(
            f"{entry.mountpoint} is unmounted, but its daemon{which} ended without closing the store "
            "(killed or crashed): the next mount recovers it"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
    except OSError as e:
        return e.errno != errno.ENOENT
