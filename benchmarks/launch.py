"""Launch a benchmark's worker the way a user launches a run: `single` as one process, `zero3` under the
deepspeed launcher, any other backend under torchrun; gloo on loopback, one torch thread per rank (the
benchmarks compare engines, not thread pools); the worker writes its results as JSON."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_prefix(backend: str, ranks: int) -> list[str]:
    """What goes before the worker script: the interpreter, torchrun or the deepspeed launcher."""
    if backend == "single":
        return [sys.executable]
    if backend == "zero3":
        return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]  # fmt: skip
    return [shutil.which("torchrun") or "torchrun", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]  # fmt: skip


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark's ranks: one torch thread, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), **extra}


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden flags a benchmark script is re-run with as its own worker (`run_worker`): `--worker`,
    `--result FILE` for its JSON, and the `--local_rank` the deepspeed launcher appends."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)


def run_worker(backend: str, ranks: int, worker: list[str], result: Path, name: str, **env: str) -> Any:
    """Run `worker` (script and arguments) on `ranks` ranks of `backend` and return the JSON it wrote to
    `result`; a failed launch ends the benchmark with the tails of its output."""
    cmd = [*launcher_prefix(backend, ranks), *worker]
    proc = subprocess.run(cmd, env=worker_env(**env), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())
