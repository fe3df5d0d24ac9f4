"""Runs a matrix of training cases inside ONE process group and writes the results for pytest.

Usage (under torchrun, the deepspeed launcher, or plain python for the 1-process reference):
    worker.py SPEC.json OUT_DIR

SPEC: {"common": [overrides...], "cases": [{"name": str, "overrides": [...],
        "crash_after": k (optional), "count_collectives": bool (optional),
        "forbid_whole_model": bool (optional), "record_export": bool (optional)}]}
Rank 0 writes OUT_DIR/<name>.pt (the full parameters) and OUT_DIR/<name>.json (per-step metrics,
collective counts). Process start-up (and DeepSpeed's import) is the slow part, so one launch runs
many cases.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path
from unittest.mock import patch

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ngdiff.config import load_config  # noqa: E402
from ngdiff.modeling import ModelSource  # noqa: E402
from ngdiff.pipeline import run_training  # noqa: E402
from parallel.distributed import init_distributed  # noqa: E402


class Crash(Exception):
    """Simulated failure after step k: the run stops without a final checkpoint or export."""


class CollectiveCounter:
    """Wraps torch.distributed.all_reduce; a call is ours when the first non-torch frame is
    `Backend.all_reduce_sum` (what the trainer and AutoLR use), else the engine's own."""

    def __init__(self):
        self.ours: list[tuple[int, str]] = []
        self.engine = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counted(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            filename = frame.f_code.co_filename if frame is not None else ""
            if filename.endswith(os.path.join("parallel", "base.py")):  # Backend.all_reduce_sum
                self.ours.append((tensor.numel(), Path(filename).name))
            else:
                self.engine += 1
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counted
        torch.distributed.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig
        torch.distributed.all_reduce = self._orig


def first_batch_tokens(cfg, ctx) -> list[list[int]]:
    """Label tokens of each rank's share of the first global batch of every task: forget tasks, then retain."""
    from ngdiff.modeling import load_tokenizer
    from ngdiff.objectives import IGNORE, NLL
    from ngdiff.tasks import build_tasks

    tasks = build_tasks(cfg, load_tokenizer(cfg.model.path), ctx, NLL(), NLL())
    tasks = [t for t in tasks if t.role == "forget"] + [t for t in tasks if t.role == "retain"]
    mine = [sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in t.stream.next()) for t in tasks]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def run_case(case: dict, common: list[str], out: Path, rank: int, ctx) -> None:
    name = case["name"]
    overrides = [*common, *case["overrides"], f"output_dir={out / 'runs' / name}", "logging.progress=false"]
    cfg = load_config(None, overrides)
    record: dict = {"name": name, "world_size": ctx.world_size}
    crash_after = case.get("crash_after")

    def crash_hook(trainer) -> None:
        step = trainer.unlearning_step

        def maybe_crash():
            if trainer.step_index == crash_after:
                raise Crash
            return step()

        trainer.unlearning_step = maybe_crash

    if crash_after is not None:
        try:
            run_training(cfg, ctx, on_trainer=crash_hook)
            raise AssertionError("the crash hook did not fire")
        except Crash:
            record["crashed_at"] = crash_after
        gc.collect()
        cfg = load_config(None, [*overrides, "train.resume=auto"])

    with ExitStack() as stack:
        if case.get("forbid_whole_model"):  # sharded loading must never build the whole model on a rank
            stack.enter_context(patch.object(ModelSource, "__call__", forbidden_whole_load))
        run_measured_case(case, cfg, out, rank, ctx, record)


def forbidden_whole_load(source) -> None:
    raise AssertionError(f"{source.path} was loaded whole (from_pretrained) instead of shard by shard")


def record_export(record: dict):
    """An `on_trainer` hook: the names the final export asks the backend to gather (`full_tensors`) and the
    number of `torch.distributed.gather` calls (one per gathered tensor on fsdp and zero3) go to `record`."""

    def hook(trainer) -> None:
        export, full_tensors = trainer.export, trainer.backend.full_tensors
        record["export_names"], record["export_gathers"] = [], 0
        gather = dist.gather

        def counted_gather(*args, **kwargs):
            record["export_gathers"] += 1
            return gather(*args, **kwargs)

        def recorded_full_tensors(*args, **kwargs):
            for name, tensor in full_tensors(*args, **kwargs):
                record["export_names"].append(name)
                yield name, tensor

        def recorded_export(directory):
            with (
                patch.object(dist, "gather", counted_gather),
                patch.object(trainer.backend, "full_tensors", recorded_full_tensors),
            ):
                return export(directory)

        trainer.export = recorded_export

    return hook


def run_measured_case(case: dict, cfg, out: Path, rank: int, ctx, record: dict) -> None:
    name = case["name"]
    counter = CollectiveCounter()
    on_trainer = record_export(record) if case.get("record_export") else None
    if case.get("count_collectives"):
        record["rank_tokens"] = first_batch_tokens(cfg, ctx)
        with counter:
            outcome = run_training(cfg, ctx, on_trainer=on_trainer)
        record["ours_all_reduce"] = counter.ours
        record["engine_all_reduce"] = counter.engine
    else:
        outcome = run_training(cfg, ctx, on_trainer=on_trainer)
    record["steps"] = [r.metrics() for r in outcome.results]
    state = outcome.trainer.backend.full_state_dict()
    if rank == 0:
        torch.save(state, out / f"{name}.pt")
        (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    del outcome, state
    gc.collect()


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    spec = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    ctx = init_distributed(timeout_minutes=2)
    torch.set_num_threads(1)
    failures = 0
    for case in spec["cases"]:
        try:
            run_case(case, spec.get("common", []), out, ctx.rank, ctx)
        except Exception:  # report and go on: one broken case must not hide the others
            failures += 1
            if ctx.rank == 0:
                (out / f"{case['name']}.error").write_text(traceback.format_exc())
            traceback.print_exc()
            if ctx.distributed:
                raise
    if ctx.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
