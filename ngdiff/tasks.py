"""The tasks of an unlearning run: one per forget file and one per retain file.

A task is a data stream, the objective its role uses, and a role that decides the sign of its
gradient in the combination (retain: descend, forget: ascend). The trainer loops over the tasks in
this order: retain tasks first, forget tasks last, so the last task's live gradient receives the
combination in place and the k - 1 others are stashed.

Names: a role with one file is called by the role ("forget", "retain"), so a run with one file each
keeps the two-task metric keys (`loss_forget`, `cos_retain_forget`, ...); a role with several files
names each task `<role>_<file stem>` (`<role><i>` where stems repeat).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ngdiff.combiners import FORGET, RETAIN
from ngdiff.data import TaskStream, encode_task
from ngdiff.objectives import Objective

if TYPE_CHECKING:
    from ngdiff.config import ExperimentConfig
    from parallel.base import DistContext


@dataclass
class Task:
    name: str
    role: str  # "retain" | "forget"
    stream: TaskStream
    objective: Objective | None  # None: the task contributes no gradient (retain_objective=none)
    source: str = ""  # the data file or hub name it reads


def steps_per_epoch(tasks: Sequence[Task]) -> int:
    """Steps in one epoch, the unit of `train.epochs` and `optim.warmup_epochs`: of the first forget file."""
    return next(task for task in tasks if task.role == FORGET).stream.batches_per_epoch


def task_names(role: str, sources: Sequence[str]) -> list[str]:
    """`role` alone for one source, else `<role>_<stem>` per source (`<role><i>` if stems repeat)."""
    if len(sources) == 1:
        return [role]
    stems = [Path(source.split(":")[0]).stem.replace(".", "_") or str(i) for i, source in enumerate(sources)]
    if len(set(stems)) < len(stems):
        return [f"{role}{i + 1}" for i in range(len(sources))]
    return [f"{role}_{stem}" for stem in stems]


def stream_seed(seed: int, role: str, index: int) -> int:
    """Forget task i draws with seed + 2i, retain task i with seed + 2i + 1 (one task each: seed, seed + 1)."""
    return seed + 2 * index + (1 if role == RETAIN else 0)


def build_tasks(
    cfg: ExperimentConfig,
    tokenizer: Any,
    ctx: DistContext,
    forget_objective: Objective,
    retain_objective: Objective | None,
) -> list[Task]:
    """Tokenize every file and wrap it in its stream; retain tasks first. Fails on the first bad file."""
    alternates = forget_objective.alternates
    refusals = alternates in ("refusals", "refusal_pairs")
    common = dict(
        rank=ctx.rank, world_size=ctx.world_size, micro_batch=cfg.train.micro_batch_size, pad_id=tokenizer.pad_token_id
    )
    tasks = []
    for role, sources, objective, batch in (
        (RETAIN, cfg.data.retain, retain_objective, cfg.train.retain_batch_size),
        (FORGET, cfg.data.forget, forget_objective, cfg.train.forget_batch_size),
    ):
        for index, (name, source) in enumerate(zip(task_names(role, sources), sources, strict=True)):
            seed = stream_seed(cfg.train.seed, role, index)
            key = f"data.{role}" if len(sources) == 1 else f"data.{role}[{index}]"
            refusals_from = cfg.data.idk if role == FORGET and refusals else None
            pairs = alternates if role == FORGET else ""
            examples = encode_task(cfg.data, tokenizer, source, key, refusals_from, seed=seed, alternates=pairs)
            stream = TaskStream(examples, batch, seed=seed, name=role, label=name, **common)
            tasks.append(Task(name, role, stream, objective, source))
    return tasks
