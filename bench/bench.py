"""Side-by-side benchmark: envfs against a plain directory and gocryptfs.

Run it through `scripts/bench` (as root). One run mounts, on the same kind of
backing storage (a fresh tmpfs by default, `--dir DIR` for a disk), an envfs
store, a plain directory and a gocryptfs volume, runs every workload on each of
them in turn (interleaved), `--runs` times, and prints the median of every
figure with the ratios envfs/gocryptfs and envfs/plain. Progress goes to
stderr, the table to stdout, `--json FILE` writes the same figures.

Workloads (see docs/PERFORMANCE.md): sequential dd write (bs=1M, bs=4k) and
read; fio random 4 KiB reads and writes; the gocryptfs canonical set (untar,
ls -lR, md5sum, rm -rf) on a Django sdist; create, stat, open and delete of
small files; sqlite3 transactions; the daemons' peak RSS, and envfs's RSS over
repeated untar + rm rounds.

Everything it mounts or starts is unmounted and stopped at the end, on an
error and on Ctrl-C (SIGINT, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "envfs-bench"
SDIST_NAME, SDIST_VERSION = "Django", "5.1.4"
QUICK_SUBTREE = "django/conf"  # what --quick extracts of the sdist
MiB = 1024 * 1024
FS_NAMES = ("plain", "envfs", "gocryptfs")

_start = time.monotonic()


def log(message: str) -> None:
    elapsed = time.monotonic() - _start
    print(f"[{int(elapsed) // 60:3d}:{int(elapsed) % 60:02d}] {message}", file=sys.stderr, flush=True)


# -- configuration and figures ---------------------------------------------------------


@dataclass
class Config:
    runs: int
    fio_time: int
    quick: bool
    seq_bytes: int = 1024 * MiB
    fio_bytes: int = 256 * MiB
    small_files: int = 10_000
    sqlite_transactions: int = 2_000
    reopens: int = 1_000
    rounds: int = 10
    tarball: Path = Path()
    tar_members: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        cfg = cls(
            runs=args.runs or (1 if args.quick else 3),
            fio_time=args.time or (3 if args.quick else 30),
            quick=args.quick,
        )
        if args.quick:
            cfg.seq_bytes, cfg.fio_bytes = 64 * MiB, 32 * MiB
            cfg.small_files, cfg.sqlite_transactions, cfg.reopens, cfg.rounds = 1_000, 200, 200, 3
        return cfg


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    only: tuple[str, ...] = FS_NAMES  # the filesystems it applies to


def metrics(cfg: Config) -> list[Metric]:
    """Every figure of the table, in its order."""
    size = f"{cfg.seq_bytes // MiB} MiB" if cfg.seq_bytes < 1024 * MiB else f"{cfg.seq_bytes // (1024 * MiB)} GiB"
    tree = f"{SDIST_NAME} {SDIST_VERSION}" + (f" ({QUICK_SUBTREE} only)" if cfg.quick else "")
    n, tx = f"{cfg.small_files:,}", f"{cfg.sqlite_transactions:,}"
    envfs, daemons = ("envfs",), ("envfs", "gocryptfs")
    return [
        Metric("seq_write_1m", f"seq write {size}, dd bs=1M conv=fsync", "MB/s", True),
        Metric("seq_write_4k", f"seq write {size}, dd bs=4k conv=fsync", "MB/s", True),
        Metric("seq_read_1m", f"seq read {size}, dd bs=1M", "MB/s", True),
        Metric("rand_read", f"random 4 KiB read, fio, {cfg.fio_bytes // MiB} MiB file", "IOPS", True),
        Metric("rand_write", f"random 4 KiB write, fio, {cfg.fio_bytes // MiB} MiB file", "IOPS", True),
        Metric("untar", f"untar {tree}", "s", False),
        Metric("ls", "ls -lR", "s", False),
        Metric("md5sum", "md5sum of every file", "s", False),
        Metric("rm", "rm -rf", "s", False),
        Metric("md5_derivations", "md5sum: HSM derivations", "count", False, envfs),
        Metric("md5_key_wait_share", "md5sum: share of time opens waited for file keys", "%", False, envfs),
        Metric("create", f"create {n} small files", "s", False),
        Metric("stat", f"stat {n} files", "s", False),
        Metric("open", f"open + read 1 B + close {n} files", "opens/s", True),
        Metric("delete", f"delete {n} files", "s", False),
        Metric("derivations_per_open", "HSM derivations per first open", "count", False, envfs),
        Metric("reopen_derivations", "HSM derivations per re-open while open", "count", False, envfs),
        Metric("first_open_overhead", "first-open overhead per file (est.)", "ms", False, envfs),
        Metric("sqlite", f"sqlite3: {tx} small transactions", "s", False),
        Metric("peak_rss", "daemon peak RSS (VmHWM), all workloads", "MiB", False, daemons),
        Metric("rss_first", "untar + rm rounds: peak RSS, first round", "MiB", False, envfs),
        Metric("rss_last", f"untar + rm rounds: peak RSS, round {cfg.rounds}", "MiB", False, envfs),
    ]


# Targets of issue 4: (metric, comparison, bound) on the envfs/gocryptfs ratio, or on the envfs figure.
RATIO_TARGETS = [
    ("seq_write_1m", ">=", 1.0),
    ("seq_read_1m", ">=", 0.8),
    ("untar", "<=", 1.0),
    ("ls", "<=", 1.0),
    ("rm", "<=", 1.5),
    ("create", "<=", 1.5),
    ("stat", "<=", 1.5),
    ("delete", "<=", 1.5),
    ("md5sum", "<=", 2.0),
]
ENVFS_TARGETS = [("derivations_per_open", "<=", 1.0), ("reopen_derivations", "<=", 0.0)]
RSS_FLAT = 0.10


Figures = dict[str, float]
Results = dict[str, dict[str, list[float]]]  # metric -> filesystem -> one figure per run


# -- small helpers ----------------------------------------------------------------------


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its stderr."""
    result = subprocess.run(cmd, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {result.returncode}: {' / '.join(tail)}")
    return result


def timed(cmd: list[str], **kwargs: object) -> float:
    """Seconds a command takes, output discarded."""
    begin = time.perf_counter()
    run(cmd, **kwargs)
    return time.perf_counter() - begin


_drop_warned = False


def drop_caches() -> None:
    """sync; echo 3 > /proc/sys/vm/drop_caches (page cache, dentries and inodes)."""
    global _drop_warned
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        if not _drop_warned:
            log(f"warning: cannot drop caches ({e.strerror}); reads are not on a cold cache")
            _drop_warned = True


def proc_status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5\n")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def mounted(path: Path) -> bool:
    target = str(path.resolve()) if path.exists() else str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -- the filesystems --------------------------------------------------------------------


@dataclass
class Target:
    """One filesystem under test: workloads run in `root`."""

    name: str
    root: Path
    pid: int | None = None  # the daemon, if any
    store: Path | None = None  # envfs: the store, for its counters

    def counters(self) -> dict[str, int]:
        """envfs's counters, fresh: SIGUSR1 to the daemon, then read STORE/lock."""
        assert self.store is not None and self.pid is not None
        lock = self.store / "lock"
        before = lock.read_bytes()
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 1.5  # the daemon also refreshes it every second
        data = before
        while data == before and time.monotonic() < deadline:
            time.sleep(0.005)
            data = lock.read_bytes()
        return dict(json.loads(data)["counters"])


def setup_backing(work: Path, on_disk: bool, stack: ExitStack) -> Path:
    backing = work / "backing"
    backing.mkdir()
    if on_disk:
        return backing
    run(["mount", "-t", "tmpfs", "-o", "size=50%,mode=0700", "envfs-bench", str(backing)])
    stack.callback(unmount_tmpfs, backing)
    return backing


def unmount_tmpfs(path: Path) -> None:
    for _ in range(10):
        if not mounted(path) or subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
    log(f"warning: {path} was busy; unmounted lazily")


def setup_plain(backing: Path) -> Target:
    root = backing / "plain"
    root.mkdir()
    return Target("plain", root)


def setup_envfs(envfs: str, work: Path, backing: Path, stack: ExitStack) -> Target:
    env = os.environ | {"XDG_DATA_HOME": str(work / "xdg"), "ENVFS_PIN": secrets.token_hex(8)}
    store, mnt = backing / "envfs-store", work / "envfs-mnt"
    mnt.mkdir()
    run([envfs, "init", str(store)], env=env)
    run([envfs, "mount", str(store), str(mnt), "--log", str(work / "envfs.log")], env=env)
    pid = int(json.loads((store / "lock").read_bytes())["pid"])
    stack.callback(unmount_envfs, envfs, mnt, pid, env)
    return Target("envfs", mnt, pid=pid, store=store)


def unmount_envfs(envfs: str, mnt: Path, pid: int, env: dict[str, str]) -> None:
    for _ in range(10):
        if not mounted(mnt):
            break
        result = subprocess.run([envfs, "unmount", str(mnt)], env=env, capture_output=True, text=True, timeout=180)
        if result.returncode == 0:
            break
        log(f"envfs unmount: {result.stderr.strip()}; retrying")
        time.sleep(1)
    else:
        log("warning: envfs mount busy; detaching it lazily")
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    stop_process(pid, "envfs daemon")


def stop_process(pid: int, what: str) -> None:
    """Wait a little for a daemon we started to exit, then end it (by its pid)."""
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        try:  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if alive(pid):
        log(f"warning: the {what} (pid {pid}) did not exit; terminating it")
        os.kill(pid, signal.SIGTERM)
        time.sleep(2)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def ensure_gocryptfs(notes: list[str]) -> str | None:
    """gocryptfs, installed from Debian's package if missing; None (and a note) if it cannot be had."""
    if path := shutil.which("gocryptfs"):
        return path
    log("installing Debian's gocryptfs package")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "gocryptfs"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    if path := shutil.which("gocryptfs"):
        return path
    notes.append("gocryptfs could not be installed (apt-get install gocryptfs failed): its column is empty")
    return None


def setup_gocryptfs(gocryptfs: str, work: Path, backing: Path, stack: ExitStack) -> Target:
    cipher, mnt, passfile = backing / "gocryptfs-cipher", work / "gocryptfs-mnt", work / "gocryptfs.pass"
    cipher.mkdir()
    mnt.mkdir()
    passfile.write_text(secrets.token_hex(16) + "\n")
    run([gocryptfs, "-init", "-q", "-passfile", str(passfile), "-scryptn", "10", str(cipher)])
    logfile = open(work / "gocryptfs.log", "w")  # noqa: SIM115 - closed by the stack
    stack.callback(logfile.close)
    proc = subprocess.Popen(
        [gocryptfs, "-fg", "-q", "-passfile", str(passfile), str(cipher), str(mnt)],
        stdout=logfile,
        stderr=logfile,
        start_new_session=True,
    )
    stack.callback(unmount_gocryptfs, mnt, proc)
    deadline = time.monotonic() + 30
    while not mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gocryptfs did not mount; see {work / 'gocryptfs.log'}")
        time.sleep(0.05)
    return Target("gocryptfs", mnt, pid=proc.pid)


def unmount_gocryptfs(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(10):
        if not mounted(mnt) or subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode == 0:
            break
        time.sleep(1)
    else:
        log("warning: gocryptfs mount busy; detaching it lazily")
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        log(f"warning: gocryptfs (pid {proc.pid}) did not exit; killing it")
        proc.kill()
        proc.wait()


def remove_work_dir(work: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if line.split()[4].startswith(str(work) + "/")]
    if left:
        log(f"warning: still mounted, {work} kept: {', '.join(left)}")
        return
    shutil.rmtree(work, ignore_errors=True)


# -- the source tree --------------------------------------------------------------------


def fetch_sdist() -> Path:
    """The Django sdist from PyPI, cached in ~/.cache/envfs-bench."""

    def cached() -> Path | None:
        prefix = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz".lower()
        return next((p for p in CACHE.glob("*.tar.gz") if p.name.lower() == prefix), None)

    if (path := cached()) is None:
        log(f"downloading the {SDIST_NAME} {SDIST_VERSION} sdist from PyPI into {CACHE}")
        CACHE.mkdir(parents=True, exist_ok=True)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{SDIST_NAME}=={SDIST_VERSION}",
                "-d",
                str(CACHE),
            ]
        )
        if (path := cached()) is None:
            raise RuntimeError(f"pip download left no {SDIST_NAME}-{SDIST_VERSION}.tar.gz in {CACHE}")
    return path


def tree_counts(tarball: Path, members: list[str]) -> tuple[int, int]:
    """(files, directories) that extracting `members` of the tarball creates."""
    names = run(["tar", "tzf", str(tarball), *members]).stdout.splitlines()
    dirs = sum(1 for n in names if n.endswith("/"))
    return len(names) - dirs, dirs


# -- workloads: each takes a target and an empty directory in it, returns figures --------


def dd(args: list[str]) -> float:
    """Run dd; its throughput in MB/s (10^6 bytes per second, as dd counts)."""
    stderr = run(["dd", *args], env=os.environ | {"LC_ALL": "C"}).stderr
    match = re.search(r"^(\d+) bytes .* copied, ([0-9.e+-]+) s", stderr, re.MULTILINE)
    if not match:
        raise RuntimeError(f"cannot read dd's output: {stderr.strip()}")
    return int(match[1]) / float(match[2]) / 1e6


def sequential(t: Target, d: Path, cfg: Config) -> Figures:
    """dd: write with bs=4k, write with bs=1M (both conv=fsync), then read that file back with bs=1M."""
    f = d / "seq.bin"
    drop_caches()
    write_4k = dd(["if=/dev/zero", f"of={f}", "bs=4k", f"count={cfg.seq_bytes // 4096}", "conv=fsync"])
    f.unlink()
    drop_caches()
    write_1m = dd(["if=/dev/zero", f"of={f}", "bs=1M", f"count={cfg.seq_bytes // MiB}", "conv=fsync"])
    drop_caches()
    read_1m = dd([f"if={f}", "of=/dev/null", "bs=1M"])
    return {"seq_write_1m": write_1m, "seq_write_4k": write_4k, "seq_read_1m": read_1m}


def fio_iops(f: Path, rw: str, cfg: Config) -> float:
    """IOPS of one fio job of random 4 KiB requests (psync, queue depth 1) on an existing file."""
    if not shutil.which("fio"):
        return python_iops(f, rw, cfg)
    cmd = [
        "fio",
        "--name=envfs-bench",
        f"--filename={f}",
        f"--rw={rw}",
        "--bs=4k",
        f"--size={cfg.fio_bytes}",
        "--ioengine=psync",
        "--iodepth=1",
        "--time_based",
        f"--runtime={cfg.fio_time}",
        "--output-format=json",
    ]
    if rw == "randwrite":
        cmd.append("--end_fsync=1")
    out = run(cmd).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["read" if rw == "randread" else "write"]["iops"])


def python_iops(f: Path, rw: str, cfg: Config) -> float:
    """Stand-in for fio: random 4 KiB preads or pwrites for --time seconds."""
    blocks, buf, ops = cfg.fio_bytes // 4096, os.urandom(4096), 0
    fd = os.open(f, os.O_RDWR)
    try:
        begin = time.perf_counter()
        while (elapsed := time.perf_counter() - begin) < cfg.fio_time:
            offset = random.randrange(blocks) * 4096
            os.pread(fd, 4096, offset) if rw == "randread" else os.pwrite(fd, buf, offset)
            ops += 1
        if rw == "randwrite":
            os.fsync(fd)
            elapsed = time.perf_counter() - begin
    finally:
        os.close(fd)
    return ops / elapsed


def random_io(t: Target, d: Path, cfg: Config) -> Figures:
    """fio: random 4 KiB reads, then writes, in a file laid out beforehand (untimed)."""
    f = d / "random.bin"
    dd(["if=/dev/urandom", f"of={f}", "bs=1M", f"count={cfg.fio_bytes // MiB}", "conv=fsync"])
    drop_caches()
    read = fio_iops(f, "randread", cfg)
    drop_caches()
    write = fio_iops(f, "randwrite", cfg)
    return {"rand_read": read, "rand_write": write}


def source_tree(t: Target, d: Path, cfg: Config) -> Figures:
    """The gocryptfs canonical set: untar, ls -lR, md5sum of every file, rm -rf."""
    cfg.tarball.read_bytes()  # the tarball itself comes from the page cache
    figures = {"untar": timed(["tar", "xzf", str(cfg.tarball), *cfg.tar_members], cwd=d)}
    drop_caches()
    figures["ls"] = timed(["ls", "-lR", str(d)])
    drop_caches()
    before = t.counters() if t.store else {}
    figures["md5sum"] = timed(
        ["bash", "-c", "set -o pipefail; find . -type f -print0 | xargs -0 md5sum >/dev/null"], cwd=d
    )
    if t.store:
        after = t.counters()
        figures["md5_derivations"] = after["hsm_derivations"] - before["hsm_derivations"]
        key_wait = (after["key_wait_us"] - before["key_wait_us"]) / 1e6
        figures["md5_key_wait_share"] = key_wait / figures["md5sum"] * 100
    drop_caches()
    figures["rm"] = timed(["rm", "-rf", str(d / os.listdir(d)[0])])
    return figures


def small_files(t: Target, d: Path, cfg: Config) -> Figures:
    """Create, stat, open (read 1 byte) and delete small files, each phase on a cold cache."""
    paths = [d / f"f{i:05d}" for i in range(cfg.small_files)]
    content = os.urandom(1024)
    begin = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, content)
        os.close(fd)
    figures = {"create": time.perf_counter() - begin}
    drop_caches()
    begin = time.perf_counter()
    for p in paths:
        os.stat(p)
    figures["stat"] = time.perf_counter() - begin
    drop_caches()
    figures |= open_files(t, paths)
    if t.store:
        figures |= reopen_cost(t, paths[0], cfg.reopens)
    drop_caches()
    begin = time.perf_counter()
    for p in paths:
        os.unlink(p)
    figures["delete"] = time.perf_counter() - begin
    return figures


def open_files(t: Target, paths: list[Path]) -> Figures:
    """Open distinct existing files, read 1 byte, close: opens per second; HSM derivations per open."""
    before = t.counters() if t.store else {}
    begin = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 1)
        os.close(fd)
    figures = {"open": len(paths) / (time.perf_counter() - begin)}
    if t.store:
        figures["derivations_per_open"] = (t.counters()["hsm_derivations"] - before["hsm_derivations"]) / len(paths)
    return figures


def reopen_cost(t: Target, path: Path, n: int) -> Figures:
    """envfs: derivations of re-opens while the file is held open (should be none), and what a
    first open costs more than a re-open (HSM derivation, data file open), estimated from the
    difference of n open/read/close cycles with and without another handle holding the file."""

    def cycles() -> float:
        begin = time.perf_counter()
        for _ in range(n):
            fd = os.open(path, os.O_RDONLY)
            os.read(fd, 1)
            os.close(fd)
        return time.perf_counter() - begin

    holder = os.open(path, os.O_RDONLY)
    try:
        before = t.counters()
        held = cycles()
        during = t.counters()
    finally:
        os.close(holder)
    unheld = cycles()
    after = t.counters()
    derivations = after["hsm_derivations"] - during["hsm_derivations"]
    figures = {"reopen_derivations": (during["hsm_derivations"] - before["hsm_derivations"]) / n}
    if derivations > 0:
        figures["first_open_overhead"] = max(0.0, unheld - held) / derivations * 1000
    return figures


def sqlite(t: Target, d: Path, cfg: Config) -> Figures:
    """The sqlite3 shell runs small transactions (one INSERT and one UPDATE each) in default journal mode."""
    lines = ["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER);"]
    for i in range(cfg.sqlite_transactions):
        lines.append(
            f"BEGIN; INSERT INTO t (v, n) VALUES ('{'x' * 100}', {i}); UPDATE t SET n = n + 1 WHERE id = "
            f"{i // 2 + 1}; COMMIT;"
        )
    return {"sqlite": timed(["sqlite3", str(d / "bench.db")], input="\n".join(lines) + "\n")}


WORKLOADS: list[tuple[str, Callable[[Target, Path, Config], Figures]]] = [
    ("sequential dd", sequential),
    ("random fio", random_io),
    ("source tree", source_tree),
    ("small files", small_files),
    ("sqlite3", sqlite),
]


@contextmanager
def scratch(t: Target) -> Iterator[Path]:
    d = t.root / "bench"
    d.mkdir()
    interrupted = False
    try:
        yield d
    except KeyboardInterrupt:
        interrupted = True  # the mounts go away as a whole: no need to wait for a long rm
        raise
    finally:
        if not interrupted:
            shutil.rmtree(d, ignore_errors=True)


def run_workloads(targets: list[Target], cfg: Config, results: Results, notes: list[str]) -> None:
    """Every workload, `runs` times, each run on every filesystem in turn (the order rotates)."""
    for title, workload in WORKLOADS:
        for i in range(cfg.runs):
            order = targets[i % len(targets) :] + targets[: i % len(targets)]
            for t in order:
                log(f"{title}, run {i + 1}/{cfg.runs}, {t.name} ...")
                try:
                    with scratch(t) as d:
                        figures = workload(t, d, cfg)
                except (RuntimeError, OSError) as e:
                    log(f"  FAILED: {e}")
                    notes.append(f"{title} failed on {t.name} (run {i + 1}): {e}")
                    continue
                log("  " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))
                for key, value in figures.items():
                    results.setdefault(key, {}).setdefault(t.name, []).append(value)


def extract_rounds(t: Target, cfg: Config) -> list[float]:
    """Peak RSS (MiB) of the daemon in each of `rounds` untar + rm -rf rounds."""
    peaks = []
    for i in range(cfg.rounds):
        reset_peak_rss(t.pid)  # type: ignore[arg-type]
        with scratch(t) as d:
            run(["tar", "xzf", str(cfg.tarball), *cfg.tar_members], cwd=d)
            run(["rm", "-rf", str(d / os.listdir(d)[0])])
        peaks.append(proc_status_kib(t.pid, "VmHWM") / 1024)  # type: ignore[arg-type]
        log(f"untar + rm round {i + 1}/{cfg.rounds}, {t.name}: peak RSS {peaks[-1]:.1f} MiB")
    return peaks


def measure(targets: list[Target], cfg: Config, notes: list[str]) -> tuple[Results, list[float]]:
    """All workloads, then the daemons' peak RSS, then envfs's untar + rm rounds."""
    results: Results = {}
    run_workloads(targets, cfg, results, notes)
    results["peak_rss"] = {t.name: [proc_status_kib(t.pid, "VmHWM") / 1024] for t in targets if t.pid is not None}
    envfs = next(t for t in targets if t.name == "envfs")
    try:
        rss = extract_rounds(envfs, cfg)
    except (RuntimeError, OSError) as e:
        log(f"  FAILED: {e}")
        notes.append(f"untar + rm rounds failed on envfs: {e}")
        rss = []
    results["rss_first"], results["rss_last"] = {"envfs": rss[:1]}, {"envfs": rss[-1:]}
    return results, rss


# -- the report -------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("count",) and value == int(value):
        return f"{int(value):,}"
    if unit in ("IOPS", "opens/s") or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}"


def fmt_ratio(value: object) -> str:
    if not isinstance(value, float):
        return ""
    if value >= 10:
        return f"{value:.1f}×"
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(results: Results, cfg: Config) -> list[dict[str, object]]:
    """One row per metric: medians, per-run figures, ratios."""
    rows = []
    for m in metrics(cfg):
        runs = {name: results.get(m.key, {}).get(name, []) for name in m.only}
        values = {name: median(v) for name, v in runs.items()}
        envfs = values.get("envfs")
        rows.append(
            {
                "key": m.key,
                "label": m.label,
                "unit": m.unit,
                "higher_is_better": m.higher_is_better,
                "values": values,
                "runs": runs,
                "envfs/gocryptfs": ratio(envfs, values.get("gocryptfs")) if len(m.only) > 1 else None,
                "envfs/plain": ratio(envfs, values.get("plain")) if "plain" in m.only else None,
            }
        )
    return rows


def check_targets(rows: list[dict[str, object]], rss: list[float]) -> list[dict[str, object]]:
    by_key = {r["key"]: r for r in rows}

    def check(value: object, op: str, bound: float) -> bool | None:
        if not isinstance(value, float | int):
            return None
        return value >= bound if op == ">=" else value <= bound

    checks = []
    for key, op, bound in RATIO_TARGETS:
        value = by_key[key]["envfs/gocryptfs"]
        checks.append(
            {
                "target": f"{by_key[key]['label']}: envfs/gocryptfs {op} {bound}×",
                "value": value,
                "met": check(value, op, bound),
            }
        )
    for key, op, bound in ENVFS_TARGETS:
        value = by_key[key]["values"]["envfs"]  # type: ignore[index]
        checks.append(
            {"target": f"{by_key[key]['label']} {op} {bound:g}", "value": value, "met": check(value, op, bound)}
        )
    growth = rss[-1] / rss[0] - 1 if rss else None
    checks.append(
        {
            "target": f"daemon RSS flat over the untar + rm rounds (within {RSS_FLAT:.0%})",
            "value": growth,
            "met": None if growth is None else abs(growth) <= RSS_FLAT,
        }
    )
    return checks


def print_table(rows: list[dict[str, object]], checks: list[dict[str, object]], meta: dict[str, object]) -> None:
    header = ["workload", "plain", "envfs", "gocryptfs", "envfs/gocryptfs", "envfs/plain"]
    table = [header]
    for r in rows:
        unit = str(r["unit"])
        values: dict[str, float | None] = r["values"]  # type: ignore[assignment]
        cells = [fmt(values[n], unit) if n in values else "" for n in FS_NAMES]
        ratios = [fmt_ratio(r[k]) for k in ("envfs/gocryptfs", "envfs/plain")]
        arrow = "↑" if r["higher_is_better"] else "↓"
        table.append([f"{r['label']} ({unit}{', ' + arrow if unit not in ('count', '%') else ''})", *cells, *ratios])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(
        f"envfs benchmark {meta['date']}, commit {meta['commit']}, {meta['backing']}, "
        f"median of {meta['runs']} run(s){', quick' if meta['quick'] else ''}"
    )
    for i, row in enumerate(table):
        print(
            " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if i == 0:
            print("-|-".join("-" * w for w in widths))
    print("\ntargets (issue 4):")
    for c in checks:
        value = c["value"]
        shown = "–" if value is None else (f"{value:+.1%}" if "RSS" in str(c["target"]) else f"{value:.3g}")
        verdict = {True: "met", False: "NOT met", None: "not measured"}[c["met"]]  # type: ignore[index]
        print(f"  {verdict:<12} {c['target']}: {shown}")
    for note in meta["notes"]:  # type: ignore[attr-defined]
        print(f"note: {note}")


# Columns of the tables in docs/PERFORMANCE.md: (metric, header).
DOC_COLUMNS = [
    ("seq_write_1m", "write 1M MB/s"),
    ("seq_write_4k", "write 4k MB/s"),
    ("seq_read_1m", "read 1M MB/s"),
    ("rand_read", "rand read IOPS"),
    ("rand_write", "rand write IOPS"),
    ("untar", "untar s"),
    ("ls", "ls -lR s"),
    ("md5sum", "md5sum s"),
    ("rm", "rm -rf s"),
    ("create", "create s"),
    ("stat", "stat s"),
    ("open", "opens/s"),
    ("delete", "delete s"),
    ("sqlite", "sqlite3 s"),
    ("peak_rss", "peak RSS MiB"),
]


def markdown_rows(rows: list[dict[str, object]], meta: dict[str, object], rss: list[float]) -> str:
    """This run's rows for the tables of docs/PERFORMANCE.md."""
    by_key = {r["key"]: r for r in rows}
    head = f"| {meta['date']} | {meta['commit']} | {meta['runs']}{' quick' if meta['quick'] else ''} |"

    def line(table: str, cell: Callable[[dict[str, object]], str], first: str = "", last: str = "") -> str:
        return f"{table}: {head}{first} " + " | ".join(cell(by_key[k]) for k, _ in DOC_COLUMNS) + f" |{last}"

    def value(name: str) -> Callable[[dict[str, object]], str]:
        return lambda r: fmt(r["values"].get(name), str(r["unit"]))  # type: ignore[attr-defined]

    def ratio_of(column: str) -> Callable[[dict[str, object]], str]:
        return lambda r: fmt_ratio(r[column]) or "–"

    derivations = fmt(by_key["derivations_per_open"]["values"].get("envfs"), "count")  # type: ignore[attr-defined]
    rounds = f" {rss[0]:.1f} → {rss[-1]:.1f} |" if rss else " – |"
    lines = [line("envfs figures", value("envfs"), last=f" {derivations} |{rounds}")]
    lines += [line("envfs / gocryptfs", ratio_of("envfs/gocryptfs")), line("envfs / plain", ratio_of("envfs/plain"))]
    lines += [line("reference figures", value(name), first=f" {name} |") for name in ("gocryptfs", "plain")]
    return "\n".join(lines)


def git_commit() -> str:
    """The short commit of this checkout, "+dirty" when envfs's source differs from it."""
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "--", "envfs"], capture_output=True, text=True).stdout
    return (commit or "unknown") + ("+dirty" if changed.strip() else "")


def describe(cfg: Config, commit: str, backing: str, notes: list[str]) -> dict[str, object]:
    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "missing"

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "backing": backing,
        "runs": cfg.runs,
        "quick": cfg.quick,
        "fio_time_s": cfg.fio_time,
        "tarball": cfg.tarball.name,
        "machine": f"{os.cpu_count()} × {cpu}, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB, "
        f"Linux {platform.release()}",
        "gocryptfs": version(["gocryptfs", "-version"]),
        "fio": version(["fio", "--version"]),
        "python": platform.python_version(),
        "notes": notes,
    }


# -- main -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", metavar="DIR", help="backing storage: a directory on a disk (default: a fresh tmpfs)")
    p.add_argument("--runs", type=int, metavar="N", help="repetitions of every workload (default 3; --quick: 1)")
    p.add_argument("--time", type=int, metavar="S", help="seconds per fio job (default 30; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="small sizes and short times: a smoke run")
    p.add_argument("--json", metavar="FILE", help="write the figures to FILE as JSON")
    p.add_argument("--markdown", action="store_true", help="also print this run's rows for docs/PERFORMANCE.md")
    p.add_argument("--envfs", metavar="PATH", help="the envfs command (default: the one beside this Python)")
    return p.parse_args()


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse_args()
    if (args.runs is not None and args.runs < 1) or (args.time is not None and args.time < 1):
        print("scripts/bench: --runs and --time must be at least 1", file=sys.stderr)
        return 2
    cfg = Config.from_args(args)
    if os.geteuid() != 0:
        print("scripts/bench: run it as root (tmpfs and FUSE mounts, drop_caches)", file=sys.stderr)
        return 2
    envfs = args.envfs or str(Path(sys.executable).with_name("envfs"))
    if not os.access(envfs, os.X_OK):
        envfs = shutil.which("envfs") or envfs
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupt)
    notes: list[str] = []
    load_before = os.getloadavg()[0]
    commit = git_commit()  # before mounting: the code that runs
    stack = ExitStack()
    try:
        cfg.tarball = fetch_sdist()
        cfg.tar_members = [f"{SDIST_NAME}-{SDIST_VERSION}/{QUICK_SUBTREE}"] if cfg.quick else []
        files, dirs = tree_counts(cfg.tarball, cfg.tar_members)
        gocryptfs = ensure_gocryptfs(notes)
        work = Path(tempfile.mkdtemp(prefix="envfs-bench-", dir=args.dir)).resolve()
        stack.callback(remove_work_dir, work)
        backing_desc = f"directory on {args.dir}" if args.dir else "tmpfs"
        log(f"work directory {work}; backing storage: {backing_desc}")
        backing = setup_backing(work, bool(args.dir), stack)
        targets = [setup_plain(backing), setup_envfs(envfs, work, backing, stack)]
        if gocryptfs:
            targets.append(setup_gocryptfs(gocryptfs, work, backing, stack))
        results, rss = measure(targets, cfg, notes)
        rows = summarize(results, cfg)
        notes.append(f"source tree: {files:,} files, {dirs:,} directories ({cfg.tarball.name})")
        notes.append(f"load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
        meta = describe(cfg, commit, backing_desc, notes)
        checks = check_targets(rows, rss)
        print_table(rows, checks, meta)
        if args.markdown:
            print("\nrows for docs/PERFORMANCE.md:\n" + markdown_rows(rows, meta, rss))
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "figures": rows, "targets": checks}, indent=2) + "\n")
            log(f"figures written to {args.json}")
        return 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except Exception as e:
        log(f"error: {e}; cleaning up")
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        stack.close()
        log(f"done in {time.monotonic() - _start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
