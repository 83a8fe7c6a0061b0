"""Random namespace operations run side by side in directories, answers compared.

Makes, removes, renames (with RENAME_NOREPLACE and RENAME_EXCHANGE), links,
symlinks, chmods, chowns, truncates and sets xattrs of names in a small tree of
three names three levels deep, so that operations collide: over files, over
directories, into their own children, on names open in held descriptors, which
are used after their names moved or went. Each operation runs in every
directory and must give the answer it gives in the first, the reference (a
value, or the same errno); every 40 operations, and at the end, the trees must
be the same: names, types, permissions, owners, link counts, sizes, contents,
symlink targets, user xattrs, and which names are hard links of one another.
With `users`, each operation runs as root or as one of two users; with
`times`, each must change the modification and change times of the same names.
For test_against_ext4.py, with ext4 as the reference.

With one directory, the same operations are a stress: run from several threads
at once, no answer may be EIO or ENOTCONN (a daemon that failed or died).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import os
import pickle
import random
import stat
import time
from pathlib import Path
from typing import NamedTuple

NAMES = ("a", "b", "c")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


class Divergence(AssertionError):
    """The two directories answered an operation differently, or their trees differ,
    or an answer was one that no operation may give."""


NEVER = {"EIO", "ENOTCONN"}


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, old.encode(), _AT_FDCWD, new.encode(), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def answer(call: collections.abc.Callable[[], object]) -> object:
    """What a call returned, or the name of its errno."""
    try:
        return call()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def describe_stat(st: os.stat_result) -> tuple[object, ...]:
    kind = stat.S_IFMT(st.st_mode)
    size = None if kind == stat.S_IFDIR else st.st_size
    return (kind, stat.S_IMODE(st.st_mode), st.st_nlink, size, st.st_uid, st.st_gid)


class User(NamedTuple):
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


# Who runs the operations with `users`: two users who share group 1002, and root.
USERS = (User("root", 0, 0, ()), User("alice", 1000, 1000, (1000, 1002)), User("bob", 1001, 1001, (1001, 1002)))


def answer_as(user: User, root: Path, call: collections.abc.Callable[[Path], object]) -> object:
    """`answer(call)` in a child process that works in `root` (reached as root, so that
    its parents need not be open to `user`) with `user`'s credentials."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(reader)
            os.chdir(root)
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            with os.fdopen(writer, "wb") as out:
                pickle.dump(answer(lambda: call(Path("."))), out)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as result:
        data = result.read()
    os.waitpid(pid, 0)
    return pickle.loads(data) if data else "no answer"


def remove_tree(path: Path) -> None:
    """rm -r in name order, stopping at the first error: shutil.rmtree goes in
    listing order, which differs between filesystems, and would leave different
    names behind when it stops at a name it may not remove."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        for name in sorted(os.listdir(path)):
            remove_tree(path / name)
        os.rmdir(path)
    else:
        os.unlink(path)


def clock_step(directory: Path) -> float:
    """The smallest step of the time stamps a filesystem gives (seconds), at least 1 ms:
    a clock tick (4 ms at HZ=250) where times come from the coarse clock."""
    probe = directory / ".clock-probe"
    probe.touch()
    try:
        steps, last = [], os.stat(probe).st_mtime_ns
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline or not steps:
            os.utime(probe)
            now = os.stat(probe).st_mtime_ns
            if now != last:
                steps.append(now - last)
                last = now
        return max(min(steps) / 1e9, 0.001)
    finally:
        probe.unlink()


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime, ctime) in nanoseconds of `root` and every name under it but FIFOs:
    data through a FIFO never reaches a FUSE daemon, and the kernel does not
    stamp a FUSE inode's times itself, so a FIFO's times move on ext4 only."""
    st = os.lstat(root)
    found = {".": (st.st_mtime_ns, st.st_ctime_ns)}
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if not stat.S_ISFIFO(st.st_mode):
                found[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_ctime_ns)
    return found


def tree(root: Path) -> dict[str, object]:
    """Everything under `root` that the comparison covers, with hard links as groups of names."""
    entries: dict[str, object] = {}
    by_inode: dict[int, list[str]] = collections.defaultdict(list)
    for directory, subdirectories, files in os.walk(root):
        for name in sorted(subdirectories + files):
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            st = os.lstat(path)
            item: list[object] = list(describe_stat(st))
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    item.append(hashlib.sha256(f.read()).hexdigest()[:16])
                by_inode[st.st_ino].append(relative)
            elif stat.S_ISLNK(st.st_mode):
                item.append(os.readlink(path))
            if not stat.S_ISLNK(st.st_mode):
                names = sorted(n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user."))
                item.append({n: os.getxattr(path, n, follow_symlinks=False).hex() for n in names})
            entries[relative] = item
    entries["hard links"] = sorted(sorted(names) for names in by_inode.values() if len(names) > 1)
    return entries


def _fenced(root: Path) -> Path:
    """Where the tree goes in `root`: two directories down, the same in every root. A relative
    symlink that a rename moved up may point above the tree (at most two levels: `op_symlink`),
    and must find the same there in every root, not the roots' differing surroundings."""
    tree = root / "fence" / "fence" / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    return tree


class NamespaceFuzz:
    """Random operations (from `seed`) in each of `roots` (the first is the reference),
    compared as they go."""

    def __init__(self, roots: tuple[Path, ...], seed: int, *, users: bool = False) -> None:
        """With `users`, each operation (but opening a descriptor to hold) runs as
        one of USERS, in roots that every user may write to."""
        self.roots = tuple(_fenced(root) for root in roots)
        self.users = users
        if users:
            for root in self.roots:
                os.chmod(root, 0o777)
        self.seed = seed
        self.rng = random.Random(seed)
        self.done = 0
        self.recent: collections.deque[str] = collections.deque(maxlen=25)
        self.held: list[tuple[int, ...]] = []  # descriptors held open, one per root
        self.counts: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()  # "rename: ok", "rename: ENOTEMPTY", ...
        self._clock_step: float | None = None  # of the reference's time stamps, in seconds

    # -- drawing ---------------------------------------------------------------

    def path(self) -> str:
        """Mostly a name that exists in the reference, or a new name in one of its
        directories; sometimes any path (through files, symlinks, missing names)."""
        if self.rng.random() < 0.25:
            return "/".join(self.rng.choice(NAMES) for _ in range(self.rng.randint(1, 3)))
        reference = self.roots[0]
        existing = [""] + [
            os.path.relpath(os.path.join(d, n), reference)
            for d, subdirectories, files in os.walk(reference)
            for n in subdirectories + files
        ]
        base = self.rng.choice(existing)
        if base and (base.count("/") == 2 or not os.path.isdir(reference / base) or self.rng.random() < 0.5):
            return base
        return os.path.join(base, self.rng.choice(NAMES))

    def data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 100, 4096, 5000, 70_000)))

    # -- running ---------------------------------------------------------------

    # How often each operation is drawn: enough making that the tree fills, and
    # enough removing that it does not fill up with directories, FIFOs and symlinks.
    WEIGHTS = {
        "write_file": 10, "rename": 12, "link": 6, "unlink": 6, "hold": 4, "use_held": 6, "mkdir": 4,
        "rmdir": 3, "remove_tree": 1, "symlink": 2, "mkfifo": 1, "readlink": 1, "chmod": 2, "truncate": 2,
        "lstat": 2, "stat": 2, "listdir": 2, "read": 3, "xattr": 4, "close_held": 3, "chown": 2, "utime": 2,
    }  # fmt: skip

    def run(self, count: int, *, times: bool = False) -> None:
        """`count` operations; with `times`, each must also change the same
        modification and change times as the reference's (`compare_times`)."""
        names = list(self.WEIGHTS)
        weights = [self.WEIGHTS[name] for name in names]
        for _ in range(count):
            (name,) = self.rng.choices(names, weights)
            self.done += 1
            self.counts[name] += 1
            if times:
                self.compare_times(name, getattr(self, "op_" + name))
            else:
                getattr(self, "op_" + name)()
            if self.done % 40 == 0 and len(self.roots) > 1:
                self.compare_trees()

    def everywhere(self, what: str, call: collections.abc.Callable[[Path], object]) -> list[object]:
        """Run `call` on every root; their answers must agree."""
        if self.users:
            user = self.rng.choice(USERS)
            answers = [answer_as(user, root, call) for root in self.roots]
            what += f" as {user.name}"
        else:
            answers = [answer(lambda root=root: call(root)) for root in self.roots]
        self.agree(what, answers)
        return answers

    def agree(self, what: str, answers: list[object]) -> None:
        reference = answers[0]
        self.recent.append(f"{self.done}: {what} -> {reference!r}")
        failed = isinstance(reference, str) and reference in errno.errorcode.values()
        self.outcomes[f"{what.split()[0]}: {reference if failed else 'ok'}"] += 1
        for subject in answers:
            if subject != reference:
                self.fail(f"{what}: {subject!r}, where the reference answers {reference!r}")
            if isinstance(subject, str) and subject in NEVER:
                self.fail(f"{what}: {subject}")

    def on_held(self, what: str, call: collections.abc.Callable[[int], object]) -> None:
        if self.held:
            index = self.rng.randrange(len(self.held))
            self.agree(f"{what} on held #{index}", [answer(lambda fd=fd: call(fd)) for fd in self.held[index]])

    def fail(self, message: str) -> None:
        history = "\n  ".join(self.recent)
        raise Divergence(f"namespace fuzz seed {self.seed}, operation {self.done}: {message}\nbefore it:\n  {history}")

    def compare_trees(self, why: str = "") -> None:
        reference, subject = (tree(root) for root in self.roots)
        if reference != subject:
            differing = sorted(k for k in reference.keys() | subject.keys() if reference.get(k) != subject.get(k))
            details = "; ".join(f"{k}: {subject.get(k)!r}, reference {reference.get(k)!r}" for k in differing[:5])
            self.fail(f"the trees differ{why} at {len(differing)} names: {details}")
        self.recent.append(f"{self.done}: trees compared{why}")

    def compare_times(self, name: str, operation: collections.abc.Callable[[], None]) -> None:
        """Run `operation`; the names whose mtime or ctime it changed must be the reference's.

        Before kernel 6.13 ext4 stamps times from a clock that ticks every few
        milliseconds (`clock_step`): the pause before the operation makes any
        update it does a visible change.
        """
        if self._clock_step is None:
            self._clock_step = clock_step(self.roots[0])
        time.sleep(self._clock_step * 1.5)
        before = [stamps(root) for root in self.roots]
        operation()
        after = [stamps(root) for root in self.roots]
        changes = [
            {
                (path, field)
                for path, old in was.items()
                for field, index in (("mtime", 0), ("ctime", 1))
                if path in now and now[path][index] != old[index]
            }
            for was, now in zip(before, after, strict=True)
        ]
        for change in changes[1:]:
            if change != changes[0]:
                self.fail(f"{name} changed the times {sorted(change)}; the reference's {sorted(changes[0])}")

    def close_held(self) -> None:
        for fds in self.held:
            for fd in fds:
                os.close(fd)
        self.held.clear()

    # -- operations (each runs in every root) ----------------------------------

    def op_mkdir(self) -> None:
        p, mode = self.path(), self.rng.choice((0o755, 0o700, 0o1777, 0o2777))
        self.everywhere(f"mkdir {p} {mode:o}", lambda root: os.mkdir(root / p, mode))

    def op_rmdir(self) -> None:
        p = self.path()
        self.everywhere(f"rmdir {p}", lambda root: os.rmdir(root / p))

    def op_write_file(self) -> None:
        p, data = self.path(), self.data()
        # O_NONBLOCK: a FIFO without a reader answers ENXIO rather than block.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | self.rng.choice((os.O_TRUNC, os.O_EXCL, os.O_APPEND, 0))

        def write(root: Path) -> int:
            fd = os.open(root / p, flags, 0o644)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.everywhere(f"write {p} {len(data)} bytes, flags {flags:o}", write)

    def op_remove_tree(self) -> None:
        p = self.path()

        def remove(root: Path) -> None:
            if not stat.S_ISDIR(os.lstat(root / p).st_mode):
                raise OSError(errno.ENOTDIR, "not a directory")
            remove_tree(root / p)

        self.everywhere(f"rm -r {p}", remove)

    def op_unlink(self) -> None:
        p = self.path()
        self.everywhere(f"unlink {p}", lambda root: os.unlink(root / p))

    def op_rename(self) -> None:
        p, q = self.path(), self.path()
        flags = self.rng.choice((0, 0, _RENAME_NOREPLACE, _RENAME_EXCHANGE))
        self.everywhere(f"rename {p} {q} flags {flags}", lambda root: renameat2(str(root / p), str(root / q), flags))

    def op_link(self) -> None:
        p, q = self.path(), self.path()
        self.everywhere(f"link {p} {q}", lambda root: os.link(root / p, root / q))

    def op_symlink(self) -> None:
        p = self.path()
        # Relative targets start inside the tree; a rename may move them up (`_fenced`).
        up = "../" * self.rng.randint(0, p.count("/"))
        target = self.rng.choice((up + self.path(), "/nonexistent/" + "x" * 300))
        self.everywhere(f"symlink {p} -> {target}", lambda root: os.symlink(target, root / p))

    def op_readlink(self) -> None:
        p = self.path()
        self.everywhere(f"readlink {p}", lambda root: os.readlink(root / p))

    def op_mkfifo(self) -> None:
        p = self.path()
        self.everywhere(f"mkfifo {p}", lambda root: os.mkfifo(root / p, 0o640))

    def op_chmod(self) -> None:
        p, mode = self.path(), self.rng.choice((0o600, 0o644, 0o755, 0o4755, 0o2711, 0o1700, 0o2777, 0o6777))
        self.everywhere(f"chmod {p} {mode:o}", lambda root: os.chmod(root / p, mode))

    def op_chown(self) -> None:
        p, uid, gid = self.path(), self.rng.choice((-1, -1, 0, 1000, 1001)), self.rng.choice((-1, 0, 1000, 1001, 1002))
        self.everywhere(f"chown {p} {uid}:{gid}", lambda root: os.chown(root / p, uid, gid, follow_symlinks=False))

    def op_utime(self) -> None:
        p, times = self.path(), self.rng.choice((None, (1_000_000_000, 2_000_000_000)))
        self.everywhere(
            f"utime {p} {times}", lambda root: os.utime(root / p, ns=times) if times else os.utime(root / p)
        )

    def op_truncate(self) -> None:
        p, size = self.path(), self.rng.choice((0, 1, 4095, 4096, 10_000, 100_000))
        self.everywhere(f"truncate {p} {size}", lambda root: os.truncate(root / p, size))

    def op_lstat(self) -> None:
        p = self.path()
        self.everywhere(f"lstat {p}", lambda root: describe_stat(os.lstat(root / p)))

    def op_stat(self) -> None:
        p = self.path()
        self.everywhere(f"stat {p}", lambda root: describe_stat(os.stat(root / p)))

    def op_listdir(self) -> None:
        p = self.rng.choice((self.path(), "."))
        self.everywhere(f"listdir {p}", lambda root: sorted(os.listdir(root / p)))

    def op_read(self) -> None:
        p = self.path()

        def read(root: Path) -> str:
            fd = os.open(root / p, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO reads as empty
            try:
                return hashlib.sha256(os.read(fd, 1 << 20)).hexdigest()[:16]
            finally:
                os.close(fd)

        self.everywhere(f"read {p}", read)

    def op_xattr(self) -> None:
        p, name = self.path(), "user." + self.rng.choice(NAMES)
        kind = self.rng.randrange(4)
        if kind == 0:
            value, flags = self.data()[:300], self.rng.choice((0, os.XATTR_CREATE, os.XATTR_REPLACE))
            what = f"setxattr {p} {name} flags {flags}"
            self.everywhere(what, lambda root: os.setxattr(root / p, name, value, flags))
        elif kind == 1:
            self.everywhere(f"removexattr {p} {name}", lambda root: os.removexattr(root / p, name))
        elif kind == 2:
            self.everywhere(f"getxattr {p} {name}", lambda root: os.getxattr(root / p, name).hex())
        else:

            def user_names(root: Path) -> list[str]:
                return sorted(n for n in os.listxattr(root / p) if n.startswith("user."))

            self.everywhere(f"listxattr {p}", user_names)

    def op_hold(self) -> None:
        """Open a name and keep the descriptor: later operations use it after the name moved or went."""
        p = self.path()
        flags = self.rng.choice((os.O_RDWR, os.O_RDONLY, os.O_RDONLY | os.O_DIRECTORY, os.O_RDWR | os.O_CREAT))
        fds = [answer(lambda root=root: os.open(root / p, flags | os.O_NONBLOCK, 0o600)) for root in self.roots]
        opened = [isinstance(fd, int) for fd in fds]
        if not all(opened):
            for fd in fds:
                if isinstance(fd, int):
                    os.close(fd)
        answers = ["opened" if o else fd for o, fd in zip(opened, fds, strict=True)]
        self.agree(f"open {p} flags {flags:o} (held)", answers)
        if not all(opened):
            return
        self.held.append(tuple(fd for fd in fds if isinstance(fd, int)))
        if len(self.held) > 8:
            for fd in self.held.pop(0):
                os.close(fd)

    def op_use_held(self) -> None:
        """A call on a held descriptor, whose name may since have moved or gone."""
        data, name = self.data(), "user." + self.rng.choice(NAMES)
        calls: list[tuple[str, collections.abc.Callable[[int], object]]] = [
            (f"write {len(data)} bytes", lambda fd: os.write(fd, data)),
            ("pread", lambda fd: hashlib.sha256(os.pread(fd, 1 << 20, 0)).hexdigest()[:16]),
            ("fstat", lambda fd: describe_stat(os.fstat(fd))),
            ("ftruncate 5000", lambda fd: os.ftruncate(fd, 5000)),
            ("fchmod 640", lambda fd: os.fchmod(fd, 0o640)),
            ("fchown 1000:1002", lambda fd: os.fchown(fd, 1000, 1002)),
            ("fsync", os.fsync),
            ("futimes", lambda fd: os.utime(fd, ns=(3_000_000_000, 4_000_000_000))),
            (f"fsetxattr {name}", lambda fd: os.setxattr(fd, name, data[:100])),
            (f"fgetxattr {name}", lambda fd: os.getxattr(fd, name).hex()),
            ("flistxattr", lambda fd: sorted(n for n in os.listxattr(fd) if n.startswith("user."))),
            ("listdir of the descriptor", lambda fd: sorted(os.listdir(fd))),
        ]
        what, call = self.rng.choice(calls)
        self.on_held(what, call)

    def op_close_held(self) -> None:
        if self.held:
            fds = self.held.pop(self.rng.randrange(len(self.held)))
            for fd in fds:
                os.close(fd)
            self.recent.append(f"{self.done}: close a held descriptor")
