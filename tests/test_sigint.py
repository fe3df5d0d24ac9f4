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
import yaml

from launcher.signals import install_stop_handlers, restore_interrupt, resume_hint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 6  # the signal comes within ~0.02 s of step 1's line; a step of the tiny model takes longer


def train_then_ctrl_c(overrides: list[str], out: Path, env: dict[str, str]) -> tuple[Path, str]:
    """`ngdiff train` in a child process, Ctrl-C once its first step is logged; its metrics file and stderr.
    The run must end by itself (exit 0), without a traceback."""
    cmd = [sys.executable, "-m", "launcher", "train", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    try:
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
    return metrics, stderr


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
    metrics, stderr = train_then_ctrl_c(overrides, out, env)
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


def test_ctrl_c_with_the_default_config_checkpoints_and_prints_the_resume_command(tiny_model_dir, tofu_split, tmp_path):
    """No train.save_every, no train.max_steps: the defaults (NGDiff, SGD + AutoLR, 5 epochs) stop as above."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    overrides = [f"model.path={tiny_model_dir}", f"data.forget={tofu_split['forget']}",
                 f"data.retain={tofu_split['retain']}", f"output_dir={out}", "logging.progress=false"]  # fmt: skip
    metrics, stderr = train_then_ctrl_c(overrides, out, env)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["optim"]["name"], config["autolr"]["enabled"], config["train"]["save_every"]) == ("sgd", True, 50)
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert (checkpoint / "COMPLETE").is_file() and int(checkpoint.name.split("_")[1]) == steps[-1] < 10
    (hint,) = [line for line in stderr.splitlines() if "stopped after a checkpoint; resume with" in line]
    assert hint.split("resume with train.resume=auto: ", 1)[1] == "ngdiff " + shlex.join(
        ["train", *overrides, "train.resume=auto"]
    )
    # 16 forget records, batch 8, 5 epochs: 10 steps, named as few
    assert "only 10 unlearning steps: train.epochs=5 over 16 forget records" in stderr
    assert " WARNING ngdiff.start:" not in stderr and " INFO ngdiff.start: rank 0/1 on cpu" in stderr


def test_ctrl_c_before_the_training_loop_is_one_line_with_the_resume_command(monkeypatch, capsys):
    from launcher import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["ngdiff", "train", "model.path=m", "output_dir=o"])
    monkeypatch.setitem(cli.SUBCOMMANDS, "train", (*cli.SUBCOMMANDS["train"][:2], interrupted))
    assert cli.main(["train", "model.path=m", "output_dir=o"]) == 130
    assert capsys.readouterr().err == (
        "ngdiff: interrupted; any checkpoint written is kept: resume with train.resume=auto: "
        "ngdiff train model.path=m output_dir=o train.resume=auto\n"
    )


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
