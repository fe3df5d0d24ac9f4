"""Checkpoint files are read as tensors and plain data only, never as arbitrary pickles.

A `.pt` file is a pickle: loaded with `weights_only=False`, a planted one runs any code it names (a
`__reduce__` calling `os.system`) the moment a run resumes. Every checkpoint read goes through here:
`load_weights_only` for our own files, `weights_only_loads` around an engine's loader (DeepSpeed, torch's
distributed checkpoint) that calls `torch.load(..., weights_only=False)` itself. A file that needs anything
beyond tensors, containers and the allow-listed classes is refused with the file's name.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from ngdiff.errors import UserError
from parallel.compat.torch import torch_load_weights_only


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds more than tensors and plain data: someone else wrote or replaced it."""


def unsafe_file(path: Any, err: BaseException) -> UnsafeCheckpointError:
    lines = [line.strip() for line in str(err).splitlines()]
    reason = next((line for line in lines if line.startswith(("Trying to load", "Unsupported"))), type(err).__name__)
    return UnsafeCheckpointError(
        f"{path}: refused to load: the file holds Python objects beyond tensors and plain data ({reason}); "
        "ngdiff never writes such a checkpoint: was it replaced? Move it out of the run folder"
    )


def load_weights_only(path: str | Path, *, map_location: Any = None, allowed: Sequence[Any] = ()) -> Any:
    """`torch.load` restricted to tensors, containers and the `allowed` classes."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise unsafe_file(path, err) from None


def weights_only_loads(allowed: Sequence[Any] = (), where: str | Path = "checkpoint") -> AbstractContextManager[None]:
    """Every `torch.load` inside the block is weights-only, whatever its caller asks for: engines read
    their own files with `weights_only=False` and offer no switch (the patch of `torch.load` lives in
    `parallel.compat.torch`). `where` names the folder when the file is not a path (an in-memory value of
    a distributed checkpoint)."""
    return torch_load_weights_only(allowed, lambda f, err: unsafe_file(f if isinstance(f, str | Path) else where, err))
