"""Where step metrics go: a JSONL file always (rank 0), W&B and others through the same tiny protocol."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

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
    """One JSON object a line; appends on resume so a run's history stays in one file."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def finish(self) -> None:
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def peak_memory_mb(device: torch.device | str) -> float:
    """This process's peak memory so far, in MiB: CUDA's max allocated on a GPU (the allocator's own
    counter: no device sync), else the process's peak resident set size (`ru_maxrss`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
