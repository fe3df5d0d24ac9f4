"""`ngdiff slurm submit --sequence` against the real one-machine Slurm: a sequence job warned with USR1 in
its second request checkpoints, requeues itself, skips its finished first request on restart, resumes the
second, and ends with the models and matrix of an uninterrupted sequence job. Skips where Slurm is not
installed or we are not root (tests/slurm_helpers.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.slurm_helpers import running_cluster
from tests.test_slurm import FINAL, JOB_TIMEOUT, job_info, job_log, submit, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 16
ONE_GPU = ("--sequence", "--nodes", "1", "--gpus-per-node", "1")


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster("ngdiff-slurm-seq-", nodes=1, cpus=2, gpus=2)


def sequence(model: Path, split: dict[str, Path], out: Path) -> list[str]:
    return [
        f"model.path={model}",
        f"data.forget={split['forget']},{split['forget_b']}",
        f"data.retain={split['retain']}",
        f"output_dir={out}",
        "sequence.mode=replay",
        f"train.max_steps={STEPS}",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "autolr.enabled=false",
        "logging.progress=false",
        "eval.max_items=2",
        "eval.max_new_tokens=2",
    ]


def steps_of(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss_forget" in line]


def test_sequence_job_requeued_in_request_2_ends_as_uninterrupted(cluster, tiny_model_dir, tofu_split, tmp_path):
    plain, preempted = tmp_path / "plain", tmp_path / "preempted"
    jobs = {
        "plain": submit(cluster, sequence(tiny_model_dir, tofu_split, plain), *ONE_GPU),
        "preempted": submit(cluster, sequence(tiny_model_dir, tofu_split, preempted), *ONE_GPU),
    }
    job = jobs["preempted"]
    metrics = preempted / "request_2" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        state = job_info(cluster, job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), job_log(preempted)
        assert time.monotonic() < deadline, "request 2 never logged two steps"
        time.sleep(0.05)
    sent = subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env(), capture_output=True, text=True)
    assert sent.returncode == 0, sent.stderr
    info = wait_for(cluster, job, {"PENDING", *FINAL}, log=preempted / "slurm")
    assert info["JobState"] == "PENDING", f"not requeued:\n{job_log(preempted)}"
    assert not (preempted / "request_2" / "final").exists()
    checkpoints = sorted((preempted / "request_2" / "checkpoints").glob("step_*"))
    assert checkpoints and (checkpoints[-1] / "COMPLETE").is_file(), job_log(preempted)
    time.sleep(1.1)  # releasing within the same second can fail the job ("Job credential revoked")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env(), check=True, timeout=30)
    for name, out in (("plain", plain), ("preempted", preempted)):
        assert wait_for(cluster, jobs[name], FINAL, log=out / "slurm")["JobState"] == "COMPLETED", job_log(out)
    log = job_log(preempted)
    assert "received SIGUSR1" in log and f"requeueing Slurm job {job}" in log and f"job {job} (restart 1)" in log
    assert f"resumed from {checkpoints[-1]}" in log, log
    # request 1 was not trained again; request 2's steps continue across the restart, none repeated
    assert steps_of(preempted / "request_1" / "metrics.jsonl") == list(range(1, STEPS + 1))
    assert steps_of(metrics) == list(range(1, STEPS + 1))
    for index in (1, 2):
        ours = load_file(preempted / f"request_{index}" / "final" / "model.safetensors")
        reference = load_file(plain / f"request_{index}" / "final" / "model.safetensors")
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in ours), f"request {index} differs after requeue"
    seq, ref = (json.loads((d / "sequence.json").read_text()) for d in (preempted, plain))
    assert seq["matrix"] == ref["matrix"] and seq["utility"] == ref["utility"]
