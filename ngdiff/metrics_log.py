"""Where step metrics go: a JSONL file always (rank 0), W&B and others through the same tiny protocol."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

from ngdiff.errors import UserError
from ngdiff.run_folder import PathGuard, write_atomically

# what `StepResult.metrics` (ngdiff/trainer.py) emits each step: per-task keys loss_<task>, grad_norm_<task>,
# w_<task>, cos_<task i>_<task j> (plus loss_forget / loss_retain), the step's lr, time and memory
STEP_METRICS = ("lr", "step_seconds", "tokens_per_second", "peak_memory_mb")
TASK_METRIC_PREFIXES = ("loss_", "grad_norm_", "w_", "cos_")


def is_step_metric(key: str) -> bool:
    """Whether the trainer emits `key` each step (W&B files it under train/, the rest under eval/)."""
    return key in STEP_METRICS or key.startswith(TASK_METRIC_PREFIXES)


class MetricsSink(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def finish(self) -> None: ...


def jsonable(value: Any) -> Any:
    """`value` as strict JSON allows it: a non-finite float becomes its string ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlSink:
    """One JSON object a line; appends on resume so a run's history stays in one file.

    Each write first checks the file is still the one it opened (`PathGuard`): a deleted run folder
    stops the run instead of writing into an unlinked file."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w")
        self._guard = PathGuard(self.path, self.path.parent)

    def resumed_at(self, step: int) -> None:
        """Drop the rows a resumed run is about to write again: those of steps after its checkpoint's
        `step` (written before the crash that lost them), keeping every row up to it (evaluations too)."""
        self._guard.check()
        self._file.close()
        lines = self.path.read_text().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # a row cut short by the crash
        kept = [line for line in lines if (row_step := _step_of(line)) is None or row_step <= step]
        write_atomically(self.path, "".join(kept))
        self._file = self.path.open("a")
        self._guard = PathGuard(self.path, self.path.parent)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard.check()
        record = {"step": step, **{k: jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def finish(self) -> None:
        self._file.close()


def _step_of(line: str) -> float | None:
    """A row's step; None for a line that is no record (kept as it is: not ours to judge)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a line that is not a JSON object is a `UserError` naming the file
    and its 1-based line number."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {number}: not a JSON record ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {number}: not a JSON object but {type(record).__name__}")
        records.append(record)
    return records


def peak_memory_mb(device: torch.device | str) -> float:
    """This process's peak memory so far, in MiB: CUDA's max allocated on a GPU (the allocator's own
    counter: no device sync), else the process's peak resident set size (`ru_maxrss`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
