"""The local study's worker pool (ngdiff.study.workers): dispatch, a run's output in its log, a dying worker."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from ngdiff.study import workers

SERVE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from ngdiff.study.workers import serve
    logs = Path(sys.argv[1])

    def run(index):
        print("python line of run", index)
        os.write(1, b"C-level line\\n")  # what a library writes under Python's feet
        if index == 1:
            raise ValueError("boom")

    replies = os.fdopen(os.dup(1), "w")
    serve(sys.stdin, replies, run, lambda index: logs / f"{index}.log")
    print("after the runs")
    """
)


def test_a_worker_replies_per_run_and_sends_each_runs_output_to_its_log(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, str(tmp_path)], input="0\n1\n2\n", capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "0 0\n1 1\n2 0\nafter the runs\n"  # a failed run does not end the worker
    assert (tmp_path / "0.log").read_text() == "python line of run 0\nC-level line\n"
    failed = (tmp_path / "1.log").read_text()
    assert "C-level line" in failed and "ValueError: boom" in failed
    assert (tmp_path / "2.log").read_text() == "python line of run 2\nC-level line\n"


FAKE_WORKER = textwrap.dedent(
    """
    import os, sys
    marker = sys.argv[1]
    for line in sys.stdin:
        index = int(line)
        if index == 2 and not os.path.exists(marker):  # the first worker to get run 2 dies with it
            open(marker, "w").close()
            sys.exit(3)
        print(index, 1 if index == 4 else 0, flush=True)
    """
)


def test_the_pool_runs_every_index_once_and_replaces_a_worker_that_dies(tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setattr(workers, "worker_command", lambda _: [sys.executable, "-c", FAKE_WORKER, str(marker)])
    seen: list[tuple[int, bool]] = []
    workers.run_pool(tmp_path, [0, 1, 2, 3, 4, 5, 6], 2, lambda index, ok: seen.append((index, ok)))
    assert sorted(seen) == [(0, True), (1, True), (2, False), (3, True), (4, False), (5, True), (6, True)]
    assert marker.is_file()
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["worker-0.log", "worker-1.log"]


def test_an_empty_queue_starts_no_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "worker_command", lambda _: ["false"])
    seen: list = []
    workers.run_pool(tmp_path, [], 2, lambda index, ok: seen.append(index))
    assert seen == [] and not (tmp_path / "logs").exists()
