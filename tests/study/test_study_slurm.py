"""`ngdiff study --slurm` on a real one-machine Slurm: a world job, one array task per run, a report job.

Skips where Slurm is not installed or we are not root (tests/slurm_helpers.py; CI installs Slurm).
A requeued task whose run has finished skips it; a second submission of a finished study submits nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.study_cli import CONFIG_DIR
from tests.slurm_helpers import job_env, patched_env, running_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TIMEOUT = 600


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster("ngdiff-study-slurm-", nodes=1, cpus=2, gpus=0)


def state(cluster, job: str) -> list[str]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], env=cluster.env(), capture_output=True, text=True
    ).stdout
    if out.strip():
        return out.split()
    out = subprocess.run(
        ["squeue", "-h", "-o", "%T", "-j", job], env=cluster.env(), capture_output=True, text=True
    ).stdout
    return out.split() or ["GONE"]


def wait_gone(cluster, job: str, study: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], env=cluster.env(), capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(1)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((study / "slurm").glob("*.out")))
    pytest.fail(f"job {job} still queued after {TIMEOUT} s:\n{logs}")


def tiny_study(tmp: Path) -> Path:
    raw = yaml.safe_load((CONFIG_DIR / "quick.yaml").read_text())
    raw["name"] = "slurm"
    raw["world"]["finetune"]["epochs"] = 1
    raw["world"]["eval_items"] = {"forget": 4, "retain": 4, "real_authors": 4, "world_facts": 4}
    raw["budget_epochs"] = 1
    raw["methods"] = {"ga": raw["methods"]["ga"], "gdiff": raw["methods"]["gdiff"]}
    raw["lrs"] = [1e-3, 1e-2]
    path = tmp / "slurm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_study_array_job_runs_every_run_and_reports(cluster):
    tmp = Path(tempfile.mkdtemp(prefix="ngdiff-study-", dir=str(cluster.root)))  # munged-readable
    study = tmp / "study"
    printed = io.StringIO()
    with patched_env(job_env(cluster)), contextlib.redirect_stdout(printed):
        assert main(["study", str(tiny_study(tmp)), "--slurm", "--output-dir", str(study)]) == 0
    jobs = yaml.safe_load(printed.getvalue())
    assert jobs["tasks"] == 4
    wait_gone(cluster, jobs["report"], study)
    scripts = {p.name for p in (study / "slurm").glob("*.sbatch")}
    assert scripts == {"world.sbatch", "array.sbatch", "report.sbatch"}
    assert "#SBATCH --array=0-3" in (study / "slurm" / "array.sbatch").read_text()
    rows = [json.loads(line) for line in (study / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["lr"]) for r in rows} == {("ga", 1e-3), ("ga", 1e-2), ("gdiff", 1e-3), ("gdiff", 1e-2)}
    # the report job ran: on this tiny world (its target learns too little) the summary refuses to rank
    assert "World unhealthy" in (study / "summary.md").read_text() and (study / "results.jsonl").is_file()

    # a requeued task finds its run finished and leaves it alone
    task = f"{jobs['array']}_1"
    done = next((study / "runs").glob("ga__lr1e-02__s0/done.json"))
    before = done.stat().st_mtime
    subprocess.run(["scontrol", "requeue", task], env=cluster.env(), check=True, timeout=30)
    wait_gone(cluster, jobs["array"], study)
    assert done.stat().st_mtime == before
    log = "\n".join(p.read_text() for p in (study / "slurm").glob("*array*_1.out"))
    assert "ga__lr1e-02__s0: already finished" in log

    printed = io.StringIO()
    with patched_env(job_env(cluster)), contextlib.redirect_stdout(printed):
        assert main(["study", str(tmp / "slurm.yaml"), "--slurm", "--output-dir", str(study)]) == 0
    assert "nothing to submit" in printed.getvalue()
