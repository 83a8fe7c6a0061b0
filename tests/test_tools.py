"""Real tools and processes on a real mount: cp, tar, rsync, git, sqlite3, mmap,
concurrent writers, editors' atomic saves, coreutils and attr tools.

Every test ends by checking that the daemon is still alive, the mount still
serves, and the daemon logged no error: ordinary tools doing ordinary things
must never reach an error path of envfs.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import Envfs, data_file_ids, envfs_mounts, process_gone, without_next_file

DOC = Path("/usr/share/doc")


# -- helpers -------------------------------------------------------------------


def sh(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60,
    check: bool = True, input: str | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a command; on failure the assertion carries its output."""
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        input=input, stdin=None if input is not None else subprocess.DEVNULL,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {result.returncode}\nstdout: {result.stdout[-3000:]}\n"
            f"stderr: {result.stderr[-3000:]}"
        )
    return result


def listing(root: Path) -> list[str]:
    """Type, mode, owner, size, mtime (ns), link target and link count of every entry.

    Directory sizes are left out: they are filesystem specific (ext4 says 4096).
    """
    out = sh("find", ".", "-printf", r"%P\t%y\t%m\t%U\t%G\t%s\t%T@\t%l\t%n\n", cwd=root).stdout
    lines = []
    for line in out.splitlines():
        fields = line.split("\t")
        if fields[1] == "d":
            fields[5] = "-"
        lines.append("\t".join(fields))
    return sorted(lines)


def assert_same_tree(a: Path, b: Path) -> None:
    sh("diff", "-r", "--no-dereference", a, b, timeout=120)
    left, right = listing(a), listing(b)
    if left != right:
        only_left = sorted(set(left) - set(right))[:20]
        only_right = sorted(set(right) - set(left))[:20]
        raise AssertionError(f"listings differ\nonly in {a}: {only_left}\nonly in {b}: {only_right}")


def xattr_dump(root: Path) -> str:
    """All xattrs of a tree, by relative path (symlinks not followed)."""
    result = sh("getfattr", "-R", "-P", "-h", "-d", "-m", "-", "-e", "hex", ".", cwd=root, check=False)
    assert result.returncode == 0, result.stderr
    blocks = [b.strip() for b in result.stdout.split("\n\n") if b.strip()]
    return "\n\n".join(sorted(blocks))


def assert_healthy(fs: Envfs) -> None:
    """The daemon lives, the mount serves, and nothing reached an error path."""
    pid = fs.daemon_pid()
    assert not process_gone(pid), f"daemon {pid} died\n{fs.log_text()[-4000:]}"
    assert str(fs.mnt) in envfs_mounts()
    probe = fs.mnt / ".health-probe"
    payload = os.urandom(10_000)
    probe.write_bytes(payload)
    assert probe.read_bytes() == payload
    probe.unlink()
    errors = [line for line in fs.log_text().splitlines() if " ERROR " in line or "Traceback" in line]
    assert not errors, "daemon logged errors:\n" + "\n".join(errors[:30])


def doc_subset(limit: int = 800, biggest: int = 400_000) -> list[str]:
    """Top-level entries of /usr/share/doc: every symlink, then directories
    in name order (none over `biggest` bytes) up to about `limit` entries."""
    chosen: list[str] = []
    count = 0
    for name in sorted(os.listdir(DOC)):
        path = DOC / name
        if path.is_symlink():
            chosen.append(name)
            continue
        n, size = 1, 0
        for d, dirs, files in os.walk(path):
            n += len(dirs) + len(files)
            size += sum(os.lstat(os.path.join(d, f)).st_size for f in files)
        if size > biggest or count + n > limit:
            continue
        chosen.append(name)
        count += n
    return chosen


def make_doc_copy(dest: Path) -> Path:
    """A local copy (cp -a, so times and modes kept) of a subset of /usr/share/doc."""
    dest.mkdir(parents=True)
    sh("cp", "-a", "-t", dest, *(DOC / n for n in doc_subset()), timeout=120)
    return dest


def make_mixed_tree(root: Path) -> Path:
    """A small tree with what archivers must keep: modes, symlinks, hard links,
    empty files and directories, sizes around block boundaries, a sparse file, mtimes."""
    root.mkdir(parents=True)
    (root / "sub" / "deeper" / "deepest").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for size in (0, 1, 4095, 4096, 4097, 8191, 65536, 300_001):
        (root / f"f{size}").write_bytes(os.urandom(size))
    (root / "sub" / "text.txt").write_text("hello\n" * 1000)
    (root / "sub" / "deeper" / "deepest" / "leaf").write_bytes(os.urandom(12345))
    script = root / "sub" / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    os.chmod(script, 0o755)
    secret = root / "secret"
    secret.write_text("only me\n")
    os.chmod(secret, 0o600)
    os.chmod(root / "empty-dir", 0o711)
    os.symlink("sub/text.txt", root / "rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("deeper", root / "sub" / "dirlink")
    os.link(root / "f4097", root / "sub" / "hardlink-f4097")
    with open(root / "sparse", "wb") as f:
        f.truncate(5 << 20)
        f.seek(3 << 20)
        f.write(b"in the middle")
    (root / ("long-" + "n" * 250)).write_text("long name\n")
    (root / "spaces and ünïcödé").write_text("names\n")
    for i, path in enumerate(sorted(root.rglob("*"))):
        os.utime(path, ns=(1_600_000_000_000_000_000 + i, 1_500_000_000_123_456_789 + i * 1000), follow_symlinks=False)
    os.utime(root, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    return root


def data_files(fs: Envfs) -> list[Path]:
    return [p for p in (fs.store / "data").rglob("*") if p.is_file()]


@pytest.fixture
def fs(store: Envfs) -> Envfs:
    store.mount()
    return store


# -- cp -a, diff -r, remount ---------------------------------------------------


@pytest.mark.timeout(300)
def test_cp_a_doc_tree_then_remount(fs: Envfs, tmp_path: Path) -> None:
    src = make_doc_copy(tmp_path / "scratch" / "doc")
    nfiles = int(sh("sh", "-c", "find . | wc -l", cwd=src).stdout)
    assert nfiles > 700
    assert any(p.is_symlink() for p in src.iterdir())
    dst = fs.mnt / "doc"
    sh("cp", "-a", src, dst, timeout=240)
    assert_same_tree(src, dst)
    # rsync's view (sizes, times, modes, links, xattrs): nothing differs.
    changes = sh("rsync", "-aHXni", "--delete", f"{src}/", f"{dst}/", timeout=120).stdout
    assert changes.strip() == ""
    fs.remount()
    assert_same_tree(src, dst)
    assert sh("du", "-s", "--apparent-size", "-B1", dst).stdout.split()[0] != "0"
    # rm -rf frees every data file in the store
    assert len(data_files(fs)) > 400
    sh("rm", "-rf", dst)
    assert os.listdir(fs.mnt) == []
    deadline = time.monotonic() + 20
    while data_files(fs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert data_files(fs) == []
    assert_healthy(fs)


# -- tar -------------------------------------------------------------------------


def _tar_members(archive: Path) -> list[str]:
    """Sorted `tar -tv` lines: mode, owner, size, mtime, name and link target."""
    return sorted(sh("tar", "--numeric-owner", "--full-time", "-tvf", archive).stdout.splitlines())


def test_tar_round_trip(fs: Envfs, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    local = make_mixed_tree(scratch / "local")
    # local -> tar -> mount
    sh("tar", "-C", local, "--format=posix", "--sparse", "-cf", scratch / "local.tar", ".")
    on_mount = fs.mnt / "from-tar"
    on_mount.mkdir()
    sh("tar", "-C", on_mount, "-xpf", scratch / "local.tar")
    os.utime(on_mount, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    assert_same_tree(local, on_mount)
    assert os.stat(on_mount / "f4097").st_ino == os.stat(on_mount / "sub" / "hardlink-f4097").st_ino
    # mount -> tar (archive written onto the mount too) -> elsewhere
    sh("tar", "-C", on_mount, "--format=posix", "--sparse", "-cf", fs.mnt / "again.tar", ".")
    assert _tar_members(fs.mnt / "again.tar") == _tar_members(scratch / "local.tar")
    out = scratch / "out"
    out.mkdir()
    sh("tar", "-C", out, "-xpf", fs.mnt / "again.tar")
    os.utime(out, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    assert_same_tree(local, out)
    # a compressed stream through a pipe, both ends on the mount
    sh(
        "sh",
        "-c",
        f"tar -C '{on_mount}' --format=posix -czf - . | (mkdir '{fs.mnt}/piped' && tar -C '{fs.mnt}/piped' -xzpf -)",
    )
    os.utime(fs.mnt / "piped", ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    assert_same_tree(local, fs.mnt / "piped")
    fs.remount()
    assert_same_tree(local, on_mount)
    sh("tar", "-C", on_mount, "--compare", "-f", scratch / "local.tar")
    assert_healthy(fs)


# -- rsync -aHAX ---------------------------------------------------------------


def test_rsync_aHAX_round_trip(fs: Envfs, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    src = make_mixed_tree(scratch / "src")
    for i in range(3):
        os.link(src / "f65536", src / "sub" / f"h{i}")
    os.setxattr(src / "f1", "user.color", b"blue")
    os.setxattr(src / "f1", "user.empty", b"")
    os.setxattr(src / "sub", "user.dir-attr", b"on a directory")
    os.setxattr(src / "f4097", "user.binary", bytes(range(256)) * 8)
    os.setxattr(src / "sub" / "run.sh", "trusted.t", b"\x00\x01\x02")
    for i in range(20):
        os.setxattr(src / "f4096", f"user.many{i:02d}", f"value {i}".encode())
    os.utime(src / "sub", ns=(1, 1_400_000_000_000_000_000))
    os.utime(src, ns=(1, 1_400_000_000_000_000_000))

    dst = fs.mnt / "dst"
    sh("rsync", "-aHAX", f"{src}/", f"{dst}/")
    assert_same_tree(src, dst)
    assert xattr_dump(src) == xattr_dump(dst)
    inos = {os.stat(dst / p).st_ino for p in ("f65536", "sub/h0", "sub/h1", "sub/h2")}
    assert len(inos) == 1 and os.stat(dst / "f65536").st_nlink == 4
    assert os.stat(dst / "f4097").st_ino == os.stat(dst / "sub" / "hardlink-f4097").st_ino

    again = sh("rsync", "-aHAXi", "--stats", f"{src}/", f"{dst}/").stdout
    itemized = [line for line in again.splitlines() if re.match(r"^[<>ch.*][fdLDS]", line)]
    assert itemized == [], again
    assert "Number of regular files transferred: 0" in again

    back = scratch / "back"
    sh("rsync", "-aHAX", f"{dst}/", f"{back}/")
    assert_same_tree(src, back)
    assert xattr_dump(src) == xattr_dump(back)
    assert os.stat(back / "sub" / "h1").st_ino == os.stat(back / "f65536").st_ino
    again = sh("rsync", "-aHAXi", "--stats", f"{dst}/", f"{back}/").stdout
    assert "Number of regular files transferred: 0" in again

    # An update: rsync writes a temp file and renames it over the old one.
    (src / "sub" / "text.txt").write_text("changed\n")
    os.setxattr(src / "f1", "user.color", b"red")
    os.remove(src / "f0")
    out = sh("rsync", "-aHAXi", "--delete", f"{src}/", f"{dst}/").stdout
    assert "sub/text.txt" in out and "f0" in out
    assert (dst / "sub" / "text.txt").read_text() == "changed\n"
    assert os.getxattr(dst / "f1", "user.color") == b"red"
    # delta transfer in place: rsync reads the old file while rewriting it
    with open(src / "f300001", "r+b") as f:
        f.seek(150_000)
        f.write(b"patched in the middle")
        f.seek(0, os.SEEK_END)
        f.write(b"and grown at the end")
    ino = os.stat(dst / "f300001").st_ino
    out = sh("rsync", "-aHAXi", "--inplace", "--no-whole-file", "--stats", f"{src}/", f"{dst}/").stdout
    assert "Number of regular files transferred: 1" in out
    assert os.stat(dst / "f300001").st_ino == ino
    assert (dst / "f300001").read_bytes() == (src / "f300001").read_bytes()
    # rsync leaves the top directory's mtime as its own deletion set it, on ext4 too
    for top in (src, dst):
        os.utime(top, ns=(1, 1_400_000_000_000_000_000))
    fs.remount()
    assert_same_tree(src, dst)
    assert xattr_dump(src) == xattr_dump(dst)
    assert "Number of regular files transferred: 0" in sh("rsync", "-aHAXc", "--stats", f"{src}/", f"{dst}/").stdout
    assert_healthy(fs)


# -- git -------------------------------------------------------------------------


def test_git_repository(fs: Envfs, tmp_path: Path) -> None:
    home = tmp_path / "scratch" / "home"
    home.mkdir(parents=True)
    env = dict(os.environ, HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_DATE="2020-01-01T00:00:00Z",
               GIT_COMMITTER_DATE="2020-01-01T00:00:00Z")  # fmt: skip
    repo = fs.mnt / "repo"
    repo.mkdir()

    def git(*args: str, timeout: float = 60) -> str:
        return sh("git", "-c", "user.name=Envfs Test", "-c", "user.email=t@example.com", "-c", "gc.auto=0",
                  *args, cwd=repo, env=env, timeout=timeout).stdout  # fmt: skip

    git("init", "-q", "-b", "main")
    for i in range(10):
        (repo / f"file{i}.txt").write_text(f"version {i}\n" + "line\n" * (i * 50))
        (repo / "shared.txt").write_text("".join(f"commit {j}\n" for j in range(i + 1)))
        if i % 3 == 2:
            (repo / "dir" / f"sub{i}").mkdir(parents=True)
            (repo / "dir" / f"sub{i}" / "blob.bin").write_bytes(os.urandom(20_000))
        if i == 6:
            git("mv", "file0.txt", "renamed0.txt")
        if i == 8:
            git("rm", "-q", "file1.txt")
        git("add", "-A")
        git("commit", "-q", "-m", f"commit {i}")
    assert len(git("log", "--oneline").splitlines()) == 10
    assert git("status", "--porcelain") == ""
    git("branch", "side", "HEAD~5")
    git("tag", "-a", "v1", "-m", "tag one", "HEAD~4")
    git("gc", "-q", "--prune=now", timeout=120)
    assert list((repo / ".git" / "objects" / "pack").glob("*.pack"))
    git("fsck", "--full", "--strict")
    git("checkout", "-q", "side")
    assert not (repo / "renamed0.txt").exists() and (repo / "file1.txt").exists()
    git("checkout", "-q", "main")
    assert git("status", "--porcelain") == ""
    assert "renamed0.txt" in git("log", "--stat", "-1", "HEAD~3")
    head = git("rev-parse", "HEAD").strip()

    clone = tmp_path / "scratch" / "clone"
    sh("git", "clone", "-q", repo, clone, env=env)
    assert sh("git", "rev-parse", "HEAD", cwd=clone, env=env).stdout.strip() == head
    fs.remount()
    git("fsck", "--full", "--strict")
    assert git("rev-parse", "HEAD").strip() == head
    assert len(git("log", "--oneline", "--all").splitlines()) == 10
    assert git("status", "--porcelain") == ""
    assert_healthy(fs)


# -- sqlite3 ---------------------------------------------------------------------


def _sqlite(db: Path, script: str, timeout: float = 90, mmap_size: int = 0) -> str:
    """Run a script; with `mmap_size`, SQLite reads the database through mmap."""
    script = f"PRAGMA mmap_size={mmap_size};\n" + script if mmap_size else script
    return sh("sqlite3", "-batch", "-bail", db, input=script, timeout=timeout).stdout


def _insert_transactions(start: int, count: int, rows: int) -> str:
    parts = []
    for t in range(start, start + count):
        parts.append(
            "BEGIN;\n"
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {rows}) "
            f"INSERT INTO t(tx, k, v) SELECT {t}, i, hex(randomblob(40 + (i % 200))) FROM n;\n"
            f"UPDATE t SET v = v || 'u' WHERE tx = {t} AND k % 7 = 0;\n"
            f"DELETE FROM t WHERE tx = {t} AND k % 11 = 0;\n"
            "COMMIT;\n"
        )
    return "".join(parts)


_SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, tx INTEGER, k INTEGER, v TEXT);\nCREATE INDEX t_tx ON t(tx, k);\n"


def _expected_rows(transactions: int, rows: int) -> int:
    return transactions * (rows - rows // 11)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite_database(fs: Envfs, journal: str) -> None:
    db = fs.mnt / "db.sqlite"
    _sqlite(db, f"PRAGMA journal_mode={journal};\n{_SCHEMA}")
    for batch in range(3):
        _sqlite(db, _insert_transactions(batch * 20, 20, 100), mmap_size=(1 << 26) * batch)
    expected = _expected_rows(60, 100)
    check = "PRAGMA integrity_check;\nSELECT count(*) FROM t;\nSELECT count(DISTINCT tx) FROM t;\n"
    assert _sqlite(db, check).split() == ["ok", str(expected), "60"]
    if journal == "wal":
        assert _sqlite(db, "PRAGMA journal_mode;").strip() == "wal"
        # A reader in another process while the writer commits.
        reader = subprocess.Popen(
            ["sqlite3", "-batch", db],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _sqlite(db, _insert_transactions(60, 15, 100))
        out, err = reader.communicate("SELECT count(*) >= 0 FROM t;\n" * 200, timeout=60)
        assert reader.returncode == 0 and err == "" and out.split() == ["1"] * 200
        expected = _expected_rows(75, 100)
        _sqlite(db, "PRAGMA wal_checkpoint(TRUNCATE);")
    _sqlite(db, "VACUUM;")
    assert _sqlite(db, check).split() == ["ok", str(expected), str(expected // 91)]
    digest = _sqlite(db, "SELECT sum(length(v)), sum(k), max(id) FROM t;")
    fs.remount()
    assert _sqlite(db, check).split() == ["ok", str(expected), str(expected // 91)]
    assert _sqlite(db, "SELECT sum(length(v)), sum(k), max(id) FROM t;") == digest
    if journal == "wal":
        assert _sqlite(db, "PRAGMA journal_mode;").strip() == "wal"
    assert_healthy(fs)


# -- mmap ------------------------------------------------------------------------


def test_mmap_reads_data_written_with_write(fs: Envfs) -> None:
    for size in (1, 4095, 4096, 4097, 3 * 4096 + 17, 1 << 20):
        path = fs.mnt / f"w{size}"
        data = os.urandom(size)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for off in range(0, size, 1000):
                os.pwrite(fd, data[off : off + 1000], off)
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
                assert len(m) == size
                assert m[:] == data
                assert m[size // 2 : size // 2 + 10] == data[size // 2 : size // 2 + 10]
        finally:
            os.close(fd)
    # another open file's mmap sees a write made after it was mapped
    path = fs.mnt / "w4097"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        with open(path, "r+b") as g:
            g.seek(100)
            g.write(b"NEW")
        assert m[100:103] == b"NEW"
    assert_healthy(fs)


def test_mmap_shared_writes_reach_read_and_survive_remount(fs: Envfs) -> None:
    path = fs.mnt / "shared"
    original = os.urandom(5 * 4096 + 333)
    path.write_bytes(original)
    model = bytearray(original)
    edits = [
        (0, b"start"),
        (4090, b"across-a-block-boundary"),
        (3 * 4096, os.urandom(4096)),
        (len(model) - 5, b"tail!"),
    ]
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
            for off, chunk in edits:
                m[off : off + len(chunk)] = chunk
                model[off : off + len(chunk)] = chunk
            m.flush()
            assert os.pread(fd, len(model) + 10, 0) == bytes(model)
            with open(path, "rb") as other:
                assert other.read() == bytes(model)
            m[10:20] = b"0123456789"
            model[10:20] = b"0123456789"
        # munmap without msync: the dirty page is still written back
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(model)
    assert os.stat(path).st_size == len(model)
    fs.remount()
    assert path.read_bytes() == bytes(model)
    assert_healthy(fs)


def test_mmap_after_truncate_extend(fs: Envfs) -> None:
    path = fs.mnt / "grown"
    path.write_bytes(b"head")
    size = 256 * 1024 + 100
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            assert m[:4] == b"head" and m[4:] == bytes(size - 4)
            pattern = hashlib.sha256(b"x").digest() * (size // 32 + 1)
            m[4:] = pattern[: size - 4]
            m.flush()
        expected = b"head" + pattern[: size - 4]
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, size + 1, 0) == expected
    finally:
        os.close(fd)
    # a sparse file filled through a map, page by page, in reverse order
    sparse = fs.mnt / "sparse-mapped"
    fd = os.open(sparse, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 64 * 4096)
        with mmap.mmap(fd, 64 * 4096) as m:
            for page in reversed(range(0, 64, 3)):
                m[page * 4096 : page * 4096 + 8] = page.to_bytes(8, "big")
    finally:
        os.close(fd)
    fs.remount()
    assert path.read_bytes() == expected
    content = sparse.read_bytes()
    assert len(content) == 64 * 4096
    for page in range(64):
        want = page.to_bytes(8, "big") if page % 3 == 0 else bytes(8)
        assert content[page * 4096 : page * 4096 + 8] == want, page
        assert content[page * 4096 + 8 : (page + 1) * 4096] == bytes(4088)
    assert_healthy(fs)


# -- several processes at once -----------------------------------------------------

WORKERS = 6

_OWN_FILE_WORKER = textwrap.dedent("""
    import hashlib, os, random, sys
    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    data = rng.randbytes(1_000_000 + seed * 4099)
    with open(path, "wb") as f:
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 100, 4096, 5000, 65536, rng.randrange(1, 30000)])
            f.write(data[pos : pos + n])
            pos += n
        f.flush()
        os.fsync(f.fileno())
    for _ in range(3):
        with open(path, "rb") as f:
            assert f.read() == data, "read back differs"
    print(hashlib.sha256(data).hexdigest())
""")

_REGION_WORKER = textwrap.dedent("""
    import os, random, sys
    path, index, region = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(index)
    data = bytes([65 + index]) * region
    fd = os.open(path, os.O_WRONLY)
    pieces = []
    pos = 0
    while pos < region:
        n = rng.choice([1, 17, 999, 4096, 4097, 10000])
        pieces.append((pos, min(n, region - pos)))
        pos += n
    rng.shuffle(pieces)
    for pos, n in pieces:
        assert os.pwrite(fd, data[pos : pos + n], index * region + pos) == n
    os.close(fd)
""")

_APPEND_WORKER = textwrap.dedent("""
    import os, random, sys
    path, index, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(index)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for seq in range(count):
        body = chr(97 + index) * rng.randrange(1, 6000)
        record = f"<{index}:{seq}:{len(body)}:{body}>\\n".encode()
        assert os.write(fd, record) == len(record)
    os.close(fd)
""")


def _run_workers(script: str, argvs: list[list[str]], timeout: float = 100) -> list[str]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for argv in argvs
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    return outputs


def test_parallel_writers_own_files(fs: Envfs) -> None:
    paths = [fs.mnt / "par" / f"worker{i}" for i in range(WORKERS)]
    paths[0].parent.mkdir()
    digests = _run_workers(_OWN_FILE_WORKER, [[str(p), str(i)] for i, p in enumerate(paths)])
    fs.remount()
    for path, digest in zip(paths, digests, strict=True):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert_healthy(fs)


def test_parallel_pwrite_disjoint_regions_of_one_file(fs: Envfs) -> None:
    path = fs.mnt / "regions"
    region = 100_003  # regions share blocks: every boundary is mid-block
    path.write_bytes(b"")
    os.truncate(path, WORKERS * region)
    _run_workers(_REGION_WORKER, [[str(path), str(i), str(region)] for i in range(WORKERS)])
    expected = b"".join(bytes([65 + i]) * region for i in range(WORKERS))
    assert path.read_bytes() == expected
    fs.remount()
    assert path.read_bytes() == expected
    assert_healthy(fs)


def test_parallel_o_append(fs: Envfs) -> None:
    path = fs.mnt / "journal.log"
    count = 300
    _run_workers(_APPEND_WORKER, [[str(path), str(i), str(count)] for i in range(WORKERS)])

    def check() -> None:
        data = path.read_text()
        assert len(data) == os.stat(path).st_size
        records = data.split("\n")
        assert records[-1] == ""
        seen: dict[int, list[int]] = {i: [] for i in range(WORKERS)}
        for record in records[:-1]:
            match = re.fullmatch(r"<(\d+):(\d+):(\d+):([a-z]*)>", record)
            assert match, f"torn record: {record[:80]!r}"
            index, seq, length, body = int(match[1]), int(match[2]), int(match[3]), match[4]
            assert body == chr(97 + index) * length
            seen[index].append(seq)
        for index in range(WORKERS):
            assert seen[index] == list(range(count)), index

    check()
    fs.remount()
    check()
    assert_healthy(fs)


def test_parallel_mixed_tools(fs: Envfs, tmp_path: Path) -> None:
    """Different tools in parallel on one mount: cp, tar, sqlite3, git, a hashing reader."""
    src = make_mixed_tree(tmp_path / "scratch" / "src")
    home = tmp_path / "scratch" / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))
    (fs.mnt / "git").mkdir()
    script = (
        f"set -e; cd '{fs.mnt}/git'; git init -q; for i in $(seq 1 10); do echo $i > f$i; git add f$i;"
        " git -c user.name=a -c user.email=a@b commit -qm c$i; done; git fsck --full"
    )
    jobs = [
        ["sh", "-c", f"for i in 1 2; do cp -a '{src}' '{fs.mnt}/cp'$i; done"],
        [
            "sh",
            "-c",
            f"for i in 1 2; do tar -C '{src}' --format=posix -cf - . | (mkdir '{fs.mnt}/tar'$i && "
            f"tar -C '{fs.mnt}/tar'$i -xpf -); done",
        ],  # fmt: skip
        [
            "sh",
            "-c",
            f"sqlite3 '{fs.mnt}/db' 'CREATE TABLE t(x)'; for i in $(seq 1 25); do sqlite3 '{fs.mnt}/db' "
            '"INSERT INTO t SELECT randomblob(1000) FROM (SELECT 1 UNION SELECT 2 UNION SELECT 3)"; done',
        ],
        ["sh", "-c", script],
        [
            "sh",
            "-c",
            f"for i in $(seq 1 12); do head -c 300000 /dev/urandom > '{fs.mnt}/r'$i; "
            f"sha256sum '{fs.mnt}/r'$i > /dev/null; done",
        ],  # fmt: skip
        [
            "sh",
            "-c",
            f"for i in $(seq 1 15); do find '{fs.mnt}' -xdev > /dev/null 2>&1 || true; "
            f"ls -lR '{fs.mnt}' > /dev/null 2>&1 || true; done",
        ],  # fmt: skip
    ]
    procs = [subprocess.Popen(job, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job in jobs]
    for job, proc in zip(jobs, procs, strict=True):
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, f"{job}: {err}"
    for i in (1, 2):
        os.utime(fs.mnt / f"tar{i}", ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
        assert_same_tree(src, fs.mnt / f"tar{i}")
        sh("diff", "-r", "--no-dereference", src, fs.mnt / f"cp{i}")
    assert _sqlite(fs.mnt / "db", "PRAGMA integrity_check; SELECT count(*) FROM t;").split() == ["ok", "75"]
    assert_healthy(fs)


_CHURN_WORKER = textwrap.dedent("""
    import errno, os, sys
    d, index, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    link = os.path.join(d, f"link-{index}")
    for i in range(rounds):
        tmp = os.path.join(d, f"tmp-{index}-{i}")
        with open(tmp, "wb") as f:
            f.write(f"{index}:{i}:".encode() * 300)
        if i % 3 == 0 and not os.path.exists(link):
            os.link(tmp, link)
        os.rename(tmp, os.path.join(d, "current"))
        try:
            os.mkdir(os.path.join(d, "shared"))
        except FileExistsError:
            pass
        try:
            os.rmdir(os.path.join(d, "shared"))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        if i % 3 == 2 and os.path.exists(link):
            os.unlink(link)
        with open(os.path.join(d, "current"), "rb") as f:
            data = f.read()
        a, b, _ = data.split(b":", 2)
        assert data == f"{int(a)}:{int(b)}:".encode() * 300, data[:60]
""")


def test_parallel_rename_over_one_name(fs: Envfs) -> None:
    """Workers keep replacing one name, linking, unlinking, making and removing one directory."""
    d = fs.mnt / "churn"
    d.mkdir()
    rounds = 60
    _run_workers(_CHURN_WORKER, [[str(d), str(i), str(rounds)] for i in range(WORKERS)])
    names = sorted(os.listdir(d))
    assert [n for n in names if n.startswith("tmp-")] == []
    assert "current" in names and "shared" not in names
    live = {os.stat(d / n).st_ino for n in names}
    deadline = time.monotonic() + 15
    while without_next_file(data_file_ids(fs), live) != live and time.monotonic() < deadline:
        time.sleep(0.1)
    assert without_next_file(data_file_ids(fs), live) == live
    fs.remount()
    assert sorted(os.listdir(d)) == names
    a, b, _ = (d / "current").read_bytes().split(b":", 2)
    assert (d / "current").read_bytes() == f"{int(a)}:{int(b)}:".encode() * 300
    assert_healthy(fs)


def _sqlite_worker_script(worker: int, transactions: int, rows: int) -> str:
    lines = [".timeout 30000"]
    for t in range(transactions):
        lines.append("BEGIN IMMEDIATE;")
        lines += [f"INSERT INTO t VALUES({worker}, {t * rows + i}, randomblob({100 + i * 7}));" for i in range(rows)]
        lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite_concurrent_writers(fs: Envfs, journal: str) -> None:
    """Four sqlite3 processes write one database at once; SQLite's locks over FUSE keep it whole."""
    db = fs.mnt / "shared.db"
    _sqlite(db, f"PRAGMA journal_mode={journal};\nCREATE TABLE t(w INTEGER, i INTEGER, v BLOB);\n")
    writers, transactions, rows = 4, 12, 20
    procs = [
        subprocess.Popen(
            ["sqlite3", "-batch", "-bail", db],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(writers + 1)
    ]
    scripts = [_sqlite_worker_script(w, transactions, rows) for w in range(writers)]
    scripts.append(".timeout 30000\n" + "SELECT count(*) % 20 FROM t;\n" * 100)  # a reader sees whole transactions
    for proc, script in zip(procs, scripts, strict=True):
        proc.stdin.write(script)
        proc.stdin.close()
    results = [(proc.wait(timeout=90), proc.stdout.read(), proc.stderr.read()) for proc in procs]
    for proc in procs:
        proc.stdout.close()
        proc.stderr.close()
    for code, _, err in results:
        assert code == 0 and err == "", err
    assert set(results[-1][1].split()) == {"0"}
    total = writers * transactions * rows
    check = "PRAGMA integrity_check;\nSELECT count(*), count(DISTINCT w), count(DISTINCT w * 100000 + i) FROM t;\n"
    assert _sqlite(db, check).split() == ["ok", f"{total}|{writers}|{total}"]
    fs.remount()
    assert _sqlite(db, check).split() == ["ok", f"{total}|{writers}|{total}"]
    assert_healthy(fs)


# -- a burst of bad requests -------------------------------------------------------


def _expect(err: int | tuple[int, ...], func, *args, **kwargs) -> None:  # noqa: ANN001
    errs = err if isinstance(err, tuple) else (err,)
    try:
        func(*args, **kwargs)
    except OSError as e:
        assert e.errno in errs, f"{func.__name__}{args}: {errno.errorcode.get(e.errno)}, wanted {errs}"
    else:
        raise AssertionError(f"{func.__name__}{args} succeeded, wanted {errs}")


def test_daemon_survives_bad_requests(fs: Envfs) -> None:
    m = fs.mnt
    (m / "dir" / "sub").mkdir(parents=True)
    (m / "dir" / "file").write_text("content")
    (m / "file").write_bytes(b"0123456789")
    os.symlink("loop-b", m / "loop-a")
    os.symlink("loop-a", m / "loop-b")
    os.symlink("self", m / "self")
    long_name = "x" * 256
    pid = fs.daemon_pid()
    for _ in range(15):
        _expect(errno.ENOENT, os.stat, m / "missing")
        _expect(errno.ENOENT, os.open, m / "missing", os.O_RDONLY)
        _expect(errno.ENOENT, os.open, m / "nodir" / "f", os.O_RDWR | os.O_CREAT)
        _expect(errno.ENOENT, os.unlink, m / "missing")
        _expect(errno.ENOENT, os.rename, m / "missing", m / "other")
        _expect(errno.ENOENT, os.listdir, m / "missing")
        _expect(errno.ENAMETOOLONG, os.stat, m / long_name)
        _expect(errno.ENAMETOOLONG, os.open, m / long_name, os.O_RDWR | os.O_CREAT)
        _expect(errno.ENAMETOOLONG, os.mkdir, m / long_name)
        _expect(errno.ENAMETOOLONG, os.symlink, "t", m / long_name)
        _expect(errno.ENAMETOOLONG, os.rename, m / "file", m / long_name)
        _expect(errno.ENAMETOOLONG, os.link, m / "file", m / long_name)
        _expect(errno.ENAMETOOLONG, os.mkdir, m / ("é" * 128))  # 256 bytes in UTF-8
        _expect(errno.ENOTEMPTY, os.rmdir, m / "dir")
        _expect(errno.ENOTDIR, os.rmdir, m / "file")
        _expect(errno.EISDIR, os.unlink, m / "dir")
        _expect(errno.EEXIST, os.mkdir, m / "dir")
        _expect(errno.EEXIST, os.open, m / "file", os.O_RDWR | os.O_CREAT | os.O_EXCL)
        _expect(errno.EISDIR, os.open, m / "dir", os.O_WRONLY)
        _expect(errno.ENOTDIR, os.stat, m / "file" / "x")
        _expect(errno.ENOTDIR, os.listdir, m / "file")
        _expect(errno.ENOTDIR, os.rename, m / "dir", m / "file")
        _expect(errno.EISDIR, os.rename, m / "file", m / "dir")
        _expect(errno.EINVAL, os.rename, m / "dir", m / "dir" / "sub" / "inside")
        _expect(errno.EINVAL, os.rename, m / "dir", m / "dir" / "self")
        _expect(errno.EPERM, os.link, m / "dir", m / "dirlink")
        _expect(errno.ENODATA, os.getxattr, m / "file", "user.missing")
        _expect(errno.ENODATA, os.removexattr, m / "file", "user.missing")
        _expect(errno.EOPNOTSUPP, os.setxattr, m / "file", "bogus.namespace", b"v")
        _expect(errno.EOPNOTSUPP, os.getxattr, m / "file", "bogus.namespace")
        _expect(errno.ERANGE, os.setxattr, m / "file", "user." + "a" * 300, b"v")
        _expect((errno.E2BIG, errno.ENOSPC), os.setxattr, m / "file", "user.big", b"v" * 70_000)
        _expect(errno.ELOOP, os.open, m / "loop-a", os.O_RDONLY)
        _expect(errno.ELOOP, os.stat, m / "self")
        _expect(errno.ELOOP, os.open, m / "self", os.O_RDWR | os.O_CREAT)
        _expect(errno.EINVAL, os.readlink, m / "file")
        _expect(errno.EINVAL, os.truncate, m / "file", -1)
        _expect(errno.EISDIR, os.truncate, m / "dir", 0)
        fd = os.open(m / "file", os.O_RDONLY)
        try:
            assert os.pread(fd, 100, 1 << 40) == b""
            assert os.pread(fd, 100, (1 << 62)) == b""
            assert os.pread(fd, 1 << 20, 5) == b"56789"
            _expect(errno.EBADF, os.write, fd, b"nope")
            _expect(errno.EBADF, os.pwrite, fd, b"nope", 0)
            _expect(errno.EINVAL, os.ftruncate, fd, 0)
            _expect(errno.EINVAL, os.lseek, fd, -5, os.SEEK_SET)
        finally:
            os.close(fd)
        fd = os.open(m / "file", os.O_WRONLY)
        try:
            _expect(errno.EBADF, os.read, fd, 10)
            _expect(errno.EINVAL, os.ftruncate, fd, -1)
        finally:
            os.close(fd)
        dfd = os.open(m / "dir", os.O_RDONLY | os.O_DIRECTORY)
        try:
            _expect(errno.EISDIR, os.read, dfd, 10)
        finally:
            os.close(dfd)
    assert fs.daemon_pid() == pid and not process_gone(pid)
    # Everything is still as it was.
    assert sorted(os.listdir(m)) == ["dir", "file", "loop-a", "loop-b", "self"]
    assert sorted(os.listdir(m / "dir")) == ["file", "sub"]
    assert (m / "file").read_bytes() == b"0123456789"
    assert (m / "dir" / "file").read_text() == "content"
    assert os.listxattr(m / "file") == []
    fs.remount()
    assert sorted(os.listdir(m)) == ["dir", "file", "loop-a", "loop-b", "self"]
    assert (m / "file").read_bytes() == b"0123456789"
    assert_healthy(fs)


def test_write_beyond_the_maximum_file_size(fs: Envfs) -> None:
    """ext4 answers EFBIG past its 16 TiB limit, and the file stays as it was."""
    path = fs.mnt / "big"
    path.write_bytes(b"small")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"far", 1 << 40)
        assert os.pread(fd, 10, 1 << 40) == b"far"
        assert os.fstat(fd).st_size == (1 << 40) + 3
        errors = []
        for attempt in (lambda: os.pwrite(fd, b"too far", 1 << 62), lambda: os.ftruncate(fd, 1 << 62)):
            try:
                attempt()
            except OSError as e:
                errors.append(e.errno)
        assert os.fstat(fd).st_size == (1 << 40) + 3
        assert os.pread(fd, 5, 0) == b"small" and os.pread(fd, 10, 1 << 40) == b"far"
    finally:
        os.close(fd)
    assert os.stat(path).st_blocks * 512 < 1 << 20
    assert [errno.errorcode[e] for e in errors] == ["EFBIG", "EFBIG"]
    assert_healthy(fs)


# -- editors' atomic save ------------------------------------------------------------

_READER = textwrap.dedent("""
    import os, sys, time
    path, stop = sys.argv[1], sys.argv[2]
    reads = 0
    while not os.path.exists(stop):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            print("missing"); sys.exit(1)
        head, _, body = data.partition(b"\\n")
        n = int(head)
        if body != bytes([n % 251]) * (1000 + n * 37):
            print(f"torn version {n}: {len(body)} bytes"); sys.exit(1)
        reads += 1
    print(reads)
""")


def _version(n: int) -> bytes:
    return f"{n}\n".encode() + bytes([n % 251]) * (1000 + n * 37)


def test_editor_atomic_save(fs: Envfs) -> None:
    target = fs.mnt / "doc.txt"
    target.write_bytes(_version(0))
    os.chmod(target, 0o640)
    os.setxattr(target, "user.tag", b"keep")
    stop = fs.mnt / ".stop"
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(target), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    inodes = {os.stat(target).st_ino}
    try:
        for n in range(1, 81):
            if n % 2:
                # most editors: write a temp file, fsync, copy attributes, rename over
                tmp = fs.mnt / f".doc.txt.tmp{n}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, _version(n))
                os.fsync(fd)
                os.fchmod(fd, 0o640)
                os.close(fd)
                os.setxattr(tmp, "user.tag", b"keep")
                os.rename(tmp, target)
                dfd = os.open(fs.mnt, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(dfd)
                os.close(dfd)
            else:
                # vim with 'writebackup': hard link a backup, replace, drop the backup
                backup = fs.mnt / "doc.txt~"
                os.link(target, backup)
                tmp = fs.mnt / "4913"
                tmp.write_bytes(_version(n))
                os.chmod(tmp, 0o640)
                os.setxattr(tmp, "user.tag", b"keep")
                os.replace(tmp, target)
                assert os.stat(backup).st_nlink == 1
                os.unlink(backup)
            inodes.add(os.stat(target).st_ino)
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, out + err
    assert int(out) > 0
    assert len(inodes) == 81
    assert target.read_bytes() == _version(80)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert os.getxattr(target, "user.tag") == b"keep"
    assert sorted(os.listdir(fs.mnt)) == [".stop", "doc.txt"]
    # replaced versions do not leak data files in the store
    files = {os.stat(fs.mnt / name).st_ino for name in (".stop", "doc.txt")}
    deadline = time.monotonic() + 15
    while not without_next_file(data_file_ids(fs), files) <= files and time.monotonic() < deadline:
        time.sleep(0.1)
    assert without_next_file(data_file_ids(fs), files) <= files, data_file_ids(fs)
    fs.remount()
    assert target.read_bytes() == _version(80)
    assert data_file_ids(fs) <= files
    assert_healthy(fs)


# -- coreutils, findutils, attr --------------------------------------------------------


def test_ls_li_stat_du_find(fs: Envfs) -> None:
    m = fs.mnt
    make_mixed_tree(m / "tree")
    out = sh("ls", "-lia", "--time-style=+%s", m / "tree").stdout
    seen = 0
    for line in out.splitlines()[1:]:
        fields = line.split(None, 7)
        ino, name = int(fields[0]), fields[7]
        name = name.split(" -> ")[0]
        assert ino == os.lstat(m / "tree" / name).st_ino, name
        assert ino == int(sh("stat", "-c", "%i", m / "tree" / name).stdout)
        seen += 1
    assert seen == len(os.listdir(m / "tree")) + 2
    assert os.stat(m / "tree" / "..").st_ino == 1
    # du of sparse files: apparent size large, real usage near zero
    sh("truncate", "-s", "1G", m / "sparse-1g")
    assert sh("du", "-B1", "--apparent-size", m / "sparse-1g").stdout.split()[0] == str(1 << 30)
    assert int(sh("du", "-k", m / "sparse-1g").stdout.split()[0]) <= 64
    sh("dd", "if=/dev/urandom", f"of={m}/sparse-1g", "bs=4096", "count=1", "seek=100000", "conv=notrunc")
    used = int(sh("du", "-k", m / "sparse-1g").stdout.split()[0])
    assert 4 <= used <= 64, used
    assert os.stat(m / "sparse-1g").st_size == 1 << 30
    dense = m / "dense"
    dense.write_bytes(os.urandom(1 << 20))
    assert 1024 <= int(sh("du", "-k", dense).stdout.split()[0]) <= 1200
    # find
    tree = m / "tree"
    names = sh("find", ".", "-type", "f", "-name", "f*", cwd=tree).stdout.split()
    assert sorted(names) == sorted(f"./f{s}" for s in (0, 1, 4095, 4096, 4097, 8191, 65536, 300_001))
    assert sorted(sh("find", ".", "-type", "l", cwd=tree).stdout.split()) == [
        "./dangling",
        "./rel-link",
        "./sub/dirlink",
    ]
    assert sorted(sh("find", ".", "-links", "2", "-type", "f", cwd=tree).stdout.split()) == [
        "./f4097", "./sub/hardlink-f4097"]  # fmt: skip
    big = sorted(sh("find", ".", "-size", "+200k", "-type", "f", cwd=tree).stdout.split())
    assert big == ["./f300001", "./sparse"]
    assert sh("find", ".", "-empty", "-type", "d", cwd=tree).stdout.split() == ["./empty-dir"]
    assert len(sh("find", ".", "-samefile", "f4097", cwd=tree).stdout.split()) == 2
    sh("touch", "-d", "2020-01-01", tree / "ref")
    (tree / "newer").write_text("n")
    assert sh("find", ".", "-newer", "ref", "-type", "f", cwd=tree).stdout.split() == ["./newer"]
    assert sh("find", ".", "!", "-newer", "f1", "-name", "f1", cwd=tree).stdout.split() == ["./f1"]
    assert sh("find", ".", "-inum", str(os.stat(tree / "secret").st_ino), cwd=tree).stdout.split() == ["./secret"]
    assert_healthy(fs)


def test_chmod_ln_attr_tools(fs: Envfs) -> None:
    m = fs.mnt
    tree = make_mixed_tree(m / "tree")
    sh("chmod", "-R", "go-rwx", tree)
    modes = sh("find", tree, "!", "-type", "l", "-perm", "/go=rwx").stdout.split()
    assert modes == []
    sh("chmod", "-R", "a+rX", tree)
    assert stat.S_IMODE(os.stat(tree / "sub").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tree / "f1").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tree / "sub" / "run.sh").st_mode) == 0o755
    sh("chmod", "u=rwx,g=rs,o=", tree / "f1")
    assert stat.S_IMODE(os.stat(tree / "f1").st_mode) == 0o2740
    sh("chmod", "1777", tree / "empty-dir")
    assert sh("stat", "-c", "%A", tree / "empty-dir").stdout.strip() == "drwxrwxrwt"
    sh("chown", "-R", "1000:1000", tree / "sub")
    assert (os.lstat(tree / "sub" / "dirlink").st_uid, os.stat(tree / "sub" / "text.txt").st_gid) == (1000, 1000)
    # ln, ln -s, ln -sf
    sh("ln", tree / "f4096", m / "hard")
    assert sh("stat", "-c", "%h %i", m / "hard").stdout.split() == ["2", str(os.stat(tree / "f4096").st_ino)]
    sh("ln", "-s", "tree/sub/text.txt", m / "soft")
    assert sh("readlink", m / "soft").stdout.strip() == "tree/sub/text.txt"
    assert sh("cat", m / "soft").stdout == "hello\n" * 1000
    sh("ln", "-sfn", "tree/f1", m / "soft")
    assert os.readlink(m / "soft") == "tree/f1"
    sh("ln", "-sr", tree / "sub" / "deeper", m / "relative")
    assert os.readlink(m / "relative") == "tree/sub/deeper"
    sh("mv", m / "hard", tree / "sub" / "deeper" / "moved")
    assert os.stat(tree / "sub" / "deeper" / "moved").st_ino == os.stat(tree / "f4096").st_ino
    sh("cp", "-p", "--reflink=auto", tree / "f65536", m / "copy")
    assert (m / "copy").read_bytes() == (tree / "f65536").read_bytes()
    assert os.stat(m / "copy").st_mtime_ns == os.stat(tree / "f65536").st_mtime_ns
    sh("touch", "-d", "2001-02-03 04:05:06.789", m / "copy")
    assert sh("stat", "-c", "%y", m / "copy").stdout.startswith("2001-02-03 04:05:06.789")
    # setfattr / getfattr
    f = tree / "f4097"
    sh("setfattr", "-n", "user.comment", "-v", "hello world", f)
    sh("setfattr", "-n", "user.hex", "-v", "0x00ff10", f)
    sh("setfattr", "-n", "user.empty", f)
    sh("setfattr", "-n", "trusted.admin", "-v", "t", f)
    assert sh("getfattr", "--only-values", "-n", "user.comment", f).stdout == "hello world"
    assert "user.hex=0x00ff10" in sh("getfattr", "-e", "hex", "-n", "user.hex", f).stdout
    dump = sh("getfattr", "-d", "-m", "-", "--absolute-names", f).stdout
    for name in ("user.comment", "user.hex", "user.empty", "trusted.admin"):
        assert name in dump
    # the hard link sees the same attributes
    assert "user.comment" in sh("getfattr", "-d", tree / "sub" / "hardlink-f4097").stdout
    missing = sh("getfattr", "-n", "user.nothere", f, check=False)
    assert missing.returncode != 0 and "No such attribute" in missing.stderr
    sh("setfattr", "-x", "user.comment", f)
    assert "user.comment" not in sh("getfattr", "-d", f).stdout
    sh("setfattr", "-n", "user.on-dir", "-v", "d", tree / "sub")
    restore = sh("getfattr", "-R", "-h", "-d", "-m", "-", ".", cwd=tree).stdout
    fs.remount()
    assert sh("getfattr", "-R", "-h", "-d", "-m", "-", ".", cwd=tree).stdout == restore
    sh("setfattr", "-x", "user.on-dir", tree / "sub")
    sh("setfattr", "--restore=-", cwd=tree, input=restore)
    assert sh("getfattr", "-R", "-h", "-d", "-m", "-", ".", cwd=tree).stdout == restore
    assert stat.S_IMODE(os.stat(tree / "f1").st_mode) == 0o2740
    assert os.readlink(m / "soft") == "tree/f1"
    df = sh("df", "-P", m).stdout.splitlines()[1].split()
    assert int(df[1]) > 0
    shutil.rmtree(tree)
    assert not tree.exists()
    assert_healthy(fs)
