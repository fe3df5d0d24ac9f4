"""Crash-safe checkpoints: written under a temporary name, marked complete, then renamed.

The newest *complete* and *intact* checkpoint is what `train.resume=auto` loads: a half-written one
(a crash mid-save) has no marker and is ignored; one whose files changed size since they were written
(`FILES`, a truncated shard) or whose trainer state does not parse is skipped with a warning, and the
previous one is loaded. The previous checkpoint is removed only after the new one is complete; a save
that fails (a full disk) removes its partial folder and stops the run with one line.

Every file is read weights-only (`parallel.safe_load`): a planted pickle is refused, never run.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ngdiff.errors import UserError
from ngdiff.run_folder import PathGuard
from parallel.safe_load import UnsafeCheckpointError, load_weights_only

log = logging.getLogger("ngdiff.checkpoint")

COMPLETE = "COMPLETE"
FILES = "files.json"  # every file's size as written: a truncated or missing file is seen before loading
TRAINER_STATE = "trainer_state.json"
KEEP = 2


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def latest_complete(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` cannot be resumed from (one phrase), or None. Only stats and two small JSON files:
    cheap, and the same answer on every rank of a shared file system."""
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{TRAINER_STATE} is unreadable ({type(err).__name__}: {err})"
    if not (directory / FILES).is_file():
        return None  # written before sizes were recorded: nothing more to check
    try:
        expected = json.loads((directory / FILES).read_text())
    except (OSError, ValueError) as err:
        return f"{FILES} is unreadable ({err})"
    for name, size in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size} bytes, {size} were written (truncated?)"
    return None


def resumable_checkpoint(backend, root: Path) -> Path | None:
    """The newest complete checkpoint whose files are intact, the same on every rank; None if there is
    no complete checkpoint. Newer damaged ones are skipped with a warning; if every one is damaged the run
    stops with one line naming the newest."""
    candidates = complete_checkpoints(root)
    chosen, skipped = None, []
    for directory in reversed(candidates):
        problem = checkpoint_problem(directory)
        if problem is None:
            chosen = directory
            break
        skipped.append((directory, problem))
    agree(backend, chosen)
    if backend.ctx.is_main:
        for directory, problem in skipped:
            log.warning("%s: %s; resuming from the previous checkpoint", directory, problem)
    if chosen is None and skipped:
        newest, problem = skipped[0]
        raise UserError(f"{newest}: {problem}; no intact checkpoint is left under {root} to resume from")
    return chosen


def agree(backend, chosen: Path | None) -> None:
    """Every rank must load the same step: compare the choices with one all-reduce (sum and sum of squares
    of the steps are equal to world * step and world * step^2 only when all are equal)."""
    if not backend.ctx.distributed:
        return
    step = float(chosen.name.removeprefix("step_")) if chosen is not None else -1.0
    sums = backend.all_reduce_sum(torch.tensor([step, step * step], dtype=torch.float64, device=backend.ctx.device))
    world = backend.ctx.world_size
    if sums[0].item() != world * step or sums[1].item() != world * step * step:
        raise UserError(
            f"rank {backend.ctx.rank} would resume from {chosen}, another rank from another checkpoint: do all "
            "ranks see the same checkpoints folder (a shared file system)?"
        )


def cause(err: BaseException) -> BaseException:
    """The error itself, or for torch's distributed checkpoint (which wraps every rank's error, traceback
    and all, in one CheckpointException) the first rank's."""
    if isinstance(err, CheckpointException) and err.failures:
        return next(iter(err.failures.values()))[0]
    return err


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def disk_error(err: BaseException) -> bool:
    """An OSError, or the RuntimeError torch's writers make of one ("basic_ios::clear: iostream error")."""
    if isinstance(err, OSError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("iostream error", "no space left", "failed writing", "file write failed")
    )


def write_failure(directory: Path, err: BaseException) -> UserError:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif "iostream error" in str(err):
        reason = f"no space left on device? ({first_line(err)})"
    else:
        reason = first_line(err)
    return UserError(f"{directory}: could not write the checkpoint: {reason}; the previous checkpoints are kept")


def save_checkpoint(
    backend, root: Path, step: int, trainer_state: dict[str, Any], run_folder: PathGuard | None = None
) -> Path:
    """Every rank calls this; returns the final directory. `run_folder` guards the folder the run writes
    into: deleted or replaced since the run started, the save stops the run instead of recreating it."""
    if run_folder is not None:
        run_folder.check()
    final = root / f"step_{step:08d}"
    partial = root / f".step_{step:08d}.partial"
    rank = backend.ctx.rank
    try:
        if backend.ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            (partial / "engine").mkdir(parents=True)
        backend.barrier()
        backend.save_checkpoint(partial / "engine")
        torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
        backend.barrier()
        if backend.ctx.is_main:
            (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
            (partial / FILES).write_text(json.dumps(file_sizes(partial), indent=1))
            (partial / COMPLETE).write_text(str(step))
    except (OSError, RuntimeError, CheckpointException) as err:
        if not disk_error(cause(err)):
            raise
        if backend.ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise write_failure(root, cause(err)) from None
    if backend.ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in complete_checkpoints(root)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


def load_checkpoint(backend, directory: Path) -> dict[str, Any]:
    """Model, optimizer, RNG and trainer state from `directory`. A file that fails to load (damaged in a
    way its size does not show, or refused as unsafe) stops the run with one line naming it, on every
    rank: the ranks compare notes with one all-reduce, so none trains on while another stopped."""
    rng_file = directory / f"rng_rank{backend.ctx.rank}.pt"
    failure: BaseException | None = None
    try:
        backend.load_checkpoint(directory / "engine")
        if rng_file.is_file():
            set_rng_state(load_weights_only(rng_file))
    except torch.distributed.DistError:
        raise  # a peer died: the launcher reports that
    except (Exception, CheckpointException) as err:  # any engine's read error: one line, not its traceback
        failure = err
    failed_ranks = 0.0
    if backend.ctx.distributed:
        flag = torch.tensor([float(failure is not None)], dtype=torch.float64, device=backend.ctx.device)
        failed_ranks = backend.all_reduce_sum(flag).item()
    if isinstance(failure, UnsafeCheckpointError):
        raise failure
    if failure is not None:
        raise UserError(
            f"{directory}: the checkpoint could not be loaded ({first_line(cause(failure))}); move it out of "
            f"{directory.parent} to resume from the previous one"
        ) from failure
    if failed_ranks:
        raise UserError(f"{directory}: another rank could not load its part of the checkpoint (its log says why)")
    return json.loads((directory / TRAINER_STATE).read_text())
