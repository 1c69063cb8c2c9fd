"""Saving a directory so that, at every instant (kill -9, Ctrl-C, power loss), it holds either
the old checkpoint or the new one, whole: the new files go to a private staging directory next to
the target, which is then swapped in with one rename.

transformers writes into the target in place; a save killed half-way leaves a 0-byte
``config.json`` or weights without a config. Here a save that does not finish leaves the target
as it was, and the next save into the same target removes what the dead one left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fnmatch
import functools
import os
import re
import secrets
import shutil
import sys
from typing import Iterable, Iterator, Optional, Sequence

from .process import deferred_interrupts, process_state

# What a model save writes: a new save drops the old one's files even where it does not
# rewrite them (stale shards of a bigger save, a .bin next to new safetensors), as transformers does.
MODEL_FILES = ("config.json", "model*.safetensors", "model.safetensors.index.json",
               "pytorch_model*.bin", "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# renameat2 answers these where it (or RENAME_EXCHANGE) is missing: old kernel or libc, a
# filesystem without exchange support, a seccomp filter that does not know the syscall.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def _leftover_pattern(base: str) -> "re.Pattern[str]":
    return re.compile(r"\." + re.escape(base) + r"\.(saving|old)-(\d+)-[0-9a-f]+\Z")


@contextlib.contextmanager
def replacing_directory(target: "str | os.PathLike[str]", replaces: Sequence[str] = ()) -> Iterator[str]:
    """Yield a fresh empty directory to write the new save into; on normal exit it becomes
    ``target`` in one atomic step. On any exception (KeyboardInterrupt included) it is removed
    and ``target`` is untouched.

    Entries ``target`` already has are kept (hard links, so no data is copied), except the
    top-level names matching the ``replaces`` glob patterns, and except names the new save wrote
    (its file wins). They are linked in *after* the writer has finished, so the writer never
    sees a file it shares with the old directory and cannot truncate one in place.

    Files another process adds to ``target`` while the save links (its last step) may be lost.
    Open file handles keep working: a kept file is the same inode in the new directory.

    A symlink ``target`` is followed: the directory it points to is replaced. A file ``target``
    raises NotADirectoryError (callers raise their own error first). On a mount point, or when
    the parent directory is not writable, the save degrades to replacing each file atomically.
    """
    target = os.path.realpath(os.fspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", target)
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    cleanup_leftovers(target)
    name = f".{base}.saving-{os.getpid()}-{secrets.token_hex(4)}"
    in_place = os.path.ismount(target)
    staging = os.path.join(target if in_place else parent, name)
    if not in_place:
        try:
            os.mkdir(staging)
        except PermissionError:  # the parent is not ours; the target may still be
            in_place = True
            staging = os.path.join(target, name)
    if in_place:
        os.makedirs(target, exist_ok=True)
        os.mkdir(staging)
    try:
        yield staging
        _fsync_tree(staging)
        if in_place:
            with deferred_interrupts():
                _replace_files(staging, target, replaces)
        else:
            if os.path.isdir(target):
                _link_tree(target, staging, replaces)
                shutil.copystat(target, staging)
                _fsync_tree(staging, files=False)
            with deferred_interrupts():
                cwd = _cwd_within(target)
                old = _swap(staging, target)
                if cwd is not None:  # else this process would sit in the deleted old directory
                    with contextlib.suppress(OSError):
                        os.chdir(cwd)
                _fsync(parent)
                shutil.rmtree(old, ignore_errors=True)
    finally:
        with deferred_interrupts():
            shutil.rmtree(staging, ignore_errors=True)  # the old directory after a swap, else the new one


def cleanup_leftovers(target: "str | os.PathLike[str]") -> None:
    """Remove the staging and old directories that dead saves into ``target`` left next to it
    (and inside it, after an in-place save). A dead save's old copy is renamed back first if
    it died between the two renames of the fallback swap. A live (or unknown) pid's are kept:
    another process is saving. Pids are read on this host: a save from another pid namespace
    sharing the filesystem is not seen as alive."""
    target = os.path.realpath(os.fspath(target))
    parent, base = os.path.split(target)
    pattern = _leftover_pattern(base)
    for folder in (parent, target):
        try:
            names = sorted(os.listdir(folder), key=lambda n: ".old-" not in n)  # restore before deleting
        except OSError:
            continue
        for name in names:
            match = pattern.match(name)
            if match is None or _pid_alive(int(match.group(2))):
                continue
            path = os.path.join(folder, name)
            if match.group(1) == "old" and folder == parent and not os.path.lexists(target):
                os.rename(path, target)
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _cwd_within(target: str) -> Optional[str]:
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    return cwd if cwd == target or cwd.startswith(target + os.sep) else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        return process_state(pid) not in (None, "Z", "X")  # a zombie is dead, only not reaped
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _link_tree(source: str, dest: str, skip: Sequence[str] = ()) -> None:
    """``cp -al source/. dest`` without overwriting what ``dest`` has; top-level names matching
    ``skip`` and save leftovers are left out. Copies where a hard link is refused (EXDEV, EPERM,
    EMLINK...)."""
    leftover = re.compile(r"\..*\.(saving|old)-\d+-[0-9a-f]+\Z")
    for entry in os.scandir(source):
        if _matches(entry.name, skip) or leftover.match(entry.name):
            continue
        dst = os.path.join(dest, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if os.path.lexists(dst) and not os.path.isdir(dst):
                continue  # the new save wrote a file of that name
            os.makedirs(dst, exist_ok=True)
            _link_tree(entry.path, dst)
            shutil.copystat(entry.path, dst, follow_symlinks=False)
        elif os.path.lexists(dst):
            continue
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        else:
            try:
                os.link(entry.path, dst, follow_symlinks=False)
            except OSError:
                if entry.is_file(follow_symlinks=False):
                    shutil.copy2(entry.path, dst, follow_symlinks=False)  # a FIFO or socket is dropped


def _swap(staging: str, target: str) -> str:
    """Put ``staging`` at ``target``; return where the old target now is, for the caller to
    remove. renameat2(RENAME_EXCHANGE) does it in one step (the old one lands at ``staging``).
    Without it: two renames, with a window of two syscalls where ``target`` does not exist; a
    kill there leaves the old copy at ``.{name}.old-{pid}-*``, which the next save
    (cleanup_leftovers) renames back."""
    if not os.path.isdir(target):
        os.rename(staging, target)
        return staging  # nothing was there
    try:
        _exchange(staging, target)
        return staging
    except OSError as e:
        if e.errno not in _NO_EXCHANGE:
            raise
    parent, base = os.path.split(target)
    old = os.path.join(parent, f".{base}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def _exchange(a: str, b: str) -> None:
    """Linux renameat2(a, b, RENAME_EXCHANGE): swap two paths atomically."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


def _replace_files(staging: str, target: str, replaces: Sequence[str]) -> None:
    """The degraded commit: each new file replaces its namesake atomically (os.replace), then
    the old save's files in ``replaces`` that this save did not write are removed. Every file
    is whole at every instant, but a kill between two replaces leaves old and new files mixed."""
    written = sorted(os.listdir(staging), key=lambda n: n in ("config.json", "adapter_config.json"))
    for name in written:
        dst = os.path.join(target, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(staging, name), dst)
    for name in os.listdir(target):
        if _matches(name, replaces) and name not in written:
            os.unlink(os.path.join(target, name))
    _fsync(target)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # not every filesystem syncs directories
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str, files: bool = True) -> None:
    """fsync the files (when ``files``) and directories under ``root``, children first."""
    for folder, _, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    _fsync(path)
        _fsync(folder)
