"""Crash-safe checkpoints: written under a temporary name, marked complete, then renamed.

The newest *complete* checkpoint is what `train.resume=auto` loads; a half-written one (a crash
mid-save) has no marker and is ignored. The previous checkpoint is removed only after the new one
is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
KEEP = 2


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_complete(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
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


def save_checkpoint(backend, root: Path, step: int, trainer_state: dict[str, Any]) -> Path:
    """Every rank calls this; returns the final directory."""
    final = root / f"step_{step:08d}"
    partial = root / f".step_{step:08d}.partial"
    rank = backend.ctx.rank
    if backend.ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "engine").mkdir(parents=True)
    backend.barrier()
    backend.save_checkpoint(partial / "engine")
    torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
    backend.barrier()
    if backend.ctx.is_main:
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (partial / COMPLETE).write_text(str(step))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
        for old in complete[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


def load_checkpoint(backend, directory: Path) -> dict[str, Any]:
    backend.load_checkpoint(directory / "engine")
    rng_file = directory / f"rng_rank{backend.ctx.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((directory / "trainer_state.json").read_text())
