"""Local parallel runs: a pool of long-lived one-thread worker processes, each running runs one after another.

On a few cores, two one-thread runs of a tiny model get more done than one two-thread run; a fresh
process per run would pay the imports (torch, transformers: about 4 s of CPU) every time, a tenth of a
default-study run. So `--workers N` starts N `ngdiff study worker DIR` processes once; the parent sends
each idle worker a run index on its stdin and reads `<index> <exit code>` back on its stdout. A worker
writes each run's output (Python's and the libraries' C-level output alike) to `DIR/logs/<run>.log`. A
worker that dies fails the run it held and is replaced; the run is retried by the next `ngdiff study`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("ngdiff.study")

LOGS = "logs"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Worker:
    process: subprocess.Popen
    holding: int | None = None  # the run index it was sent
    buffer: bytes = field(default=b"")


def worker_command(study_dir: Path) -> list[str]:
    return [sys.executable, "-m", "launcher", "study", "worker", str(study_dir)]


def start_worker(study_dir: Path, slot: int) -> Worker:
    env = {**os.environ, **ONE_THREAD}
    repo = str(Path(__file__).resolve().parents[2])  # this checkout's code, whatever the cwd
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    logs = study_dir / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"worker-{slot}.log").open("ab") as errors:  # what a worker says outside any run
        process = subprocess.Popen(
            worker_command(study_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, env=env
        )
    return Worker(process)


def run_pool(study_dir: Path, indices: list[int], workers: int, finished: Callable[[int, bool], None]) -> None:
    """Run `indices` on `workers` worker processes; `finished(index, ok)` after each (ok: exit code 0)."""
    queue = list(indices)
    pool: dict[int, Worker] = {}
    selector = selectors.DefaultSelector()

    def spawn(slot: int) -> None:
        worker = start_worker(study_dir, slot)
        pool[slot] = worker
        selector.register(worker.process.stdout, selectors.EVENT_READ, slot)

    def send(worker: Worker) -> None:
        worker.holding = queue.pop(0)
        worker.process.stdin.write(f"{worker.holding}\n".encode())
        worker.process.stdin.flush()

    try:
        for slot in range(min(workers, len(queue))):
            spawn(slot)
            send(pool[slot])
        while any(w.holding is not None for w in pool.values()):
            for key, _ in selector.select():
                slot = key.data
                worker = pool[slot]
                chunk = os.read(key.fd, 4096)
                if not chunk:  # the worker died: its run failed; a fresh worker takes the queue
                    selector.unregister(key.fileobj)
                    worker.process.wait()
                    log.error("study worker %d died (exit %s)", slot, worker.process.returncode)
                    if worker.holding is not None:
                        finished(worker.holding, False)
                    del pool[slot]
                    if queue:
                        spawn(slot)
                        send(pool[slot])
                    continue
                worker.buffer += chunk
                while b"\n" in worker.buffer:
                    line, worker.buffer = worker.buffer.split(b"\n", 1)
                    index, code = (int(x) for x in line.split())
                    worker.holding = None
                    finished(index, code == 0)
                    if queue:
                        send(worker)
    finally:
        for worker in pool.values():  # done (stdin closed: the worker exits) or interrupted (stop it)
            with contextlib.suppress(OSError):
                worker.process.stdin.close()
            if worker.holding is not None:
                worker.process.terminate()
            worker.process.wait()
        selector.close()


def serve(requests: IO[str], replies: IO[str], run: Callable[[int], Any], log_path: Callable[[int], Path]) -> None:
    """The worker's loop: for each index read, `run(index)` with its output in `log_path(index)`; reply
    `<index> <exit code>` (0: it finished; 1: it raised, the traceback is in its log)."""
    for line in requests:
        if not line.strip():
            continue
        index = int(line)
        code = 0
        with output_to(log_path(index)):
            try:
                run(index)
            except Exception:  # one failed run must not end the worker: the others still run
                traceback.print_exc()
                code = 1
        replies.write(f"{index} {code}\n")
        replies.flush()


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """File descriptors 1 and 2 (so C-level output too) go to `path` for the block."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (target, *saved):
            os.close(fd)
