"""One ngdiff run per output folder: a second run into a folder another process holds is refused with one
line naming the holder; the kernel frees the lock when its holder dies; a filesystem without locks is
named, never run unlocked."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ngdiff.config import load_config
from ngdiff.errors import UserError
from ngdiff.locks import LOCK_NAME, Holder, LocksUnsupported, lock_output_dir, try_lock
from ngdiff.outputs import write_output_dir

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys; from ngdiff.locks import lock_output_dir; lock = lock_output_dir(sys.argv[1]); print('held', flush=True); sys.stdin.read()"  # noqa: E501


def hold_in_child(folder: Path) -> subprocess.Popen:
    """A child process that holds `folder`'s run lock until its stdin closes (or it is killed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout.readline().strip() == "held"
    return child


def train_command(tiny_model_dir, tofu_split, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launcher",
        "train",
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']}",
        f"data.retain={tofu_split['retain']}",
        f"output_dir={out}",
        "train.max_steps=2",
        "logging.progress=false",
        *extra,
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_held_folder_is_refused_until_the_holder_dies(tiny_model_dir, tofu_split, tmp_path):
    out = tmp_path / "run"
    command = train_command(tiny_model_dir, tofu_split, out)
    # the folder of a run still training: its config (the one a resumption compares with), its metrics
    write_output_dir(load_config(None, command[4:]), overwrite=False)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss_forget": 1.0}\n')
    holder = hold_in_child(out)
    try:
        before = snapshot(out)
        second = subprocess.run([*command, "train.resume=auto"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("ngdiff")]
        assert errors == [
            f"ngdiff: error: output_dir {out} is in use by another ngdiff run (host {socket.gethostname()}, "
            f"pid {holder.pid}, started {Holder.read(out / LOCK_NAME).started}); wait for it to end or stop it "
            "(a stopped run resumes with train.resume=auto), or choose another output_dir"
        ], second.stderr
        assert "Traceback" not in second.stderr
        assert snapshot(out) == before  # the holder's files are untouched
        holder.send_signal(signal.SIGKILL)  # the kernel frees the lock of a dead holder
        holder.wait(timeout=30)
        third = subprocess.run([*command, "train.resume=auto"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert third.returncode == 0, third.stderr
        # no checkpoint: the run starts over, and the dead holder's row of step 1 gives way to the new one
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert not (out / LOCK_NAME).exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_claim_of_a_folder_this_process_holds_is_refused_and_a_release_frees_it(tmp_path):
    out = tmp_path / "run"
    with lock_output_dir(out) as lock:
        assert Holder.read(out / LOCK_NAME) == lock.holder and lock.holder.pid == os.getpid()
        with pytest.raises(UserError, match=f"output_dir {out} is in use by another ngdiff run .*pid {os.getpid()},"):
            lock_output_dir(out)
        assert lock.held  # the refused claim did not drop the lock (a second handle's close would)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        child = subprocess.run([sys.executable, "-c", HOLD, out], input="", capture_output=True, text=True, env=env)
        assert child.returncode == 1 and f"is in use by another ngdiff run (host {socket.gethostname()}" in child.stderr
    assert not (out / LOCK_NAME).exists()
    lock_output_dir(out).release()


def test_a_lock_file_left_by_a_killed_holder_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": "h", "pid": os.getpid(), "started": "then"}))
    with lock_output_dir(out) as lock:
        assert lock.holder.pid == os.getpid() and Holder.read(out / LOCK_NAME).started != "then"


def test_a_filesystem_without_locks_is_named_and_nothing_is_left(tmp_path, monkeypatch):
    import fcntl

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", refuse)
    out = tmp_path / "new" / "run"
    with pytest.raises(LocksUnsupported) as caught:
        lock_output_dir(out)
    message = str(caught.value)
    assert message.startswith(f"output_dir {out}: the filesystem of {out} refuses file locks (No locks available)")
    assert not out.exists()
    with pytest.raises(LocksUnsupported):
        try_lock(tmp_path / "x.lock")
