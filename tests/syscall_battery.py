"""A battery of system calls run in a directory, for test_against_ext4.py: names,
links, renames, special files, attributes, xattrs, holes, fallocate modes, copies,
locks, mmap, what root may do where modes deny, and what an unprivileged user may and may
not do. Prints a JSON object: each call's name and its result (a value, or the errno's name).

    python tests/syscall_battery.py DIRECTORY [--root-only]     (as root; DIRECTORY empty)

--root-only leaves out the unprivileged user's calls (for a mount only root may enter).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import stat
import subprocess
import sys
from collections.abc import Callable

NOBODY = 65534
ROOT_ONLY = "--root-only" in sys.argv[2:]
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE, _FALLOC_FL_COLLAPSE_RANGE = 0x01, 0x02, 0x08
_FALLOC_FL_ZERO_RANGE, _FALLOC_FL_INSERT_RANGE = 0x10, 0x20
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
results: dict[str, object] = {}


def _checked(rc: int) -> None:
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _checked(_libc.fallocate(fd, mode, offset, length))


def renameat2(old: str, new: str, flags: int) -> None:
    _checked(_libc.renameat2(-100, old.encode(), -100, new.encode(), flags))


def call(name: str, fn: Callable[[], object]) -> None:
    try:
        value = fn()
        results[name] = repr(value)
    except OSError as e:
        results[name] = errno.errorcode.get(e.errno or 0, str(e.errno))


def as_nobody(name: str, fn: Callable[[], object]) -> None:
    """`call` in a child process that runs as nobody:nogroup without supplementary groups."""
    if ROOT_ONLY:
        return
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            call(name, fn)
            os.write(writer, json.dumps(results[name]).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader, "rb") as answer:
        results[name] = json.loads(answer.read() or b'"no answer"')


def mode(path: str, follow: bool = True) -> str:
    return oct(os.stat(path, follow_symlinks=follow).st_mode)


_STATX_MODE = 0x2
_CAP_NET_RAW = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]


def kernel_mode(path: str) -> str:
    """The mode as an exec or a permission check finds it: statx for the mode
    alone, which the kernel answers from its cache unless it was told that the
    mode changed (a stat for all attributes refreshes more after a write)."""
    buf = ctypes.create_string_buffer(256)
    _checked(_libc.statx(-100, path.encode(), 0, _STATX_MODE, buf))
    return oct(int.from_bytes(buf.raw[28:30], "little"))  # struct statx's stx_mode


def names_and_links() -> None:
    call("mkdir a", lambda: os.mkdir("a", 0o755))
    call("mkdir a again", lambda: os.mkdir("a"))
    call("mkdir a/b", lambda: os.mkdir("a/b"))
    call("nlink of a", lambda: os.stat("a").st_nlink)
    call("rename a into a/b", lambda: os.rename("a", "a/b/c"))
    call("rmdir a, not empty", lambda: os.rmdir("a"))
    call("create f", lambda: os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644)))
    call("create f, O_EXCL", lambda: os.open("f", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    call("link f g", lambda: os.link("f", "g"))
    call("nlink of f", lambda: os.stat("f").st_nlink)
    call("link a directory", lambda: os.link("a", "a2"))
    call("unlink a directory", lambda: os.unlink("a"))
    call("rmdir a file", lambda: os.rmdir("f"))
    call("rename a file over a directory", lambda: os.rename("f", "a"))
    call("rename a directory over a file", lambda: os.rename("a", "f"))
    call("mkdir e", lambda: os.mkdir("e"))
    call("rename a directory over an empty one", lambda: os.rename("a", "e"))
    call("nlink and mode of e", lambda: (os.stat("e").st_nlink, mode("e")))
    call("rmdir e/b/.", lambda: os.rmdir("e/b/."))
    call("rmdir a missing name", lambda: os.rmdir("missing"))
    call("mkdir a 255-byte name", lambda: os.mkdir("n" * 255))
    call("mkdir a 256-byte name", lambda: os.mkdir("n" * 256))
    call("mkdir d1, d1/d2, d1/d3: nlink", directory_links)
    call("move d1/d2 to d4: nlinks", moved_directory_links)
    call("rename over another link of the same file", renamed_onto_itself)
    call("rename back", lambda: os.rename("f2", "f"))
    call("RENAME_NOREPLACE over a name", lambda: renameat2("f", "g", _RENAME_NOREPLACE))
    call("RENAME_EXCHANGE with a missing name", lambda: renameat2("f", "missing", _RENAME_EXCHANGE))
    call("RENAME_EXCHANGE of a file and a directory", lambda: renameat2("f", "d4", _RENAME_EXCHANGE))
    call("after the exchange", lambda: (mode("f"), mode("d4"), os.stat("d4").st_nlink))
    call("exchange back", lambda: renameat2("f", "d4", _RENAME_EXCHANGE))
    call("many names, a third unlinked", many_names)
    call("rmdir of an open directory", removed_open_directory)
    call("listing", lambda: sorted(os.listdir(".")))


def directory_links() -> object:
    for path in ("d1", "d1/d2", "d1/d3"):
        os.mkdir(path)
    return os.stat("d1").st_nlink


def moved_directory_links() -> object:
    os.mkdir("d4")
    os.rename("d1/d2", "d4/d2")
    return os.stat("d1").st_nlink, os.stat("d4").st_nlink


def renamed_onto_itself() -> object:
    os.link("f", "f2")
    os.rename("f", "f2")  # the same inode: nothing happens
    return os.path.exists("f"), os.stat("f2").st_nlink


def many_names() -> object:
    os.mkdir("many")
    for i in range(300):
        os.close(os.open(f"many/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    before = os.listdir("many")
    for i in range(0, 300, 3):
        os.unlink(f"many/f{i}")
    after = os.listdir("many")
    return len(before), len(after), len(set(after))


def removed_open_directory() -> object:
    os.mkdir("x")
    fd = os.open("x", os.O_RDONLY)
    try:
        os.rmdir("x")
        return os.fstat(fd).st_nlink, os.listdir(fd)
    finally:
        os.close(fd)


def special_files_and_attributes() -> None:
    call("symlink s -> f", lambda: os.symlink("f", "s"))
    call("readlink s", lambda: os.readlink("s"))
    call("lstat s", lambda: (mode("s", follow=False), os.lstat("s").st_size))
    call("utimes of s itself", lambda: os.utime("s", ns=(5, 6), follow_symlinks=False))
    call("times of s", lambda: (os.lstat("s").st_atime_ns, os.lstat("s").st_mtime_ns))
    call("symlink of 4095 bytes", lambda: os.symlink("x" * 4095, "long"))
    call("symlink of 4096 bytes", lambda: os.symlink("x" * 4096, "longer"))
    call("mkfifo", lambda: os.mkfifo("p", 0o644))
    call("mode of the fifo", lambda: mode("p"))
    call("mknod a socket", lambda: os.mknod("sock", stat.S_IFSOCK | 0o644))
    call("mknod a character device", lambda: os.mknod("chr", stat.S_IFCHR | 0o600, os.makedev(1, 3)))
    call("mode and rdev of the device", lambda: (mode("chr"), os.stat("chr").st_rdev))
    call("truncate f to 100", lambda: os.truncate("f", 100))
    call("size of f", lambda: os.stat("f").st_size)
    call("truncate to -1", lambda: os.truncate("f", -1))
    call("open a directory for writing", lambda: os.open("e", os.O_WRONLY))
    call("open a file with O_DIRECTORY", lambda: os.open("f", os.O_RDONLY | os.O_DIRECTORY))
    call("ftruncate through O_RDONLY", lambda: os.ftruncate(os.open("f", os.O_RDONLY), 5))
    call("write through O_RDONLY", lambda: os.write(os.open("f", os.O_RDONLY), b"x"))
    call("read through O_WRONLY", lambda: os.read(os.open("f", os.O_WRONLY), 1))
    call("utimes explicit", lambda: os.utime("f", ns=(1, 2)))
    call("times of f", lambda: (os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns))
    call("an unlinked open file", unlinked_open_file)
    call("O_APPEND", appended)
    call("mmap, shared, written", mapped)
    call("lockf and flock", locked)
    call("O_DIRECT", lambda: os.close(os.open("ap", os.O_RDONLY | os.O_DIRECT)))
    call("O_TRUNC", lambda: os.close(os.open("ap", os.O_WRONLY | os.O_TRUNC)) or os.stat("ap").st_size)
    call("statvfs f_namemax", lambda: os.statvfs(".").f_namemax)
    call("O_TMPFILE", lambda: os.close(os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600)))


def unlinked_open_file() -> object:
    os.link("f", "f3")
    fd = os.open("f", os.O_RDWR)
    try:
        os.unlink("f3")
        os.unlink("f")
        os.pwrite(fd, b"abc", 0)
        return os.fstat(fd).st_nlink, os.pread(fd, 5, 0)
    finally:
        os.close(fd)


def appended() -> object:
    fd = os.open("ap", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    os.write(fd, b"12345")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"67")
    os.close(fd)
    with open("ap", "rb") as f:
        return f.read()


def mapped() -> object:
    fd = os.open("mm", os.O_CREAT | os.O_RDWR, 0o644)
    os.ftruncate(fd, 8192)
    with mmap.mmap(fd, 8192) as m:
        m[100:105] = b"hello"
        m.flush()
    os.close(fd)
    with open("mm", "rb") as f:
        return f.read()[95:110]


def locked() -> object:
    fd = os.open("mm", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return True


def xattrs() -> None:
    call("setxattr user.x", lambda: os.setxattr("mm", "user.x", b"v"))
    call("XATTR_CREATE of an existing one", lambda: os.setxattr("mm", "user.x", b"v", os.XATTR_CREATE))
    call("XATTR_REPLACE of a missing one", lambda: os.setxattr("mm", "user.y", b"v", os.XATTR_REPLACE))
    call("getxattr of a missing one", lambda: os.getxattr("mm", "user.missing"))
    call("removexattr of a missing one", lambda: os.removexattr("mm", "user.missing"))
    call("user. xattr on a symlink", lambda: os.setxattr("s", "user.x", b"v", follow_symlinks=False))
    call("setxattr trusted.x", lambda: os.setxattr("mm", "trusted.x", b"v"))
    call("setxattr in an unknown namespace", lambda: os.setxattr("mm", "other.x", b"v"))
    call("a 70,000-byte value", lambda: os.setxattr("mm", "user.big", b"v" * 70_000))
    call("listxattr", lambda: sorted(os.listxattr("mm")))


def data() -> None:
    block = bytes(range(256)) * 64
    fd = os.open("d", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, block * 4)
    call("punch a hole, keep size", lambda: fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 4096, 8192))
    call("after the hole", lambda: (os.fstat(fd).st_size, os.pread(fd, 16, 4096), os.pread(fd, 4, 12288)))
    call("punch a hole without keep size", lambda: fallocate(fd, _FALLOC_FL_PUNCH_HOLE, 0, 4096))
    call("zero a range", lambda: fallocate(fd, _FALLOC_FL_ZERO_RANGE, 100, 50))
    call("after the zeroed range", lambda: os.pread(fd, 200, 0) == block[:100] + bytes(50) + block[150:200])
    call("zero a range past the end, keep size", lambda: fallocate(fd, _FALLOC_FL_ZERO_RANGE | 1, 65536, 4096))
    call("zero a range past the end", lambda: fallocate(fd, _FALLOC_FL_ZERO_RANGE, 65536, 100))
    call("size after zeroing", lambda: os.fstat(fd).st_size)
    call("fallocate past the end", lambda: fallocate(fd, 0, 70_000, 1000))
    call("size after fallocate", lambda: os.fstat(fd).st_size)
    call("fallocate at a negative offset", lambda: fallocate(fd, 0, -1, 10))
    call("fallocate of nothing", lambda: fallocate(fd, 0, 0, 0))
    call("pwrite at 2^62", lambda: os.pwrite(fd, b"x", 1 << 62))
    call("pwrite at 2^40", lambda: os.pwrite(fd, b"x", 1 << 40))
    call("size after it", lambda: os.fstat(fd).st_size)
    call("ftruncate back", lambda: os.ftruncate(fd, 70_000))
    call("read past the end", lambda: os.pread(fd, 10, 80_000))
    call("SEEK_DATA past the end", lambda: os.lseek(fd, 80_000, os.SEEK_DATA))
    call("SEEK_DATA and SEEK_HOLE from 0", lambda: (os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE)))
    call("SEEK_HOLE in the last block, a hole on ext4", lambda: os.lseek(fd, 69_999, os.SEEK_HOLE))
    copy = os.open("c", os.O_CREAT | os.O_RDWR, 0o644)
    call("copy_file_range", lambda: os.copy_file_range(fd, copy, 10_000, 0, 0))
    call("copied bytes", lambda: os.pread(copy, 10_000, 0) == os.pread(fd, 10_000, 0))
    call("copy_file_range past the end", lambda: os.copy_file_range(fd, copy, 100, 100_000, 0))
    call("copy_file_range onto itself, overlapping", lambda: os.copy_file_range(fd, fd, 100, 0, 50))
    call("sendfile", lambda: os.sendfile(copy, fd, 0, 100))
    os.close(copy)
    os.close(fd)
    # On a file of their own: where they work (ext4), they move the bytes after them.
    shifted = os.open("shifted", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(shifted, block)
    call("collapse a range", lambda: fallocate(shifted, _FALLOC_FL_COLLAPSE_RANGE, 0, 4096))
    call("insert a range", lambda: fallocate(shifted, _FALLOC_FL_INSERT_RANGE, 0, 4096))
    os.close(shifted)
    sparse = os.open("sparse", os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(sparse, b"x", 1 << 20)
    call(
        "a sparse file's data and hole", lambda: (os.lseek(sparse, 0, os.SEEK_DATA), os.lseek(sparse, 0, os.SEEK_HOLE))
    )
    os.close(sparse)


def roots_permissions() -> None:
    """What root may do where the modes say no: everything but executing a file without an
    execute bit (a mount without the kernel's `default_permissions` must answer the same)."""
    os.mkdir("locked")
    os.close(os.open("locked/inner", os.O_CREAT | os.O_WRONLY, 0o644))
    os.chmod("locked", 0o000)
    os.close(os.open("blank", os.O_CREAT | os.O_WRONLY, 0o000))
    for name, bits in (("script-0644", 0o644), ("script-0744", 0o744), ("script-0001", 0o001)):
        with open(name, "w") as script:
            script.write("#!/bin/sh\nexit 3\n")
        os.chmod(name, bits)
    os.chown("blank", NOBODY, NOBODY)
    call("root opens a 0000 file of another user for writing", lambda: os.close(os.open("blank", os.O_RDWR)))
    call("root truncates a 0000 file", lambda: os.truncate("blank", 5) or os.stat("blank").st_size)
    call("root sets a user. xattr on a 0000 file", lambda: os.setxattr("blank", "user.root", b"1"))
    call("root changes another user's times", lambda: os.utime("blank", ns=(7, 7)) or os.stat("blank").st_mtime_ns)
    call("root chmods another user's file", lambda: os.chmod("blank", 0o6000) or mode("blank"))
    for what, bits in (("read and write", os.R_OK | os.W_OK), ("execute", os.X_OK)):
        call(f"access {what} of a 0000 file as root", lambda bits=bits: os.access("blank", bits))
    for name in ("script-0644", "script-0744", "script-0001", "locked"):
        call(f"access X_OK of {name} as root", lambda name=name: os.access(name, os.X_OK))
        call(f"execute {name} as root", lambda name=name: subprocess.run([f"./{name}"]).returncode)
    call("root lists a 0000 directory", lambda: os.listdir("locked"))
    call("root enters a 0000 directory", lambda: os.chdir("locked") or os.chdir(".."))
    call("root creates in a 0000 directory", lambda: os.close(os.open("locked/new", os.O_CREAT | os.O_WRONLY)))
    call("root renames in a 0000 directory", lambda: os.rename("locked/new", "locked/newer"))
    call("root unlinks in a 0000 directory", lambda: os.unlink("locked/inner"))
    call("root stats through a 0000 directory", lambda: mode("locked/newer"))
    os.chmod("locked", 0o755)


def ownership_and_permissions() -> None:
    # `change() or mode(path)`: the change returns None, then the mode is the result.
    os.chmod(".", 0o777)
    os.mkdir("sticky")
    os.chmod("sticky", 0o1777)
    os.close(os.open("sticky/roots", os.O_CREAT | os.O_WRONLY, 0o644))
    os.close(os.open("secret", os.O_CREAT | os.O_WRONLY, 0o600))
    os.close(os.open("shared", os.O_CREAT | os.O_WRONLY, 0o644))
    os.chmod("shared", 0o666)
    os.mkdir("sgid")
    os.chown("sgid", 0, 100)
    os.chmod("sgid", 0o2777)
    as_nobody("read a 0600 file", lambda: os.open("secret", os.O_RDONLY))
    as_nobody("access R_OK of a 0600 file", lambda: os.access("secret", os.R_OK))
    as_nobody("truncate a 0600 file", lambda: os.truncate("secret", 0))
    as_nobody("write a 0666 file", lambda: os.write(os.open("shared", os.O_WRONLY), b"x"))
    as_nobody("chmod another's file", lambda: os.chmod("shared", 0o777))
    as_nobody("chown another's file", lambda: os.chown("shared", NOBODY, -1))
    as_nobody("utimes now, another's writable file", lambda: os.utime("shared"))
    as_nobody("utimes explicit, another's writable file", lambda: os.utime("shared", ns=(1, 1)))
    as_nobody("unlink another's file in a sticky directory", lambda: os.unlink("sticky/roots"))
    as_nobody("create in a sticky directory", lambda: os.close(os.open("sticky/mine", os.O_CREAT | os.O_WRONLY, 0o644)))
    as_nobody("rename one's own in a sticky directory", lambda: os.rename("sticky/mine", "sticky/mine2"))
    as_nobody("rename over another's in a sticky directory", lambda: os.rename("sticky/mine2", "sticky/roots"))
    as_nobody(
        "create in a set-group-ID directory",
        lambda: os.close(os.open("sgid/n", os.O_CREAT | os.O_WRONLY, 0o644)) or os.stat("sgid/n").st_gid,
    )
    as_nobody(
        "mkdir in a set-group-ID directory", lambda: os.mkdir("sgid/d") or (mode("sgid/d"), os.stat("sgid/d").st_gid)
    )
    as_nobody("chmod g+s of one's own file, not in its group", lambda: os.chmod("sgid/n", 0o2755) or mode("sgid/n"))
    as_nobody("user. xattr on a writable file", lambda: os.setxattr("shared", "user.a", b"b"))
    as_nobody("trusted. xattr", lambda: os.setxattr("shared", "trusted.a", b"b"))
    as_nobody("listxattr", lambda: sorted(os.listxattr("shared")))
    for bits, what in ((0o4777, "set-user-ID"), (0o2777, "set-group-ID, group-executable")):
        os.chmod("shared", bits)
        as_nobody(
            f"write a {what} file", lambda: os.write(os.open("shared", os.O_WRONLY), b"y") and kernel_mode("shared")
        )
    os.chmod("shared", 0o6777)
    as_nobody("truncate a set-user-ID file", lambda: os.truncate("shared", 1) or kernel_mode("shared"))
    os.chmod("shared", 0o6777)
    as_nobody("open a set-user-ID file with O_TRUNC", lambda: os.close(os.open("shared", os.O_WRONLY | os.O_TRUNC)))
    call("its mode after the O_TRUNC", lambda: kernel_mode("shared"))
    os.chmod("shared", 0o2767)
    as_nobody(
        "fallocate a set-group-ID file, not in its group",
        lambda: os.posix_fallocate(os.open("shared", os.O_WRONLY), 0, 8192),
    )
    call("its mode after the fallocate", lambda: kernel_mode("shared"))
    os.chmod("shared", 0o4777)
    call("root writes a set-user-ID file", lambda: os.write(os.open("shared", os.O_WRONLY), b"z") and mode("shared"))
    call("root chowns a set-user-ID file", lambda: os.chown("shared", 0, 0) or mode("shared"))
    os.chmod("shared", 0o2777)
    call("root chowns a set-group-ID, group-executable file", lambda: os.chown("shared", 0, 0) or mode("shared"))
    os.chmod("shared", 0o2767)
    call("root chowns a set-group-ID file", lambda: os.chown("shared", 0, 0) or mode("shared"))
    os.chmod("shared", 0o4755)
    call("chown -1 -1 of a set-user-ID file", lambda: os.chown("shared", -1, -1) or mode("shared"))
    os.chmod("shared", 0o6777)
    call("chown of a set-user-ID file, the kernel's mode", lambda: os.chown("shared", 0, 0) or kernel_mode("shared"))
    os.chmod("shared", 0o4777)
    call("root truncates a set-user-ID file", lambda: os.truncate("shared", 0) or kernel_mode("shared"))
    call(
        "root opens a set-user-ID file with O_TRUNC",
        lambda: os.close(os.open("shared", os.O_WRONLY | os.O_TRUNC)) or kernel_mode("shared"),
    )
    # A file capability (VFS_CAP_REVISION_2: CAP_NET_RAW, effective) goes with any write.
    call("set security.capability", lambda: os.setxattr("shared", "security.capability", _CAP_NET_RAW))
    call("root writes a file with a capability", lambda: os.write(os.open("shared", os.O_WRONLY), b"c"))
    call("its capability after the write", lambda: os.getxattr("shared", "security.capability").hex())


if __name__ == "__main__":
    os.chdir(sys.argv[1])
    names_and_links()
    special_files_and_attributes()
    xattrs()
    data()
    roots_permissions()
    ownership_and_permissions()
    print(json.dumps(results, indent=1))
