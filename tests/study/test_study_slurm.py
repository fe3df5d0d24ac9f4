"""`ngdiff study --slurm` on a real one-machine Slurm: a world job, one array task per run, a report job;
a TOFU world and a MUSE-News one.

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


def submit(cluster, config: Path, study: Path) -> dict:
    """`ngdiff study CONFIG --slurm` as a cluster user; the job ids it printed."""
    printed = io.StringIO()
    with patched_env(job_env(cluster)), contextlib.redirect_stdout(printed):
        assert main(["study", str(config), "--slurm", "--output-dir", str(study)]) == 0
    return yaml.safe_load(printed.getvalue())


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
    jobs = submit(cluster, tiny_study(tmp), study)
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


def tiny_muse_study(tmp: Path) -> Path:
    """muse_quick's world (healthy: its retain model tells forget from holdout texts), two methods, 1 epoch."""
    raw = yaml.safe_load((CONFIG_DIR / "muse_quick.yaml").read_text())
    raw["name"] = "slurm-muse"
    raw["budget_epochs"] = 1
    raw["methods"] = {"gdiff": raw["methods"]["gdiff"], "npo": raw["methods"]["npo"]}
    path = tmp / "slurm-muse.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_muse_study_runs_as_slurm_jobs_and_its_rows_carry_the_distance_to_the_retain_model(cluster):
    tmp = Path(tempfile.mkdtemp(prefix="ngdiff-study-muse-", dir=str(cluster.root)))
    study = tmp / "study"
    jobs = submit(cluster, tiny_muse_study(tmp), study)
    assert jobs["tasks"] == 2
    wait_gone(cluster, jobs["report"], study)
    reference = json.loads((study / "world" / "world.json").read_text())["reference_metrics"]["verbmem_f"]
    rows = [json.loads(line) for line in (study / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"gdiff", "npo"} and {r["step"] for r in rows} == {0, 3}
    # every point, the target's step 0 included, carries MUSE's D against the world's retain model
    for row in rows:
        assert row["verbmem_distance"] == pytest.approx(abs(row["verbmem_f"] - reference) / 100)
    assert "VerbMem" in (study / "summary.md").read_text()


def test_a_failed_world_job_cancels_the_runs_instead_of_leaving_them_queued(cluster):
    tmp = Path(tempfile.mkdtemp(prefix="ngdiff-study-fail-", dir=str(cluster.root)))
    raw = yaml.safe_load(tiny_muse_study(tmp).read_text())
    # two epochs on 4 + 4 texts: the retain model cannot tell forget from holdout texts (PrivLeak AUC 0)
    raw["world"]["finetune"]["epochs"] = 2
    raw["world"]["muse"] |= {"forget_chunks": 4, "retain_chunks": 4, "holdout_chunks": 4, "knowmem_items": 4,
                             "verbmem_items": 4}  # fmt: skip
    config = tmp / "failing.yaml"
    config.write_text(yaml.safe_dump(raw))
    study = tmp / "study"
    jobs = submit(cluster, config, study)
    wait_gone(cluster, jobs["report"], study)  # every job leaves the queue (none waits on a failed world)
    wait_gone(cluster, jobs["array"], study)
    logs = {p.name: p.read_text() for p in (study / "slurm").glob("*.out")}
    world_log = next(text for name, text in logs.items() if "-world-" in name)
    assert "the retain model's PrivLeak AUC (forget vs holdout texts) is 0.0" in world_log
    assert not any("-array-" in name for name in logs) and not (study / "runs").exists()  # no run started
