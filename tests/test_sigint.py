"""Ctrl-C stops a run as a preemption does: the first one checkpoints after the current step, exits 0 and
prints the command that resumes; a second one aborts at once, as Python does."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher.signals import install_stop_handlers, restore_interrupt, resume_hint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 6  # the signal comes within ~0.02 s of step 1's line; a step of the tiny model takes longer


def test_ctrl_c_checkpoints_exits_cleanly_and_the_printed_command_resumes(tiny_model_dir, tofu_split, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    overrides = [
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']}",
        f"data.retain={tofu_split['retain']}",
        f"output_dir={out}",
        f"train.max_steps={MAX_STEPS}",
        "train.save_every=0",  # the stop's checkpoint is written all the same
        "logging.progress=false",
    ]
    cmd = [sys.executable, "-m", "launcher", "train", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate() if proc.poll() else ""
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "received SIGINT: checkpointing after the current step (Ctrl-C again aborts at once)" in stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    assert (checkpoint / "COMPLETE").is_file() and int(checkpoint.name.split("_")[1]) == steps[-1] < MAX_STEPS
    assert not (out / "final").exists()
    (hint,) = [line for line in stderr.splitlines() if "stopped after a checkpoint; resume with" in line]
    printed = hint.split("resume with train.resume=auto: ", 1)[1]
    assert printed == "ngdiff " + shlex.join(["train", *overrides, "train.resume=auto"])
    resumed = subprocess.run(
        [sys.executable, "-m", "launcher", *shlex.split(printed)[1:]], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint} (step {steps[-1]})" in resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == MAX_STEPS
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, MAX_STEPS + 1))


def test_the_first_ctrl_c_asks_to_stop_the_second_aborts():
    trainer = SimpleNamespace(stop_requested=False)
    before = signal.getsignal(signal.SIGINT)
    install_stop_handlers(trainer)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs in this thread at the next bytecode
        assert trainer.stop_requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        restore_interrupt()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
    assert signal.getsignal(signal.SIGINT) is before


def test_the_resume_command_drops_overwrite_and_an_earlier_resume(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["train", "cfg.yaml", "--overwrite", "train.resume=none", "output_dir=a b"]
    assert (
        resume_hint(argv) == "resume with train.resume=auto: ngdiff train cfg.yaml 'output_dir=a b' train.resume=auto"
    )
    monkeypatch.setenv("LOCAL_RANK", "0")  # under a launcher the command is the launcher's
    assert resume_hint(argv) == "resume with train.resume=auto added to the same command"
