"""What a process inside a Slurm job knows about the job: id, name, nodes, its place, restarts.

Read from the environment Slurm gives every task (`SLURM_*`), so it works the same under `srun`,
`torchrun` started by `srun`, or the batch shell. Runs are named after the job so that the W&B run,
the log lines and the job in `squeue` can be matched by eye.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


def expand_nodelist(nodelist: str) -> list[str]:
    """`gpu[01-03,07],login1` -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (Slurm's hostlist syntax).

    The same expansion as `scontrol show hostnames`, without a subprocess, for code that only
    needs names (zero padding kept, several bracket groups per name allowed).
    """
    names: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            names.extend(_expand_one(item))
    return names


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    out = []
    for piece in match.group(1).split(","):
        if "-" in piece:
            lo, hi = piece.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise ValueError(f"bad range {piece!r} in node list {item!r}")
            values = [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]
        elif piece.isdigit():
            values = [piece]
        else:
            raise ValueError(f"bad entry {piece!r} in node list {item!r}")
        for value in values:
            out.extend(_expand_one(head + value + tail))
    return out


@dataclass(frozen=True)
class SlurmJob:
    """The job this process belongs to, or None from `from_env` outside Slurm."""

    job_id: str
    job_name: str = ""
    array_job_id: str = ""
    array_task_id: str = ""
    nodes: tuple[str, ...] = ()
    node_id: int = 0
    procid: int = 0
    ntasks: int = 1
    localid: int = 0
    restart_count: int = 0
    partition: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmJob | None:
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            return None
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        try:
            nodes = tuple(expand_nodelist(nodelist))
        except ValueError:
            nodes = (nodelist,)

        def number(key: str, default: int) -> int:
            try:
                return int(env.get(key, default))
            except ValueError:
                return default

        return cls(
            job_id=job_id,
            job_name=env.get("SLURM_JOB_NAME", ""),
            array_job_id=env.get("SLURM_ARRAY_JOB_ID", ""),
            array_task_id=env.get("SLURM_ARRAY_TASK_ID", ""),
            nodes=nodes,
            node_id=number("SLURM_NODEID", 0),
            procid=number("SLURM_PROCID", 0),
            ntasks=number("SLURM_NTASKS", 1),
            localid=number("SLURM_LOCALID", 0),
            restart_count=number("SLURM_RESTART_COUNT", 0),
            partition=env.get("SLURM_JOB_PARTITION", ""),
        )

    @property
    def display_id(self) -> str:
        """`1234` or, for an array task, `1200_34` (what `squeue` shows)."""
        if self.array_job_id and self.array_task_id:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id

    @property
    def run_name(self) -> str:
        """`<job name>-<job id>`, the name W&B and the logs use for this run."""
        return f"{self.job_name}-{self.display_id}" if self.job_name else f"slurm-{self.display_id}"

    @property
    def group(self) -> str:
        """Runs of one array (a sweep) share a group; a plain job is its own group."""
        return f"slurm-{self.array_job_id or self.job_id}"

    def describe(self) -> str:
        restart = f", restart {self.restart_count}" if self.restart_count else ""
        where = self.nodes[self.node_id] if 0 <= self.node_id < len(self.nodes) else "?"
        return (
            f"slurm job {self.display_id} ({self.job_name or 'unnamed'}{restart}) on {len(self.nodes)} node(s) "
            f"{','.join(self.nodes)}; this is task {self.procid}/{self.ntasks} on node {self.node_id} ({where})"
        )

    def as_config(self) -> dict[str, object]:
        """What W&B records about the job (no environment dump: it may hold credentials)."""
        return {
            "job_id": self.display_id,
            "job_name": self.job_name,
            "nodes": list(self.nodes),
            "num_nodes": len(self.nodes),
            "restart_count": self.restart_count,
            "partition": self.partition,
        }


def current_job() -> SlurmJob | None:
    return SlurmJob.from_env()
