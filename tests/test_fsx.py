"""fsx on envfs: random operations on files, checked against a model of their bytes.

The model is `fsx.Exerciser`'s; these tests run it through remounts, with the
nonce bound low enough that files are re-keyed under it, with several files
at once, and across a killed daemon (what the file may hold then is what some
state since its last fsync held, block by block; fsck finds nothing wrong).
"""

from __future__ import annotations

import functools
import os
import random

import pytest
from fsx import Exerciser, possible_after_crash
from helpers import Envfs, run_threads


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_through_remounts(store: Envfs, seed: int) -> None:
    store.mount()
    exerciser = Exerciser(store.mnt / "f", seed)
    for _ in range(3):
        exerciser.run(2500)
        exerciser.check_all()
        exerciser.close()
        store.remount()
        exerciser.reopen_after_remount()
    exerciser.close()


@pytest.mark.timeout(300)
def test_random_operations_while_files_are_rekeyed(store: Envfs) -> None:
    """A nonce bound of 200 block writes: the file is re-encrypted under a new key
    epoch every few dozen operations, between and around all the others."""
    store.mount(env=dict(store.env, ENVFS_REKEY_AFTER="200"))
    exerciser = Exerciser(store.mnt / "f", seed=3, max_size=256 * 1024)
    exerciser.run(3000)
    exerciser.check_all()
    exerciser.close()
    rekeys = store.counters().get("rekeys", 0)
    store.remount()
    exerciser.reopen_after_remount()
    exerciser.close()
    assert rekeys >= 10, rekeys


@pytest.mark.timeout(300)
def test_random_operations_on_four_files_at_once(store: Envfs) -> None:
    store.mount()
    exercisers = [Exerciser(store.mnt / f"f{seed}", seed, max_size=512 * 1024) for seed in range(10, 14)]

    def run(exerciser: Exerciser) -> None:
        exerciser.run(2500)
        exerciser.check_all()

    run_threads([functools.partial(run, e) for e in exercisers])
    for exerciser in exercisers:
        exerciser.close()
    store.remount()
    for exerciser in exercisers:
        exerciser.reopen_after_remount()
        exerciser.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [21, 22, 23])
def test_a_killed_daemon_leaves_a_state_since_the_last_fsync(store: Envfs, seed: int) -> None:
    """Operations, an fsync, more operations, then SIGKILL: after the next mount the
    file reads back block by block as one of the states since that fsync (with the
    writeback cache, what the kernel had not yet sent is lost), and fsck is clean."""
    rng = random.Random(seed)
    store.mount()
    exerciser = Exerciser(store.mnt / "f", seed, max_size=256 * 1024)
    for round_ in range(4):
        exerciser.run(rng.randrange(50, 400))
        exerciser.step(exerciser.fsync)
        exerciser.run(rng.randrange(0, 30))
        snapshots = exerciser.snapshots
        store.kill_daemon()
        try:
            exerciser.close()
        except OSError:
            pass  # the mount is dead
        result = store.run("fsck", str(store.store), check=False)
        assert result.returncode == 0, f"round {round_}: {result.stdout}{result.stderr}"
        store.mount()
        content = (store.mnt / "f").read_bytes()
        why = possible_after_crash(content, snapshots)
        assert why is None, f"seed {seed}, round {round_}: {why}"
        # Go on from what the file holds now.
        exerciser.model = bytearray(content)
        exerciser.snapshots = [content]
        exerciser.fd = os.open(exerciser.path, os.O_RDWR)
    exerciser.close()


def test_possible_after_crash_rejects_what_no_state_held() -> None:
    old, new = bytes(8192), b"\1" * 12288
    assert possible_after_crash(new[:8192] + b"", [old, new]) is None  # some blocks of the write
    assert possible_after_crash(new[:4096] + old[4096:], [old, new]) is None
    assert possible_after_crash(new[:6000], [bytes(6000), new]) is None  # an older size, newer blocks
    assert possible_after_crash(b"\2" * 8192, [old, new]) == "block 0 matches no state since the last fsync"
    assert possible_after_crash(bytes(16384), [old, new]).startswith("size 16384 is outside")
