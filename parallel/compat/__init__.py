"""Every use of a private internal of torch, DeepSpeed, accelerate or transformers, in one version-gated layer.

A library's private names change without notice. Each use here is a registered `Patch`: the internals it
touches (`targets`), why, the versions it was verified on, and what happens without it. Its guard
(`problem`) looks the targets up on the installed versions, so a patch that cannot apply is reported
inactive (`status`, a warning at the point of use, or a clear error where the run cannot do without it)
instead of silently doing nothing. One module per library: `parallel.compat.torch`, `.deepspeed`,
`.accelerate`, `.transformers`; the rest of the project calls their functions and names no internal
itself (`tests/test_compat.py` checks both).

Importing this package is cheap: the targets are names, imported only when a guard is asked with
`load=True` or a patch is used.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
from dataclasses import dataclass
from typing import Any

COMPAT_LOGGER = "ngdiff.compat"  # DEBUG under --verbose (launcher/logs.py)
log = logging.getLogger(COMPAT_LOGGER)


class CompatError(RuntimeError):
    """An internal the run cannot do without is missing from the installed library version."""


@dataclass(frozen=True)
class Patch:
    name: str  # "<library>.<what>", e.g. "deepspeed.fp32_master_is_the_partition"
    targets: tuple[str, ...]  # "package.module:Attr.attr": the internals touched, looked up by the guard
    why: str
    verified: dict[str, str]  # distribution -> the version it was verified on
    without: str  # what happens where it is inactive ("" : required, the run stops with a CompatError)

    @property
    def required(self) -> bool:
        return not self.without


REGISTRY: dict[str, Patch] = {}


def register(name: str, *, targets: tuple[str, ...], why: str, verified: dict[str, str], without: str = "") -> Patch:
    patch = Patch(name, targets, why, verified, without)
    REGISTRY[name] = patch
    return patch


def resolve(target: str) -> Any:
    """The object a target names ("module:Attr.attr", or "module" alone)."""
    module_name, _, attrs = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in filter(None, attrs.split(".")):
        obj = getattr(obj, attr)
    return obj


def problem(name: str, *, load: bool = True) -> str:
    """'' where every target of patch `name` exists on the installed versions; else why not. With
    `load=False`, a target whose module is not imported yet is not imported for this: 'not loaded'."""
    patch = REGISTRY[name]
    for target in patch.targets:
        module_name = target.partition(":")[0]
        if not load and module_name.split(".")[0] not in sys.modules:
            return f"not loaded ({module_name.split('.')[0]} not imported in this process)"
        try:
            resolve(target)
        except (ImportError, AttributeError) as err:
            return f"{target} not found ({type(err).__name__}: {err})"
    return ""


def versions(patch: Patch) -> str:
    """Installed against verified, e.g. 'deepspeed 0.19.8 (verified 0.19.8)'."""
    parts = []
    for dist, verified in patch.verified.items():
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        parts.append(f"{dist} {installed} (verified {verified})")
    return ", ".join(parts)


_warned: set[str] = set()


def available(name: str) -> bool:
    """Whether patch `name` can apply here. Where it cannot: a required patch raises a `CompatError`; an
    optional one logs, once a process, a warning saying what is lost, and the caller takes its fallback."""
    reason = problem(name)
    if not reason:
        return True
    patch = REGISTRY[name]
    message = f"compat patch {name} is inactive: {reason}; installed {versions(patch)}"
    if patch.required:
        raise CompatError(f"{message}. ngdiff cannot run without it ({patch.why}); install the verified version")
    if name not in _warned:
        _warned.add(name)
        log.warning("%s. Without it: %s", message, patch.without)
    return False


def status(load: bool = True) -> list[dict[str, Any]]:
    """One row per registered patch: name, active, reason (why not), versions, required."""
    rows = []
    for patch in REGISTRY.values():
        reason = problem(patch.name, load=load)
        rows.append(
            {
                "name": patch.name,
                "active": not reason,
                "reason": reason,
                "versions": versions(patch),
                "required": patch.required,
            }
        )
    return rows


_logged = False


def log_patches(level: int = logging.DEBUG) -> None:
    """Once a process (a run's start-up): which patches are active, at `level` (DEBUG: shown with `--verbose`
    or `logging.verbose=true`). Libraries the run has not imported are not imported for it."""
    global _logged
    if _logged or not log.isEnabledFor(level):
        return
    _logged = True
    for row in status(load=False):
        state = "active" if row["active"] else f"inactive: {row['reason']}"
        log.log(level, "compat patch %s: %s; %s", row["name"], state, row["versions"])


# every library module registers its patches on import (they import nothing heavy at module level)
from parallel.compat import accelerate, deepspeed, torch, transformers  # noqa: E402

__all__ = [
    "COMPAT_LOGGER",
    "REGISTRY",
    "CompatError",
    "Patch",
    "accelerate",
    "available",
    "deepspeed",
    "log_patches",
    "problem",
    "register",
    "status",
    "torch",
    "transformers",
]
