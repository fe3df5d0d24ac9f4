"""The world's build lock: a lock file whose holder is gone never blocks, whatever PID it records (a
container restarted as PID 1, or this very process); a live holder is waited for and named once."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ngdiff.study.world import BUILT, build_each, try_claim

REPO = Path(__file__).resolve().parents[2]
# holds <folder>.lock as a builder does; on a line from stdin marks the folder built and lets go
BUILDER = """
import sys
from pathlib import Path
from ngdiff.locks import try_lock
folder = Path(sys.argv[1])
lock = try_lock(folder.with_name(folder.name + ".lock"))
print("held", flush=True)
sys.stdin.readline()
folder.mkdir(exist_ok=True)
(folder / ".built").write_text("")
lock.release()
"""


@pytest.mark.parametrize(
    "recorded", [str(os.getpid()), "1", json.dumps({"host": socket.gethostname(), "pid": 1, "started": "then"})]
)
def test_a_lock_file_whose_holder_is_gone_does_not_block(tmp_path, recorded):
    folder = tmp_path / "target"
    (tmp_path / "target.lock").write_text(recorded)  # left by a builder killed before it let go
    state, lock = try_claim(folder)
    assert state == "mine" and lock.holder.pid == os.getpid()
    lock.release()
    assert not (tmp_path / "target.lock").exists()


def test_a_live_builder_is_named_once_and_waited_for(tmp_path, caplog):
    folder = tmp_path / "target"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert builder.stdout.readline().strip() == "held"
        state, holder = try_claim(folder)
        assert state == "busy" and (holder.host, holder.pid) == (socket.gethostname(), builder.pid)
        threading.Timer(0.5, lambda: (builder.stdin.write("done\n"), builder.stdin.flush())).start()
        built_here = []
        with caplog.at_level(logging.WARNING, logger="ngdiff.study"):
            build_each({"target": folder}, built_here.append, poll=0.05)
        assert built_here == [] and (folder / BUILT).is_file()  # the other process built it
        assert [r.getMessage() for r in caplog.records] == [
            f"world: target is being built by another process ({holder}); waiting for it"
        ]
        assert f"pid {builder.pid}, started " in str(holder)
    finally:
        builder.kill()
        builder.wait()
