"""The same system calls on envfs and on ext4 give the same results.

`syscall_battery.py` runs 158 calls (names, links, renames, special files,
attributes, xattrs, holes, fallocate modes, copies, locks, mmap, what root may do
where modes deny, and what an unprivileged user may do) in a directory of the filesystem the tests run on, which
must be ext4, and in an envfs mount; every result must match but the few that
envfs answers differently on purpose, which are checked for their own answers.
`namespace_fuzz.py` runs random namespace operations in both, side by side, and
compares the times each changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Envfs
from namespace_fuzz import NamespaceFuzz

BATTERY = Path(__file__).with_name("syscall_battery.py")

# Where envfs differs from ext4 on purpose, with what envfs answers.
KNOWN_DIFFERENCES = {
    # pyfuse3 has no handler for FUSE_TMPFILE: programs fall back to a named file.
    "O_TMPFILE": "ENOTSUP",
    # Shifting every block after a range would re-encrypt each (their index is in their AAD).
    "collapse a range": "ENOTSUP",
    "insert a range": "ENOTSUP",
    # A hole is a whole block (4 KiB of plaintext) with no ciphertext; the last block of
    # this file has some, so the first hole from inside it is the end of the file.
    "SEEK_HOLE in the last block, a hole on ext4": "70000",
}


def battery(directory: Path, *flags: str) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, str(BATTERY), str(directory), *flags],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(result.stdout)


def filesystem_type(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()


def ext4_directory(tmp_path: Path) -> Path:
    """A directory on ext4 for the reference answers; the test skips where the tests run elsewhere."""
    reference = tmp_path / "ext4"
    reference.mkdir()
    if filesystem_type(reference) != "ext2/ext3":  # how stat(1) names ext4
        pytest.skip(f"the tests run on {filesystem_type(reference)}, not ext4")
    return reference


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "mount_options",
    [
        ["--allow-other"],  # the battery's unprivileged calls run as nobody
        [],  # only root may enter: the kernel checks no permissions (see `kernel_checks_permissions`)
        ["--default-permissions"],  # only root may enter, the kernel's checks kept
    ],
    ids=["allow-other", "root-only", "root-only-default-permissions"],
)
def test_system_calls_answer_as_on_ext4(store: Envfs, tmp_path: Path, mount_options: list[str]) -> None:
    reference = ext4_directory(tmp_path)
    store.mount(*mount_options)
    flags = [] if "--allow-other" in mount_options else ["--root-only"]
    try:
        expected, got = battery(reference, *flags), battery(store.mnt, *flags)
    finally:
        store.unmount()
    assert expected.keys() == got.keys()
    differences = {
        name: {"ext4": expected[name], "envfs": got[name]}
        for name in expected
        if got[name] != expected[name] and name not in KNOWN_DIFFERENCES
    }
    assert not differences, json.dumps(differences, indent=1)
    assert {name: got[name] for name in KNOWN_DIFFERENCES} == KNOWN_DIFFERENCES


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_namespace_operations_answer_as_on_ext4(store: Envfs, tmp_path: Path, seed: int) -> None:
    """3,000 random makes, removes, renames, links, opens and uses of held descriptors:
    every answer as ext4's, the trees the same as they go, after a remount, and fsck clean."""
    reference = ext4_directory(tmp_path)
    store.mount()
    subject = store.mnt / "tree"
    subject.mkdir()
    fuzz = NamespaceFuzz((reference, subject), seed)
    try:
        fuzz.run(3000)
        fuzz.compare_trees(" at the end")
    finally:
        fuzz.close_held()
    store.remount()
    fuzz.compare_trees(" after a remount")
    store.unmount()
    result = store.run("fsck", str(store.store), check=False)
    assert result.returncode == 0 and "leftovers: 0" in result.stdout, result.stdout + result.stderr
    done = {name: fuzz.outcomes[f"{name}: ok"] for name in ("rename", "link", "unlink", "rmdir", "write", "setxattr")}
    assert min(done.values()) >= 5, done  # the draws reached every kind of change


@pytest.mark.timeout(300)
def test_random_namespace_operations_change_the_times_ext4_changes(store: Envfs, tmp_path: Path) -> None:
    """500 random operations, each of which must change the modification and change
    times of the same names as on ext4 (FIFOs aside: see `namespace_fuzz.stamps`)."""
    reference = ext4_directory(tmp_path)
    store.mount()
    subject = store.mnt / "tree"
    subject.mkdir()
    fuzz = NamespaceFuzz((reference, subject), seed=11)
    try:
        fuzz.run(500, times=True)
    finally:
        fuzz.close_held()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("times", [False, True])
def test_random_namespace_operations_of_three_users_answer_as_on_ext4(
    store: Envfs, tmp_path: Path, times: bool
) -> None:
    """Root and two users who share a group make, remove, rename, link, chmod, chown,
    utime and open in one tree: every EACCES and EPERM as on ext4 (and with `times`,
    every change of the times), the same trees, and fsck clean."""
    reference = ext4_directory(tmp_path)
    store.mount("--allow-other")
    subject = store.mnt / "tree"
    subject.mkdir()
    fuzz = NamespaceFuzz((reference, subject), seed=21 + times, users=True)
    try:
        fuzz.run(400 if times else 1500, times=times)
        fuzz.compare_trees(" at the end")
    finally:
        fuzz.close_held()
    store.unmount()
    result = store.run("fsck", str(store.store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    refused = sum(n for outcome, n in fuzz.outcomes.items() if outcome.endswith(("EACCES", "EPERM")))
    assert refused >= 20, fuzz.outcomes  # the users were refused often enough to test it
