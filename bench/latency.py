"""One request at a time: the cost of single metadata calls on envfs, gocryptfs
and a plain directory, side by side (docs/PERFORMANCE.md, "Where the time goes").

Each call below is one FUSE request on a FUSE mount (the kernel caches nothing
that would answer it), timed end to end in a Python loop, so the figures
show a filesystem's per-request cost without the batching that tar or cp
allow. As root, after `scripts/test` or `scripts/setup`:

    .venv/bin/python bench/latency.py [--count N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402 - the side-by-side benchmark's set-up of each filesystem


def per_call(n: int, call: Callable[[int], object]) -> float:
    """Microseconds per call of `call(i)` for i in range(n)."""
    start = time.perf_counter()
    for i in range(n):
        call(i)
    return (time.perf_counter() - start) / n * 1e6


def missing_xattr(path: Path) -> Callable[[int], object]:
    def call(_: int) -> None:
        try:
            os.getxattr(path, "security.capability")
        except OSError:
            pass

    return call


def missing_name(directory: Path) -> Callable[[int], object]:
    def call(i: int) -> None:
        try:
            os.stat(directory / f"missing-{i}")
        except FileNotFoundError:
            pass

    return call


def calls(root: Path, n: int) -> dict[str, float]:
    work = root / "latency"
    work.mkdir()
    file = work / "file"
    file.write_bytes(b"x")
    files = work / "files"
    files.mkdir()
    figures = {
        "getxattr of a missing xattr": per_call(n, missing_xattr(file)),
        "chmod": per_call(n, lambda i: os.chmod(file, 0o600 | (i & 0o77))),
        "utime": per_call(n, lambda i: os.utime(file, ns=(i, i))),
        "stat of a missing name": per_call(n, missing_name(work)),
        "create + close": per_call(n // 4, lambda i: os.close(os.open(files / f"f{i}", os.O_CREAT | os.O_WRONLY))),
        "unlink": per_call(n // 4, lambda i: os.unlink(files / f"f{i}")),
    }
    shutil.rmtree(work)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="calls per figure (a quarter for create/unlink)")
    parser.add_argument("--envfs", default=str(Path(sys.executable).parent / "envfs"))
    args = parser.parse_args()
    notes: list[str] = []
    results: dict[str, dict[str, float]] = {}
    work = Path(tempfile.mkdtemp(prefix="envfs-latency-"))
    try:
        with ExitStack() as stack:
            backing = bench.setup_backing(work, False, stack)
            targets = [bench.setup_plain(backing), bench.setup_envfs(args.envfs, work, backing, stack)]
            gocryptfs = bench.ensure_gocryptfs(notes)
            if gocryptfs:
                targets.append(bench.setup_gocryptfs(gocryptfs, work, backing, stack))
            for target in targets:
                results[target.name] = calls(target.root, args.count)
    finally:
        bench.remove_work_dir(work)
    names = list(results)
    print(f"{'µs per call':<28}" + "".join(f"{name:>12}" for name in names))
    for call in results[names[0]]:
        print(f"{call:<28}" + "".join(f"{results[name][call]:>12.1f}" for name in names))
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
