"""Key rotation: move a store to a new master key version, safe to kill at any instant.

A rotation to version n takes four steps. Each ends in a state that the next
`envfs rotate` goes on from, and the first three in one a mount can serve:

1. begin: the new master key is generated in the token (or taken from there,
   if an earlier run made it and stopped) and listed in the superblock beside
   the current one. From here on the superblock says "rotating to n".
2. files: every regular file still under an older version is re-encrypted
   into the data file of (n, epoch 0), made durable, and switched by its inode
   row, as a re-key switches epochs (FORMAT.md section 7); the old data files
   go once the switch is checkpointed. A mount in between reads files under
   either version and creates new ones under the current version, which the
   next run moves.
3. metadata: one SQLite transaction re-encrypts every name, symlink target and
   xattr under n's name key, recomputes every row MAC under n's metadata MAC
   key and records n as `metadata_key_version`. Until step 4 a mount refuses
   (`RotationUnfinished`).
4. finish: the superblock names n as current, under n's MAC key.

Retiring (`retire`) destroys the older master keys in the token, which
crypto-shreds whatever copies of data under them survive (backups, freed
disk blocks), and drops them from the superblock.
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .datafile import open_data_file
from .errors import CorruptStore, IntegrityError, RotationUnfinished
from .keys import KeyRing
from .metadata import Inode
from .mount import delete_orphans, remove_stale_data_files
from .names import NameCipher
from .offline import OfflineStore
from .store import KeyVersion, Store

log = logging.getLogger(__name__)

# Files switched per metadata commit and checkpoint (step 2), and the longest
# a batch waits, so that a killed rotation loses little work.
_BATCH_FILES = 256
_BATCH_SECONDS = 2.0

Progress = Callable[[str], None]


@dataclass
class RotationResult:
    store: str
    from_version: int
    to_version: int
    files: int = 0
    bytes: int = 0
    retired: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"{self.store}: on key version {self.to_version} (from {self.from_version}); "
            f"{self.files} files ({self.bytes} bytes) re-encrypted by this run"
        )
        if self.retired:
            text += f"; destroyed key versions {_versions(self.retired)}"
        elif self.kept:
            text += f"; key versions {_versions(self.kept)} still in the token (`envfs retire` destroys them)"
        return text


def rotate(
    path: str, pin: str, *, retire: bool = False, import_key: bytes | None = None, progress: Progress = log.info
) -> RotationResult:
    """Rotate the store to a new key version, or finish the rotation in progress.

    `import_key`: the new master key's 32 bytes, imported instead of generated
    in the token (test vectors, migrations)."""
    with OfflineStore(path, pin, "rotate") as offline:
        superblock = offline.superblock
        target = superblock.rotating_to
        result = RotationResult(str(offline.store.path), superblock.current_key_version, target or 0)
        if target is None:
            offline.keys()  # the token holds the store's keys: checked before anything is created
            target = result.to_version = _begin(offline, import_key, progress)
        else:
            progress(f"resuming the rotation from key version {superblock.current_key_version} to {target}")
            if import_key is not None:
                progress(f"(the key of version {target} is in the token already: the key file is not used)")
        metadata = offline.metadata()
        if metadata.rows_key_version() != target:
            delete_orphans(offline.store, metadata)
            _reencrypt_files(offline, target, result, progress)
            remove_stale_data_files(offline.store, metadata)
            _switch_metadata(offline, target, progress)
        superblock.current_key_version = target
        superblock.mac = offline.keys().superblock_mac(superblock)
        offline.store.write_superblock(superblock)
        progress(f"the store is on key version {target}")
        if retire:
            result.retired = _retire(offline, progress)
        result.kept = [key.version for key in offline.superblock.keys if key.version != target]
        return result


def retire(path: str, pin: str, *, progress: Progress = log.info) -> list[int]:
    """Destroy every master key version but the current one; refused during a rotation."""
    with OfflineStore(path, pin, "retire") as offline:
        rotating_to = offline.superblock.rotating_to
        if rotating_to is not None:
            raise RotationUnfinished(
                f"{offline.store.path}: a rotation to key version {rotating_to} is in progress; "
                "finish it with `envfs rotate` first"
            )
        offline.keys()
        return _retire(offline, progress)


def _begin(offline: OfflineStore, import_key: bytes | None, progress: Progress) -> int:
    """Step 1: the new master key, in the token and listed in the superblock."""
    superblock = offline.superblock
    version = max(key.version for key in superblock.keys) + 1
    label = f"envfs-{superblock.uuid}-v{version}"
    with offline.admin() as admin:
        if admin.has_key(label):
            # Made by an earlier run that stopped before recording it (nothing is
            # under it yet), or put there by the operator ahead of time.
            progress(f"using the key {label} already in the token")
        elif import_key is not None:
            admin.import_master_key(label, import_key)
        else:
            admin.generate_master_key(label)
    keys = offline.keys()
    superblock.keys.append(KeyVersion(version, label, ""))
    try:
        superblock.key(version).check = keys.check_value(version)
        superblock.mac = keys.superblock_mac(superblock)
        offline.store.write_superblock(superblock)
    except BaseException:
        superblock.keys.pop()
        raise
    progress(f"rotating from key version {superblock.current_key_version} to {version} (key {label})")
    return version


def _reencrypt_files(offline: OfflineStore, version: int, result: RotationResult, progress: Progress) -> None:
    """Step 2: every regular file under another version moves to (version, epoch 0)."""
    store, keys, metadata = offline.store, offline.keys(), offline.metadata()
    todo = metadata.files_not_under(version)
    if todo:
        progress(f"re-encrypting {len(todo)} files")
    switched: list[tuple[Inode, int, int]] = []  # with the (version, epoch) they leave
    started = time.monotonic()

    def switch() -> None:
        """Commit the batch's inode rows, make them durable, then drop the old data files."""
        nonlocal started
        for inode_id in {inode.id & 0xFF: inode.id for inode, _, _ in switched}.values():
            store.sync_data_dir(inode_id)
        with metadata.transaction():
            for inode, _, _ in switched:
                metadata.save_inode(inode)
        # The old files may go only once the switch is durable (as for a re-key).
        metadata.sync()
        for inode, old_version, old_epoch in switched:
            store.remove_data_file(inode.id, old_version, old_epoch)
        result.files += len(switched)
        progress(f"re-encrypted {result.files} of {len(todo)} files")
        switched.clear()
        started = time.monotonic()

    try:
        for inode_id in todo:
            inode = metadata.get_inode(inode_id)
            if inode is None or not stat.S_ISREG(inode.mode) or inode.key_version == version:
                continue
            old_version, old_epoch = inode.key_version, inode.key_epoch
            try:
                writes = _copy_data(store, keys, inode, version)
            except IntegrityError as e:
                raise CorruptStore(
                    f"{e}; the rotation stopped there: restore or delete that file (`envfs fsck` lists "
                    "the damage) and run `envfs rotate` again"
                ) from e
            inode.key_version, inode.key_epoch, inode.block_writes = version, 0, writes
            switched.append((inode, old_version, old_epoch))
            result.bytes += inode.size
            if len(switched) >= _BATCH_FILES or time.monotonic() - started >= _BATCH_SECONDS:
                switch()
    finally:
        if switched:
            switch()  # what is done stays done, whatever stopped the loop


def _copy_data(store: Store, keys: KeyRing, inode: Inode, version: int) -> int:
    """Re-encrypt a file's data into its (version, epoch 0) data file, durably; the blocks written."""
    if inode.size == 0:
        return 0  # an empty file needs no data file (FORMAT.md 4.1)
    old = open_data_file(
        keys.file_cipher(inode.id, inode.key_version, inode.key_epoch),
        lambda: store.open_data_file(inode.id, inode.key_version, inode.key_epoch, create=False),
        inode.size,
    )
    try:
        # A size of 0 cuts what an interrupted run left in the file.
        new = open_data_file(
            keys.file_cipher(inode.id, version, 0), lambda: store.open_data_file(inode.id, version, 0, create=True), 0
        )
        try:
            writes = old.copy_to(new, inode.size)
        except BaseException:
            new.close()
            store.remove_data_file(inode.id, version, 0)
            raise
        new.close()
        return writes
    finally:
        old.close()


def _switch_metadata(offline: OfflineStore, version: int, progress: Progress) -> None:
    """Step 3: names and row MACs under the new version, in one transaction."""
    keys, metadata = offline.keys(), offline.metadata()
    old_names = keys.name_cipher(metadata.rows_key_version())
    new_names = keys.name_cipher(version)
    try:
        try:
            metadata.rekey_rows(
                keys.metadata_mac(version), version,
                name=lambda parent, ct: new_names.encrypt_name(parent, old_names.decrypt_name(parent, ct)),
                target=lambda inode, ct: new_names.encrypt_target(inode, old_names.decrypt_target(inode, ct)),
                xattr=lambda inode, name_ct, value_ct: _reencrypt_xattr(old_names, new_names, inode, name_ct, value_ct),
            )  # fmt: skip
        except IntegrityError as e:
            raise CorruptStore(f"{e}: the metadata stays under the old key; `envfs fsck` lists the damage") from e
        metadata.sync()
    finally:
        old_names.close()
        new_names.close()
    progress(f"names, symlink targets, xattrs and metadata MACs are under key version {version}")


def _reencrypt_xattr(
    old: NameCipher, new: NameCipher, inode: int, name_ct: bytes, value_ct: bytes
) -> tuple[bytes, bytes]:
    name = old.decrypt_xattr_name(inode, name_ct)
    value = old.decrypt_xattr_value(inode, name_ct, value_ct)
    new_name_ct = new.encrypt_xattr_name(inode, name)
    return new_name_ct, new.encrypt_xattr_value(inode, new_name_ct, value)


def _retire(offline: OfflineStore, progress: Progress) -> list[int]:
    """Destroy the master keys of every version but the current one, then drop them from the superblock."""
    superblock = offline.superblock
    current = superblock.current_key_version
    old = [key for key in superblock.keys if key.version != current]
    if not old:
        progress("no older key version to retire")
        return []
    metadata = offline.metadata()
    for key in old:
        if metadata.has_files_under(key.version):
            raise CorruptStore(f"files are still under key version {key.version}: nothing retired")
    remove_stale_data_files(offline.store, metadata)
    retired = replace(superblock, keys=[superblock.key(current)])
    retired.mac = offline.keys().superblock_mac(retired)
    # Keys first: a run stopped in between leaves versions listed whose keys are
    # gone (a mount skips those), never a key the superblock no longer names.
    with offline.admin() as admin:
        for key in old:
            if admin.has_key(key.label):
                admin.destroy_key(key.label)
                progress(f"destroyed master key {key.label} (version {key.version})")
    offline.store.write_superblock(retired)
    offline.superblock = retired
    return [key.version for key in old]


def _versions(versions: list[int]) -> str:
    return ", ".join(str(v) for v in versions)
