"""Exclusive locks on folders: one ngdiff process writes a run folder (or builds a world model) at a time.

A lock is a POSIX record lock (`fcntl.lockf`) on a small file, because it is the one lock NFS carries
across machines (through its lock manager), that GPFS and Lustre (mounted with `flock`) honour too,
and the kernel drops it when its holder dies (also by `kill -9`; on NFS a crashed node's locks go
when its lease ends, NFSv4, or when it reboots, NFSv3), so a lock is never stale and no PID, which a
restarted container may reuse, is trusted. The file records its holder (host, pid, start time) for
the message a refused process prints. A filesystem that refuses locks is reported, never silently run without one.

POSIX locks belong to a process, not to a file handle: closing any handle of the file drops them. So
this module never opens a file it already holds; a second claim from the same process is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ngdiff.errors import UserError
from ngdiff.run_folder import check_writable, identity

LOCK_NAME = ".ngdiff.lock"  # inside a run's output_dir: not part of the run, the output-folder guard skips it
_BUSY = (errno.EACCES, errno.EAGAIN)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD: dict[tuple[int, int], FolderLock] = {}  # (st_dev, st_ino) -> this process's lock on that file


class LocksUnsupported(UserError):
    """The filesystem refuses file locks, so exclusive use of a folder cannot be guaranteed."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file records it."""

    host: str = "unknown host"
    pid: int = 0
    started: str = "unknown time"

    def __str__(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    @classmethod
    def read(cls, path: Path) -> Holder:
        """The holder its file names (this process, if it holds it: reading would drop its lock)."""
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in _HELD:
                return _HELD[(st.st_dev, st.st_ino)].holder
            record = json.loads(path.read_text())
            return cls(str(record["host"]), int(record["pid"]), str(record["started"]))
        except (OSError, ValueError, KeyError, TypeError):  # gone, not written yet, or by an older ngdiff
            return cls()


class FolderLock:
    """A held lock; `release()` (or leaving the `with` block, or the process's death) frees it."""

    def __init__(self, path: Path, fd: int, key: tuple[int, int], remove: bool):
        self.path, self._fd, self._key, self.remove = path, fd, key, remove
        self.holder = Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        record = json.dumps({"host": self.holder.host, "pid": self.holder.pid, "started": self.holder.started})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
        os.fsync(fd)  # readers on other machines see the holder
        _HELD[key] = self

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Free the lock and, if `remove`, delete its file (a claimer that opened it before sees it gone)."""
        if self._fd < 0:
            return
        if self.remove and identity(self.path) == self._key:
            self.path.unlink(missing_ok=True)
        _HELD.pop(self._key, None)
        fd, self._fd = self._fd, -1
        os.close(fd)  # drops the lock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a lock dropped unreleased (e.g. by an exception)
        with contextlib.suppress(Exception):  # at interpreter shutdown; the process's exit frees it anyway
            self.release()


def try_lock(path: Path, remove: bool = True) -> FolderLock | Holder:
    """Lock `path` (created if needed) without waiting: the lock, or who holds it now. `remove`: its
    release deletes the file (a holder killed leaves it behind, unlocked). Raises LocksUnsupported
    when the filesystem refuses locks."""
    path = Path(path)
    while True:
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in _HELD:  # opening it again would drop the lock when closed (POSIX)
                return Holder.read(path)
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in _BUSY:
                return Holder.read(path)
            if err.errno in _UNSUPPORTED:
                raise LocksUnsupported(
                    f"the filesystem of {path.parent} refuses file locks ({os.strerror(err.errno)}), so ngdiff cannot "
                    "keep a second process out of it; use a folder on a filesystem with locking (a local disk, "
                    "NFS with its lock manager, Lustre mounted with -o flock)"
                ) from err
            raise
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if identity(path) == key:
            return FolderLock(path, fd, key, remove)
        os.close(fd)  # its holder removed the file between our open and lock: claim the new one


def lock_output_dir(output_dir: str | Path) -> FolderLock:
    """The run lock of `output_dir` (created if missing), held by the one process that writes the run;
    one error line when another ngdiff run holds it or the filesystem cannot lock. Its release removes
    the lock file, so a finished run leaves none."""
    folder = Path(output_dir)
    check_writable(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    had_file = path.exists()
    try:
        claim = try_lock(path)
    except LocksUnsupported as err:  # leave nothing behind
        if not had_file:
            path.unlink(missing_ok=True)
        if created:
            folder.rmdir()
        raise LocksUnsupported(f"output_dir {folder}: {err}") from None
    if isinstance(claim, Holder):
        raise UserError(
            f"output_dir {folder} is in use by another ngdiff run ({claim}); wait for it to end or stop it "
            "(a stopped run resumes with train.resume=auto), or choose another output_dir"
        )
    return claim


def clear_locked_folder(folder: str | Path) -> None:
    """Delete everything in `folder` but its lock file, which its holder keeps holding."""
    import shutil

    for entry in Path(folder).iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
