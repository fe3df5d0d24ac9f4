"""A real one-machine Slurm cluster for the test modules that submit jobs (tests/test_slurm.py, the study's),
and the environment a submission runs in. Skips, with the reason, where Slurm is not installed or we are
not root; CI installs it (.ci/run)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import slurm_cluster  # noqa: E402


def skip_reason() -> str | None:
    missing = slurm_cluster.missing_tools()
    if missing:
        tools = ", ".join(missing)
        return f"Slurm/munge not installed ({tools} missing); apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "starting the one-machine Slurm cluster needs root"
    return None


def running_cluster(prefix: str, nodes: int, cpus: int, gpus: int) -> Iterator[slurm_cluster.SlurmCluster]:
    """Body of a module-scoped fixture (`yield from` it): start, yield, cancel every job, stop, clean up."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix=prefix))  # not under pytest's 0700 tmp: munged must traverse it
    cluster = slurm_cluster.SlurmCluster(root, nodes=nodes, cpus=cpus, gpus=gpus)
    cluster.start()
    try:
        yield cluster
    finally:
        subprocess.run(["scancel", "--user", "root"], env=cluster.env(), capture_output=True, timeout=30, check=False)
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert cluster.hosts_marker not in Path("/etc/hosts").read_text()


def job_env(cluster: slurm_cluster.SlurmCluster, **extra: str) -> dict[str, str]:
    """What a submission exports to its job (sbatch passes the submitting environment on)."""
    env = {"SLURM_CONF": str(cluster.conf), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return env


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block (submissions run in this process), then as before."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
