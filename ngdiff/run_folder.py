"""Notice when a run's folder (or a file in it) is deleted or replaced while the run writes into it.

An open file survives its deletion: writes keep landing in the unlinked inode and the run ends with
rc 0 and nothing on disk. One `os.stat` per write, compared with the (device, inode) seen at the start,
turns that into a clear error at the next write.
"""

from __future__ import annotations

import os
from pathlib import Path

from ngdiff.errors import UserError


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
