"""`ngdiff slurm submit` against a real one-machine Slurm (two nodes, fake GPUs), started for this module.

What is checked for real: the rendered script runs under sbatch; a tiny run finishes with its final
model, metrics and an offline W&B run named after the job; a run warned with
`scancel --signal=USR1` checkpoints, requeues itself, ignores a half-written checkpoint, resumes and
ends with exactly the parameters of an uninterrupted run; a 2-node torchrun job rendezvouses across
the nodes; credentials never reach anything the job writes. Skips (with the reason) where Slurm is
not installed or we are not root; CI installs it (.ci/run).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.cli import main
from launcher.slurm_env import SlurmJob
from tests.slurm_helpers import REPO, job_env, patched_env, running_cluster
from tests.wandb_records import read_finished_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
JOB_TIMEOUT = 300  # seconds for any one job; a request the cluster cannot meet waits forever otherwise
SECRET = "wandb-key-5f0c1d2e3b4a69788796a5b4c3d2e1f0sentinel"


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster("ngdiff-slurm-", nodes=2, cpus=2, gpus=2)


def submit(cluster, overrides: list[str], *options: str, **env: str) -> str:
    """`ngdiff slurm submit` in this process (one torch import for all submissions); returns the job id."""
    printed = io.StringIO()
    with patched_env(job_env(cluster, **env)), contextlib.redirect_stdout(printed):
        code = main(["slurm", "submit", *overrides, *options])
    assert code == 0, printed.getvalue()
    job = printed.getvalue().strip().splitlines()[-1]
    assert job.isdigit(), printed.getvalue()
    return job


def job_info(cluster, job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=cluster.env(), capture_output=True, text=True, timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(cluster, job: str, states: set[str], timeout: float = JOB_TIMEOUT, log: Path | None = None) -> dict:
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(cluster, job)
        if info.get("JobState") in states:
            return info
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=cluster.env(), timeout=30, check=False)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(log.glob("*.out"))) if log and log.is_dir() else ""
    pytest.fail(f"job {job} not in {states} after {timeout:.0f} s (state {info.get('JobState')}):\n{logs}")


def job_log(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((out / "slurm").glob("*.out")))


def common(model: Path, split: dict[str, Path], out: Path, steps: int) -> list[str]:
    return [
        f"model.path={model}",
        f"data.forget={split['forget']}",
        f"data.retain={split['retain']}",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "optim.name=adamw",  # 2 ranks equal 1 process to AdamW round-off (no AutoLR fit of tiny loss changes)
        "optim.lr=1e-3",
        "autolr.enabled=false",
        "logging.progress=false",
    ]


def final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


STEPS = 16
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


@pytest.fixture(scope="module")
def jobs(cluster, tiny_model_dir, tofu_split, tmp_path_factory) -> dict[str, dict]:
    """Submit every job of this module at once (the cluster runs them side by side, saving minutes):
    an uninterrupted run (W&B offline, a credential in its environment), the same run to be preempted,
    a 2-node torchrun DDP run (preempted too) and a 2-node DeepSpeed-launcher ZeRO-3 run."""
    root = tmp_path_factory.mktemp("slurm")
    submitted: dict[str, dict] = {}
    plain = [*common(tiny_model_dir, tofu_split, root / "plain", STEPS), "logging.wandb=true", "logging.tags=[t1]"]
    start = time.monotonic()
    submitted["plain"] = {"out": root / "plain", "start": start}
    submitted["plain"]["job"] = submit(cluster, plain, "--nodes", "1", "--gpus-per-node", "1", WANDB_API_KEY=SECRET)
    preempted = common(tiny_model_dir, tofu_split, root / "preempted", STEPS)
    submitted["preempted"] = {"out": root / "preempted", "job": submit(cluster, preempted, *ONE_GPU)}
    two = [*common(tiny_model_dir, tofu_split, root / "two_nodes", STEPS), "parallel.backend=ddp"]
    submitted["two_nodes"] = {
        "out": root / "two_nodes",
        "job": submit(cluster, two, "--nodes", "2", "--gpus-per-node", "1"),
    }
    ds = [*common(tiny_model_dir, tofu_split, root / "deepspeed", 4), "parallel.backend=zero3"]
    submitted["deepspeed"] = {
        "out": root / "deepspeed",
        "job": submit(cluster, ds, "--nodes", "2", "--gpus-per-node", "1", "--launcher", "deepspeed"),
    }
    return submitted


ONE_GPU = ("--nodes", "1", "--gpus-per-node", "1")


@pytest.fixture(scope="module")
def finished_run(cluster, jobs) -> dict:
    run = jobs["plain"]
    info = wait_for(cluster, run["job"], FINAL, log=run["out"] / "slurm")
    if "elapsed" not in run:
        run["elapsed"] = time.monotonic() - run["start"]
        print(f"\nsubmitted tiny job {run['job']}: {STEPS} steps, submit to COMPLETED in {run['elapsed']:.1f} s")
    assert info["JobState"] == "COMPLETED", job_log(run["out"])
    return run


@pytest.fixture(scope="module")
def preemptions(cluster, jobs) -> dict[str, dict]:
    """Warn each job meant for it with `scancel --signal=USR1` once it has logged two steps, wait until it
    has checkpointed and requeued itself, plant a half-written newer checkpoint, release it, let it finish.

    Runs before the module's other tests look at anything: these jobs were submitted with the others
    and must be caught while they run."""
    runs = {name: jobs[name] for name in ("preempted", "two_nodes")}
    signalled: set[str] = set()
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(signalled) < len(runs):
        for name, run in runs.items():
            metrics = run["out"] / "metrics.jsonl"
            if name in signalled or not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
                continue
            sent = subprocess.run(
                ["scancel", "--signal=USR1", run["job"]], env=cluster.env(), capture_output=True, text=True, timeout=30
            )
            assert sent.returncode == 0, sent.stderr
            signalled.add(name)
        for name, run in runs.items():
            state = job_info(cluster, run["job"]).get("JobState")
            assert name in signalled or state in ("PENDING", "RUNNING", "CONFIGURING"), job_log(run["out"])
        assert time.monotonic() < deadline, "jobs never logged two steps"
        time.sleep(0.05)
    for run in runs.values():
        # a requeued job waits ~120 s (BeginTime); release it once it is back in the queue
        info = wait_for(cluster, run["job"], {"PENDING", *FINAL}, log=run["out"] / "slurm")
        assert info["JobState"] == "PENDING", f"not requeued:\n{job_log(run['out'])}"
        run["restarts"] = int(info.get("Restarts", "0"))
        checkpoints = sorted((run["out"] / "checkpoints").glob("step_*"))
        assert checkpoints and (checkpoints[-1] / "COMPLETE").is_file(), job_log(run["out"])
        run["checkpoint"] = checkpoints[-1]
        run["final_before_resume"] = (run["out"] / "final").exists()
        half = run["out"] / "checkpoints" / "step_99999999"  # a crash mid-save: newer, but no COMPLETE marker
        (half / "engine").mkdir(parents=True)
        (half / "trainer_state.json").write_text("{not json")
    time.sleep(1.1)  # releasing within the same second can fail the job ("Job credential revoked")
    for run in runs.values():
        cmd = ["scontrol", "update", f"JobId={run['job']}", "StartTime=now"]
        subprocess.run(cmd, env=cluster.env(), check=True, timeout=30)
    for run in runs.values():
        run["state"] = wait_for(cluster, run["job"], FINAL, log=run["out"] / "slurm")["JobState"]
    return runs


def check_preempted_and_resumed(run: dict) -> int:
    """The checks common to every preempted run; returns the step it stopped at."""
    out, job, log = run["out"], run["job"], job_log(run["out"])
    assert run["state"] == "COMPLETED", log
    assert run["restarts"] == 1 and not run["final_before_resume"]
    stopped_at = int(run["checkpoint"].name.split("_")[1])
    assert 2 <= stopped_at < STEPS, f"stopped at step {stopped_at}"
    assert "received SIGUSR1: checkpointing after the current step" in log
    assert f"requeueing Slurm job {job}" in log  # said before scontrol requeue kills the tasks
    assert f"ngdiff: job {job} (restart 1)" in log
    assert f"resumed from {run['checkpoint']}" in log, log  # not from the half-written step_99999999
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # appended across the restart, no gap or repeat
    return stopped_at


def test_preempted_job_requeues_resumes_and_matches_uninterrupted(cluster, jobs, preemptions):
    """USR1 mid-run -> checkpoint -> `scontrol requeue` -> resume: the same parameters, bit for bit."""
    run = preemptions["preempted"]
    stopped_at = check_preempted_and_resumed(run)
    reference = final_params(wait_done(cluster, jobs["plain"]))
    ours = final_params(run["out"])
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), f"{name} differs after requeue + resume"
    print(f"\npreempted at step {stopped_at}, requeued, resumed: final parameters bit-identical ({len(ours)} tensors)")


def wait_done(cluster, run: dict) -> Path:
    info = wait_for(cluster, run["job"], FINAL, log=run["out"] / "slurm")
    assert info["JobState"] == "COMPLETED", job_log(run["out"])
    return run["out"]


def test_submitted_job_finishes_with_model_metrics_and_wandb(finished_run):
    out, job = finished_run["out"], finished_run["job"]
    assert (out / "final" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (out / "slurm" / "job.sbatch").is_file()
    log = job_log(out)
    assert f"ngdiff: job {job} (restart 0) on n" in log
    assert re.search(rf"rank 0/1: slurm job {job} \(ngdiff-plain\) on 1 node", log), log
    assert "W&B offline: WANDB_MODE=offline" in log
    run = read_finished_run(out)
    assert run.name == f"ngdiff-plain-{job}" and run.group == f"slurm-{job}" and run.tags == ["t1"]
    assert run.config["slurm"]["job_id"] == job and run.config["train"]["max_steps"] == STEPS
    logged = {row["_step"]: row for row in run.history if "train/loss_forget" in row}
    assert sorted(logged) == list(range(1, STEPS + 1))
    for row in rows:
        assert logged[row["step"]]["train/loss_forget"] == pytest.approx(row["loss_forget"], rel=1e-12)
        assert logged[row["step"]]["train/w_retain"] == pytest.approx(row["w_retain"], rel=1e-12)
    assert run.exit_code == 0


def test_credentials_never_reach_what_the_job_writes(finished_run):
    out = finished_run["out"]
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix not in (".safetensors", ".pt", ".bin")]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "job.sbatch" for p in files)
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, f"credential found in {leaks}"


def _config(run: dict) -> dict:
    import yaml

    return yaml.safe_load((run["out"] / "config.yaml").read_text())


def _split(run: dict) -> dict[str, Path]:
    data = _config(run)["data"]
    return {"forget": Path(data["forget"]), "retain": Path(data["retain"])}


def test_two_node_torchrun_job_is_preempted_and_resumes(cluster, jobs, preemptions, finished_run):
    run = preemptions["two_nodes"]
    stopped_at = check_preempted_and_resumed(run)
    log = job_log(run["out"])
    assert job_info(cluster, run["job"])["NodeList"] == "n[1-2]"
    assert log.count("rank 0/2 on cpu, backend ddp") == 2 and log.count("rank 1/2 on cpu, backend ddp") == 2
    # one rank per node; the c10d rendezvous, not the node order, decides which one is rank 0
    placed = set(re.findall(r"rank (\d)/2: slurm job \d+ .* this is task \d/2 on node \d \((n\d)\)", log))
    assert {p[0] for p in placed} == {"0", "1"} and {p[1] for p in placed} == {"n1", "n2"}, log
    # 2 ranks x half the batch each == 1 process x the whole batch: the same training, to AdamW round-off
    ours, single = final_params(run["out"]), final_params(finished_run["out"])
    worst = max(float((ours[k] - single[k]).abs().max()) for k in ours)
    assert worst < 1e-4, worst
    print(f"\n2-node DDP job preempted at step {stopped_at}, resumed; max |param - 1-process param| = {worst:.1e}")


def test_two_node_deepspeed_launcher_job_with_a_hostfile(cluster, jobs, finished_run):
    run = jobs["deepspeed"]
    out = wait_done(cluster, run)
    log = job_log(out)
    assert (out / "slurm" / f"hostfile-{run['job']}").read_text() == "n1 slots=1\nn2 slots=1\n"
    assert "rank 0/2 on cpu, backend zero3" in log and "rank 1/2 on cpu, backend zero3" in log
    placed = set(re.findall(r"rank (\d)/2: slurm job \d+ .* this is task \d/2 on node \d \((n\d)\)", log))
    assert {p[0] for p in placed} == {"0", "1"} and {p[1] for p in placed} == {"n1", "n2"}, log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (finished_run["out"] / "metrics.jsonl").read_text().splitlines()]
    # same model, same global batch: the first step's losses (before any update) agree across 1 and 2 ranks
    assert rows[0]["loss_forget"] == pytest.approx(single[0]["loss_forget"], rel=1e-6)
    assert rows[0]["loss_retain"] == pytest.approx(single[0]["loss_retain"], rel=1e-6)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and (out / "final").is_dir()


def test_sbatch_refusal_is_shown_and_nothing_runs(cluster, tiny_model_dir, tofu_split, tmp_path, capsys):
    args = [*common(tiny_model_dir, tofu_split, tmp_path / "refused", 2), *ONE_GPU, "--partition", "nosuchpartition"]
    with patched_env(job_env(cluster)):
        assert main(["slurm", "submit", *args]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused the job" in err and "invalid partition" in err.lower()


def test_slurm_env_inside_a_real_allocation(cluster):
    """What `SlurmJob.from_env` reads is what Slurm really sets, on both nodes."""
    code = (
        "import json; from launcher.slurm_env import SlurmJob; j = SlurmJob.from_env(); print(json.dumps(j.__dict__))"
    )
    result = subprocess.run(
        ["srun", "-N2", "--ntasks-per-node=1", "-J", "envcheck", "--time=1", sys.executable, "-c", code],
        cwd=REPO,
        env=job_env(cluster),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted(
        (SlurmJob(**{**d, "nodes": tuple(d["nodes"])}) for d in map(json.loads, result.stdout.split("\n")[:2])),
        key=lambda j: j.procid,
    )
    assert [j.procid for j in jobs] == [0, 1] and [j.node_id for j in jobs] == [0, 1]
    assert all(j.nodes == ("n1", "n2") and j.ntasks == 2 and j.job_name == "envcheck" for j in jobs)
    assert jobs[0].run_name == f"envcheck-{jobs[0].job_id}"
