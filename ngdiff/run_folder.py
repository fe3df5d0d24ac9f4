"""The run folder on disk: can it be written (`check_writable`), and is it still the one the run began in
(`PathGuard`).

An open file survives its deletion: writes keep landing in the unlinked inode and the run ends with
rc 0 and nothing on disk. One `os.stat` per write, compared with the (device, inode) seen at the start,
turns that into a clear error at the next write.
"""

from __future__ import annotations

import os
from pathlib import Path

from ngdiff.config import ConfigError
from ngdiff.errors import UserError


def write_atomically(path: Path, text: str) -> None:
    """Whole or not at all: a crash mid-write leaves the earlier file, never half of a new one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


class PathGuard:
    """Remembers what `path` (the run folder itself, or a file in it) is now; `check` raises, naming the run
    folder, once it is gone or another file took its place."""

    def __init__(self, path: str | Path, folder: str | Path | None = None):
        self.path = Path(path)
        self.folder = Path(folder) if folder is not None else self.path
        self.expected = identity(self.path)

    def check(self) -> None:
        if self.expected is None or identity(self.path) == self.expected:
            return
        what = "" if self.path == self.folder else f": {self.path.name}"
        raise UserError(f"run folder {self.folder}{what} was deleted or replaced while the run wrote into it; stopping")


def check_writable(out: Path) -> None:
    """One line naming the folder when it cannot be made or written (under a file, read-only)."""
    probe = Path(os.path.abspath(out))
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        if probe == Path(os.path.abspath(out)):
            raise ConfigError(f"output_dir {out} exists and is not a folder; choose another output_dir")
        raise ConfigError(
            f"output_dir {out} lies under {probe}, which is a file, not a folder; choose another output_dir"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: cannot write in {probe} (permission denied); choose another output_dir")
