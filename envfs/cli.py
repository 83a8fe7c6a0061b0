"""The `envfs` command: argument parsing and the operator commands.

The only place that exits the process: an `EnvfsError` becomes its message
on one line of stderr and its exit code (README, "Exit codes").
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, TypeVar

from . import embedded
from .anchor import Anchor
from .errors import DamageFound, EnvfsError, PinError, UsageError
from .hsm import HsmAdmin
from .keys import KeyRing
from .metadata import ROOT_INODE, Metadata
from .mount import (
    ANCHOR_IDLE_SECONDS,
    MAX_SPIN_MICROSECONDS,
    SPIN_MICROSECONDS,
    MountOptions,
    envfs_mounts,
    find_mount,
    hsm_for,
    mount,
    store_of_source,
    token_for,
    unmount,
)
from .offline import OfflineStore
from .store import HsmLocator, KeyVersion, Store, Superblock

T = TypeVar("T")

log = logging.getLogger("envfs")


def read_pin(pin_file: str | None) -> str:
    """The token PIN: --pin-file, then ENVFS_PIN, then a prompt on a terminal."""
    if pin_file:
        try:
            with open(pin_file) as f:
                pin = f.readline().rstrip("\r\n")
        except OSError as e:
            raise PinError(f"cannot read PIN file {pin_file}: {e.strerror}") from e
    elif os.environ.get("ENVFS_PIN"):
        pin = os.environ["ENVFS_PIN"]
    elif sys.stdin.isatty():
        pin = getpass.getpass("Token PIN: ")
    else:
        raise PinError("no PIN: set ENVFS_PIN, pass --pin-file FILE, or run on a terminal")
    if not pin:
        raise PinError("the PIN is empty")
    return pin


def _parse_pkcs11_uri(uri: str) -> tuple[str | None, str | None]:
    """module-path and token from an RFC 7512 PKCS#11 URI."""
    from urllib.parse import unquote

    if not uri.startswith("pkcs11:"):
        raise UsageError(f"not a PKCS#11 URI: {uri}")
    values: dict[str, str] = {}
    for part in uri[len("pkcs11:") :].replace("?", ";").split(";"):
        key, _, value = part.partition("=")
        values[key] = unquote(value)
    return values.get("module-path"), values.get("token")


def cmd_init(args: argparse.Namespace) -> None:
    store = Store(args.store)
    module, token = args.pkcs11_module, args.token
    if args.pkcs11_uri:
        module, token = _parse_pkcs11_uri(args.pkcs11_uri)
    if (module is None) != (token is None):
        raise UsageError("a PKCS#11 module needs a token label and the other way round")
    store.check_new()
    pin = read_pin(args.pin_file)
    store_uuid = uuid.uuid4()
    label = f"envfs-{store_uuid}-v1"
    if module is None:
        locator = HsmLocator(type="embedded", token=embedded.TOKEN_LABEL)
        token_store = embedded.EmbeddedToken()
        if not token_store.exists():
            token_store.create(os.environ.get("ENVFS_SO_PIN") or pin, pin)
            print(f"created the embedded SoftHSM2 token in {token_store.directory}", file=sys.stderr)
    else:
        locator = HsmLocator(type="pkcs11", token=token, module=os.path.abspath(module))
    superblock = Superblock(
        uuid=store_uuid,
        hsm=locator,
        keys=[KeyVersion(1, label, "")],
        current_key_version=1,
    )
    if args.rekey_after is not None:
        superblock.rekey_after_block_writes = args.rekey_after
    created = not store.path.exists()
    os.umask(0o077)
    try:
        store.prepare_new()
        with ExitStack() as stack:
            access = token_for(superblock, stack)
            # Key management first, through python-pkcs11, which finalizes the module
            # when done: a module has one state per process, and derivation (`Hsm`)
            # initializes it again on its own terms.
            admin = HsmAdmin(access.module, access.token, pin)
            try:
                if args.import_master_key_file:
                    admin.import_master_key(label, _read_master_key(args.import_master_key_file))
                else:
                    admin.generate_master_key(label)
            finally:
                admin.close()
            hsm = hsm_for(access, stack, pin)
            keys = KeyRing(hsm, superblock)
            superblock.keys[0].check = keys.check_value(1)
            superblock.mac = keys.superblock_mac(superblock)
            metadata = Metadata(store.metadata_path, keys.metadata_mac(), create=True)
            try:
                now = time.time_ns()
                root = metadata.create_inode(
                    mode=stat.S_IFDIR | 0o755, uid=os.getuid(), gid=os.getgid(), nlink=2, rdev=0, size=0,
                    atime_ns=now, mtime_ns=now, ctime_ns=now, key_version=1, key_epoch=0, block_writes=0,
                )  # fmt: skip
                assert root.id == ROOT_INODE
                metadata.set_setting("mounted", 0)
                metadata.sync()
            finally:
                metadata.close()
            Anchor(keys, store).create()
            store.lock_path.touch(mode=0o600)  # so a refused mount creates nothing
            store.write_superblock(superblock)
    except BaseException:
        if created:
            shutil.rmtree(store.path, ignore_errors=True)
        else:
            for child in store.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    print(f"initialised envfs store {store.path} (uuid {store_uuid}, key {label})")


def _read_master_key(path: str) -> bytes:
    """A 32-byte master key as 64 hex digits (test vectors and migrations only)."""
    try:
        with open(path) as f:
            text = f.read().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read a hex master key from {path}: {e}") from e
    if len(key) != 32:
        raise UsageError(f"{path}: the master key must be 32 bytes (64 hex digits), not {len(key)}")
    return key


def cmd_mount(args: argparse.Namespace) -> None:
    if args.copy and not args.read_only:
        raise UsageError("--copy mounts an older copy of a store read-only: it needs --read-only")
    if args.spin is not None and not 0 <= args.spin <= MAX_SPIN_MICROSECONDS:
        raise UsageError(f"--spin must be a number of microseconds from 0 to {MAX_SPIN_MICROSECONDS}")
    options = MountOptions(
        foreground=args.foreground, allow_other=args.allow_other, default_permissions=args.default_permissions,
        debug=args.debug, log_file=args.log,
        rekey_after=_rekey_override(), read_only=args.read_only, copy=args.copy, anchor_idle=_anchor_idle(),
        spin=args.spin,
    )  # fmt: skip
    store = Store(args.store)
    store.read_superblock()  # refuse a non-store before asking for a PIN
    mount(args.store, args.mountpoint, read_pin(args.pin_file), options)


def _tuning(name: str, convert: Callable[[str], T], valid: Callable[[T], bool], rule: str) -> T | None:
    """A setting for tests from the environment variable `name`; None where it is unset."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        setting = convert(value)
    except ValueError as e:
        raise UsageError(f"{name} must be {rule}, not {value!r}") from e
    if not valid(setting):
        raise UsageError(f"{name} must be {rule}")
    return setting


def _rekey_override() -> int | None:
    """ENVFS_REKEY_AFTER: a lower nonce bound for tests; it can never raise the store's."""
    return _tuning("ENVFS_REKEY_AFTER", int, lambda bound: bound >= 16, "a number of at least 16")


def _anchor_idle() -> float:
    """ENVFS_ANCHOR_IDLE: seconds a mount stays quiet before its anchor is settled (tests; default 5)."""
    seconds = _tuning("ENVFS_ANCHOR_IDLE", float, lambda s: 0.5 <= s <= 3600, "a number of seconds from 0.5 to 3600")
    return ANCHOR_IDLE_SECONDS if seconds is None else seconds


def cmd_unmount(args: argparse.Namespace) -> None:
    unmount(args.mountpoint, timeout=args.timeout)


def _status_of(store: Store) -> dict[str, Any]:
    superblock = store.read_superblock()
    holder = store.lock_holder()
    info: dict[str, Any] = {
        "store": str(store.path),
        "uuid": str(superblock.uuid),
        "format_version": superblock.format_version,
        "block_size": superblock.block_size,
        "hsm": {k: v for k, v in vars(superblock.hsm).items() if v is not None},
        "key_versions": [{"version": k.version, "label": k.label} for k in superblock.keys],
        "current_key_version": superblock.current_key_version,
        "mounted": holder is not None and holder.get("operation", "mount") == "mount",
    }
    if superblock.rotating_to is not None:
        info["rotating_to"] = superblock.rotating_to
    if holder:
        if info["mounted"]:
            info["mountpoint"] = holder.get("mountpoint")
        else:
            info["busy"] = f"envfs {holder.get('operation')}"
        info["pid"] = holder.get("pid")
        if holder.get("counters"):
            info["counters"] = holder["counters"]
    try:
        import sqlite3

        # Unmounted: immutable, so that no -wal or -shm file is left in the store.
        mode = "mode=ro" if holder else "immutable=1"
        db = sqlite3.connect(f"file:{store.metadata_path}?{mode}", uri=True)
        try:
            info["inodes"], info["bytes"] = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM inodes").fetchone()
            info["files"] = db.execute("SELECT count(*) FROM inodes WHERE (mode & 61440) = 32768").fetchone()[0]
        finally:
            db.close()
    except Exception as e:  # noqa: BLE001 - status reports what it can
        info["metadata_error"] = str(e)
    return info


def cmd_status(args: argparse.Namespace) -> None:
    if args.path is None:
        reports = []
        for m in envfs_mounts():
            try:
                reports.append(_status_of(store_of_source(m.source)))
            except EnvfsError as e:  # a dead mount whose store is gone
                reports.append({"mountpoint": m.mountpoint, "store": m.source.removeprefix("envfs:"), "error": str(e)})
        if not reports and not args.json:
            print("no envfs store is mounted")
    else:
        entry = find_mount(args.path)
        reports = [_status_of(store_of_source(entry.source) if entry else Store(args.path))]
    if args.json:
        print(json.dumps(reports if args.path is None else reports[0], indent=2))
        return
    for info in reports:
        for key, value in info.items():
            if key == "key_versions":
                value = ", ".join(f"v{k['version']} ({k['label']})" for k in value)
            elif key in ("counters", "hsm"):
                value = " ".join(f"{k}={v}" for k, v in value.items())
            print(f"{key + ':':<20} {value}")
        print()


def cmd_rotate(args: argparse.Namespace) -> None:
    from .rotate import rotate

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    key = _read_master_key(args.import_master_key_file) if args.import_master_key_file else None
    print(rotate(args.store, read_pin(args.pin_file), retire=args.retire, import_key=key, progress=progress))


def cmd_retire(args: argparse.Namespace) -> None:
    from .rotate import retire

    retired = retire(args.store, read_pin(args.pin_file), progress=lambda line: print(line, file=sys.stderr))
    versions = ", ".join(str(v) for v in retired) or "none"
    print(f"{Store(args.store).path}: retired key versions: {versions}")


def cmd_fsck(args: argparse.Namespace) -> None:
    from .fsck import check_store

    with OfflineStore(args.store, read_pin(args.pin_file), "fsck") as offline:
        summary = check_store(offline, report=lambda line: print(line, flush=True))
    print(summary.text())
    if summary.damaged:
        raise DamageFound(f"{args.store}: {summary.damaged} damaged or inconsistent item(s) found")


def cmd_reanchor(args: argparse.Namespace) -> None:
    with OfflineStore(args.store, read_pin(args.pin_file), "reanchor") as offline:
        offline.accept_store = True
        offline.metadata()
    print(f"{Store(args.store).path}: the HSM anchor now takes the store as it is ('envfs fsck' checks it)")


def _tool_parser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand of the operator tools: an unmounted STORE and the token's PIN."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.add_argument("store")
    p.add_argument("--pin-file", metavar="FILE")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="envfs", description="Encrypted filesystem keyed by an HSM.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a new store (and the embedded token if needed)")
    p.add_argument("store")
    p.add_argument("--pkcs11-module", metavar="PATH", help="PKCS#11 module of a production HSM")
    p.add_argument("--token", metavar="LABEL", help="token label in that module")
    p.add_argument("--pkcs11-uri", metavar="URI", help="pkcs11:token=LABEL;module-path=PATH")
    p.add_argument("--pin-file", metavar="FILE")
    p.add_argument("--rekey-after", type=int, metavar="N", help="block writes per file key (nonce bound)")
    p.add_argument(
        "--import-master-key-file", metavar="FILE",
        help="import this hex master key instead of generating one in the HSM (test vectors, migration)",
    )  # fmt: skip
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("mount", help="mount a store")
    p.add_argument("store")
    p.add_argument("mountpoint")
    p.add_argument("-f", "--foreground", action="store_true")
    p.add_argument(
        "--allow-other", action="store_true",
        help="let every user in (FUSE allow_other), with the kernel's permission checks",
    )  # fmt: skip
    p.add_argument(
        "--default-permissions", action="store_true",
        help="the kernel's permission checks also where only root can enter (without --allow-other): "
        "they then hold back root processes that dropped their capabilities, at a request per create",
    )  # fmt: skip
    p.add_argument(
        "-r", "--read-only", action="store_true",
        help="change nothing in the store (it may be on read-only media): no writes, no access times",
    )  # fmt: skip
    p.add_argument(
        "--copy", action="store_true",
        help="with --read-only: an older copy of the store (a backup, a snapshot), not checked against "
        "the store's anchor in the HSM, which it leaves as it is",
    )  # fmt: skip
    p.add_argument(
        "--spin", type=int, metavar="MICROSECONDS",
        help=f"how long the daemon keeps looking for the next request after a reply before it sleeps: "
        f"less latency for more CPU (default: {SPIN_MICROSECONDS} with two CPUs or more, 0 with one; "
        f"at most {MAX_SPIN_MICROSECONDS})",
    )  # fmt: skip
    p.add_argument("--pin-file", metavar="FILE")
    p.add_argument("--log", metavar="FILE", help="daemon log (default: $XDG_DATA_HOME/envfs/logs/UUID.log)")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("unmount", aliases=["umount"], help="unmount and wait for the daemon to exit")
    p.add_argument("mountpoint")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_unmount)

    p = _tool_parser(sub, "rotate", "move the store to a new master key version (resumes an interrupted one)")
    p.add_argument("--retire", action="store_true", help="then destroy the older key versions in the token")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--import-master-key-file", metavar="FILE",
        help="import this hex master key as the new version instead of generating one (test vectors, migration)",
    )  # fmt: skip
    p.set_defaults(func=cmd_rotate)

    _tool_parser(sub, "retire", "destroy every master key version but the current one").set_defaults(func=cmd_retire)
    _tool_parser(sub, "fsck", "read and authenticate the whole store; report damage").set_defaults(func=cmd_fsck)
    _tool_parser(
        sub, "reanchor", "accept the store as it is now (after restoring it from a backup on purpose)"
    ).set_defaults(func=cmd_reanchor)

    p = sub.add_parser("status", help="show a store or mount (all mounts without an argument)")
    p.add_argument("path", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("XDG_DATA_HOME"):  # the daemon changes to "/": keep the token path valid
        os.environ["XDG_DATA_HOME"] = os.path.abspath(os.environ["XDG_DATA_HOME"])
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="envfs: %(message)s")
    try:
        args.func(args)
    except EnvfsError as e:
        print(f"envfs: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`envfs status | head`): say nothing more, as
        # other command-line tools do. stdout is pointed at /dev/null so that
        # Python's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as e:
        # What the system refused (a full or read-only disk, a permission): one line.
        where = f" ({e.filename})" if e.filename else ""
        print(f"envfs: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
