"""Stress: many threads of random operations at once on one mount.

Namespace threads (`namespace_fuzz.py` with one root) make, remove, rename and
link names in one shared tree while fsx threads (`fsx.py`) write, truncate and
map their own files. No answer may be EIO or ENOTCONN, the fsx files must match
their models, the link counts must be what the tree says, the tree must be
the same after a remount, and fsck must be clean.
"""

from __future__ import annotations

import collections
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fsx import Exerciser
from helpers import Envfs
from namespace_fuzz import NamespaceFuzz, tree


def link_count_errors(root: Path) -> list[str]:
    """Where a link count disagrees with the names in the tree (nothing held open)."""
    names: collections.Counter[int] = collections.Counter()
    subdirectories: collections.Counter[str] = collections.Counter()
    nlink: dict[int, tuple[str, int]] = {}
    for directory, dirs, files in os.walk(root):
        subdirectories[directory] = len([d for d in dirs if not os.path.islink(os.path.join(directory, d))])
        for name in dirs + files:
            st = os.lstat(os.path.join(directory, name))
            if not stat.S_ISDIR(st.st_mode):
                names[st.st_ino] += 1
                nlink[st.st_ino] = (os.path.join(directory, name), st.st_nlink)
    errors = [f"{path}: nlink {n}, {names[ino]} names" for ino, (path, n) in nlink.items() if n != names[ino]]
    for directory, count in subdirectories.items():
        if os.lstat(directory).st_nlink != 2 + count:
            errors.append(f"{directory}: nlink {os.lstat(directory).st_nlink}, {count} subdirectories")
    return errors


def run_threads(jobs: list[Callable[[], None]]) -> None:
    failures: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # raised again in the test's thread
            failures.append(e)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


@pytest.mark.timeout(400)
def test_namespace_and_data_threads_at_once(store: Envfs) -> None:
    stress(store, seed=100, operations=2000)


def stress(store: Envfs, seed: int, operations: int) -> None:
    """Four namespace threads in one tree and two fsx threads, `operations` each."""
    store.mount()
    shared = store.mnt / "shared"
    shared.mkdir()
    fuzzers = [NamespaceFuzz((shared,), seed + i) for i in range(4)]
    exercisers = [Exerciser(store.mnt / f"data{i}", seed + 10 + i, max_size=512 * 1024) for i in range(2)]

    def fuzz(fuzzer: NamespaceFuzz) -> None:
        try:
            fuzzer.run(operations)
        finally:
            fuzzer.close_held()

    def exercise(exerciser: Exerciser) -> None:
        exerciser.run(operations)
        exerciser.check_all()

    run_threads(
        [lambda f=f: fuzz(f) for f in fuzzers]  # type: ignore[misc]
        + [lambda e=e: exercise(e) for e in exercisers]  # type: ignore[misc]
    )
    for exerciser in exercisers:
        exerciser.close()
    assert sum(f.outcomes["rename: ok"] for f in fuzzers) >= operations // 20
    assert link_count_errors(shared) == []
    before = tree(shared)
    store.remount()
    assert tree(shared) == before
    for exerciser in exercisers:
        exerciser.reopen_after_remount()
        exerciser.close()
    assert "ERROR" not in store.log_text() and "Traceback" not in store.log_text(), store.log_text()[-3000:]
    store.unmount()
    result = store.run("fsck", str(store.store), check=False)
    assert result.returncode == 0 and "leftovers: 0" in result.stdout, result.stdout + result.stderr
