"""Output paths: checked before any work starts, and locked against a second writer.

A command that will write a file finds out *first* (before minutes of model loading)
whether it can: `check_writable` for a file, `check_directory` for an output directory.
`lock` takes an advisory `fcntl.flock` on an open file so that two processes appending to
the same JSONL, or training into the same output directory, cannot interleave their
writes: the second is refused with a message instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
import warnings


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def _check_parent(path: str, what: str) -> None:
    """The nearest existing ancestor of `path` is a directory we may create entries in."""
    parent = _parent(path)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{what} {path}: {probe} is a file, not a directory; choose a path in a directory.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: no permission to write in {probe}; choose a writable location.")


def check_writable(path: str, what: str = "--out") -> None:
    """Refuses (ValueError naming `what` and the path) an output file that could not be
    written: a directory, a read-only file, a path under a file or an unwritable directory.
    Creates nothing."""
    if not path:
        raise ValueError(f"{what} is empty; give a file path.")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory; give the path of a file (in it, or elsewhere).")
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise ValueError(f"{what} {path} is not a regular file; give a file path.")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{what} {path} is not writable; fix its permissions or choose another path.")
        return
    _check_parent(path, what)


def check_directory(path: str, what: str = "--out") -> None:
    """Refuses an output directory that could not be used: an existing file, a read-only
    directory, a path under a file. Creates nothing."""
    if not path:
        raise ValueError(f"{what} is empty; give a directory.")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{what} {path} is a file, not a directory; choose a directory.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path} is not writable; fix its permissions or choose another directory.")
        return
    _check_parent(path, what)


def make_parent(path: str, what: str = "--out") -> None:
    """Creates the directories above `path`, with a ValueError naming `what` on failure."""
    try:
        os.makedirs(_parent(path), exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot create {_parent(path)} ({err.strerror}).") from None


class AlreadyLocked(ValueError):
    """Another process holds the lock: it is writing the same output."""


def lock(fd: int, path: str, what: str = "--out") -> bool:
    """An exclusive, non-blocking advisory lock on the open file `fd` (released when it is
    closed, or when the process dies). Returns whether the lock is held: False (with a
    warning) on a file system without locks. Raises AlreadyLocked if another process has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        raise AlreadyLocked(f"{what} {path} is being written by another running jaxrast process (it holds the "
                            "file's lock); wait for it to finish, or choose another path.") from None
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            warnings.warn(f"{path}: the file system does not support locks; a second process writing {what} "
                          "at the same time would not be noticed.", stacklevel=2)
            return False
        raise


_HELD: dict[str, int] = {}  # directory (resolved) -> how many nested DirectoryLocks hold it here


class DirectoryLock:
    """`with DirectoryLock(output_dir, what):` holds `<output_dir>/.lock` for the block,
    refusing a second process that trains into the same directory. Nested blocks on the
    same directory in one process share the lock (a command and the library it calls)."""

    def __init__(self, directory: str, what: str = "output_dir"):
        self.directory, self.what, self._fd = directory, what, None
        self._key = ""

    def __enter__(self) -> "DirectoryLock":
        check_directory(self.directory, self.what)
        os.makedirs(self.directory, exist_ok=True)
        self._key = os.path.realpath(self.directory)
        if _HELD.get(self._key):
            _HELD[self._key] += 1
            return self
        self._fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            lock(self._fd, self.directory, self.what)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        _HELD[self._key] = 1
        return self

    def __exit__(self, *exc) -> None:
        _HELD[self._key] -= 1
        if not _HELD[self._key]:
            del _HELD[self._key]
            if self._fd is not None:
                os.close(self._fd)
        self._fd = None
