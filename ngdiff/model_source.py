"""Where a model comes from: a local Hugging Face folder or a hub repo id, checked before any loading.

`check_model_source` runs in config validation (no network, no torch work): a path-like value must be
an existing model folder, anything else must have the *form* of a hub repo id (the hub itself may be
unreachable, so only the form is checked). `loading_from` turns the traceback transformers raises
when a hub name cannot be resolved into one line that names the config key and what was tried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from ngdiff.errors import UserError

T = TypeVar("T")


class ModelSourceError(UserError):
    """A model path that is neither a model folder nor a loadable hub name; names the config key."""


def looks_like_model_folder(value: str) -> bool:
    """A filesystem path rather than a hub repo id (`name` or `namespace/name`, at most one slash)."""
    return (
        value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1 or Path(value).expanduser().exists()
    )


def check_model_source(key: str, value: str) -> None:
    """One clear error for a `value` of `key` that cannot name a model; silent for a plausible one."""
    if looks_like_model_folder(value):
        path = Path(value).expanduser()
        if not path.exists():
            raise ModelSourceError(f"{key}: no such model directory: {value}")
        if not path.is_dir():
            raise ModelSourceError(f"{key}: {value} is a file; give the model folder (the one holding config.json)")
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{key}: {value} is not a Hugging Face model folder (no config.json in it)")
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise ModelSourceError(
            f"{key}: {value!r} is neither an existing directory nor a valid hub repo id "
            f"(namespace/name of letters, digits, '-', '_', '.'): {err}"
        ) from None


@contextmanager
def loading_from(key: str, value: str) -> Iterator[None]:
    """Re-raise a failed `from_pretrained` of `value` as one line naming `key` and what was tried."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if Path(value).expanduser().is_dir():
            tried = f"read the local folder {value}"
        else:
            tried = f"{value!r} is not a local directory, so it was tried as a Hugging Face hub repo id"
        raise ModelSourceError(f"{key}: cannot load a model from {value!r}: {tried}, which failed: {cause}") from err


class Guarded:
    """`build` with its loading errors reported as `loading_from(key, value)` does. Other attributes are
    `build`'s own, so a backend still sees a `ModelSource`'s `path` and `build_empty` (FSDP's shard-by-shard
    loading, ZeRO-3's bucket sizes) through it."""

    def __init__(self, build: Callable[[], T], key: str, value: str):
        self.build, self.key, self.value = build, key, value

    def __call__(self) -> T:
        with loading_from(self.key, self.value):
            return self.build()

    def __getattr__(self, name: str):
        if name == "build":  # not yet set (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.build, name)


def guarded(build: Callable[[], T], key: str, value: str) -> Callable[[], T]:
    """`build` with its loading errors reported as `loading_from(key, value)` does (see `Guarded`)."""
    return Guarded(build, key, value)
