"""Outside Slurm the preemption signals still save and exit cleanly (no requeue, a hint to resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_outside_slurm_checkpoints_and_exits_cleanly(tiny_model_dir, tofu_split, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "train",
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']}",
        f"data.retain={tofu_split['retain']}",
        f"output_dir={out}",
        "train.max_steps=400",
        "logging.progress=false",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "received SIGTERM: checkpointing after the current step" in output
    assert "resume with train.resume=auto" in output and "requeue" not in output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    assert (checkpoint / "COMPLETE").is_file() and int(checkpoint.name.split("_")[1]) == steps[-1] < 400
    assert not (out / "final").exists()
