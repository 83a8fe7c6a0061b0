"""Where an untar's time goes, request by request: in the filesystem's daemon, or
between its requests (docs/PERFORMANCE.md, "What stops the untar").

The kernel's FUSE tracepoints (`fuse_request_send`, `fuse_request_end`, in
recent kernels) mark when a request is queued for the daemon and when its reply
arrives. Their difference is the daemon's share: pick-up, handler and reply.
The time from one reply to the next request is the application's and the
kernel's share: the client's own work, its wake-up and its next system call.
For each of envfs and gocryptfs, on a tmpfs, this untars the benchmark's
tarball once and prints both shares per request type, and how many requests
the daemon answered on the CPU that sent them. As root, after `scripts/test`
or `scripts/setup`:

    .venv/bin/python bench/requests.py
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402 - the side-by-side benchmark's set-up of each filesystem

TRACING = Path("/sys/kernel/tracing")
EVENTS = ("fuse/fuse_request_send", "fuse/fuse_request_end")
# "tar-123 [001] ..... 4711.000123: fuse_request_send: connection 41 req 10 opcode 3 (FUSE_GETATTR) len 56"
_EVENT = re.compile(
    r"\[(\d+)\][^:]*?\s(\d+\.\d+): fuse_request_(send|end): connection \d+ req (\d+)(?: opcode \d+ \((\w+)\))?"
)


@dataclass
class Split:
    """Seconds per request type: in the daemon, and before the request (since the last reply)."""

    wall: float = 0.0
    daemon: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    before: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    same_cpu: int = 0
    requests: int = 0


def tracing_available() -> bool:
    if not (TRACING / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], capture_output=True)
    return all((TRACING / "events" / event / "enable").exists() for event in EVENTS)


def _set(name: str, value: str) -> None:
    (TRACING / name).write_text(value)


def _buffer_size_kb() -> str:
    """The trace buffer's size per CPU: "1408", or "7 (expanded: 1408)" before its first use."""
    text = (TRACING / "buffer_size_kb").read_text()
    match = re.search(r"expanded: (\d+)", text) or re.match(r"(\d+)", text)
    return match.group(1) if match else "1408"


def traced(run: Callable[[], None]) -> tuple[float, str]:
    """Run `run` with the FUSE request events recorded; its time and the trace.
    The trace buffer (300 MB per CPU while it runs) and clock are put back after."""
    clock = re.search(r"\[(\w+)\]", (TRACING / "trace_clock").read_text())
    buffer_kb = _buffer_size_kb()
    _set("trace_clock", "mono")
    _set("buffer_size_kb", "300000")
    _set("trace", "")
    for event in EVENTS:
        _set(f"events/{event}/enable", "1")
    try:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
        trace = (TRACING / "trace").read_text()
    finally:
        for event in EVENTS:
            _set(f"events/{event}/enable", "0")
        _set("trace", "")
        _set("buffer_size_kb", buffer_kb)
        if clock:
            _set("trace_clock", clock.group(1))
    return wall, trace


def split(wall: float, trace: str) -> Split:
    result = Split(wall=wall)
    sent: dict[str, tuple[float, str, str]] = {}  # request -> (time, CPU, type)
    last_reply: float | None = None
    for match in _EVENT.finditer(trace):
        cpu, when, kind, request, opcode = match.groups()
        at = float(when)
        if kind == "send":
            sent[request] = (at, cpu, opcode)
            if last_reply is not None:
                result.before[opcode].append(at - last_reply)
        elif request in sent:
            queued, sent_on, opcode = sent.pop(request)
            result.daemon[opcode].append(at - queued)
            result.requests += 1
            result.same_cpu += sent_on == cpu
            last_reply = at
    return result


def untar(root: Path, tarball: Path) -> Split:
    target = root / "tree"
    target.mkdir()
    return split(*traced(lambda: subprocess.run(["tar", "xzf", str(tarball), "-C", str(target)], check=True)))


def report(name: str, result: Split) -> None:
    daemon = sum(sum(times) for times in result.daemon.values())
    before = sum(sum(times) for times in result.before.values())
    print(
        f"{name}: untar {result.wall:.2f} s; {result.requests} requests, {daemon:.2f} s in the daemon, "
        f"{before:.2f} s between them; answered on the sending CPU: {result.same_cpu / max(result.requests, 1):.0%}"
    )
    print(f"  {'request':<16}{'count':>8}{'µs in daemon':>14}{'µs before':>11}")
    for opcode, times in sorted(result.daemon.items(), key=lambda item: -sum(item[1])):
        gaps = result.before.get(opcode) or [0.0]
        in_daemon, ahead = sum(times) / len(times) * 1e6, sum(gaps) / len(gaps) * 1e6
        print(f"  {opcode:<16}{len(times):>8}{in_daemon:>14.1f}{ahead:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envfs", default=str(Path(sys.executable).parent / "envfs"))
    args = parser.parse_args()
    if not tracing_available():
        sys.exit("requests.py: this kernel has no FUSE request tracepoints (fuse_request_send/_end in tracefs)")
    notes: list[str] = []
    tarball = bench.fetch_sdist()
    setups: list[tuple[str, Callable[[Path, Path, ExitStack], bench.Target]]] = [
        ("envfs", lambda work, backing, stack: bench.setup_envfs(args.envfs, work, backing, stack))
    ]
    gocryptfs = bench.ensure_gocryptfs(notes)
    if gocryptfs:
        go = gocryptfs
        setups.append(("gocryptfs", lambda work, backing, stack: bench.setup_gocryptfs(go, work, backing, stack)))
    for name, setup in setups:
        work = Path(tempfile.mkdtemp(prefix="envfs-requests-"))
        try:
            with ExitStack() as stack:
                target = setup(work, bench.setup_backing(work, False, stack), stack)
                result = untar(target.root, tarball)
        finally:
            bench.remove_work_dir(work)
        report(name, result)
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
