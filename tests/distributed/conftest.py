"""Session fixtures that launch the multi-process runs once and share their results between tests.

Three launches cover the equality matrix: the 1-process reference (plain python, `single` backend),
`torchrun` with 2 ranks for ddp and fsdp, and the `deepspeed` launcher with 2 ranks for zero3. Each
launch runs every case of its backends in one process group (see worker.py). `NGDIFF_DIST_CASES` (case
names without the backend, comma-separated, e.g. `ngdiff_sgd,ngdiff_adamw_autolr`) limits the launches
to those cases: the version matrix (scripts/version_matrix.sh) runs a subset of the equality tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from dist_helpers import (
    backend_cases,
    common_overrides,
    deepspeed_launcher,
    matrix_cases,
    precision_cases,
    run_cases,
    torchrun,
)


def selected(cases: list[dict]) -> list[dict]:
    """The cases `NGDIFF_DIST_CASES` names (all where it is unset); a case's name is `<backend>_<case>`."""
    wanted = os.environ.get("NGDIFF_DIST_CASES", "")
    if not wanted:
        return cases
    names = set(wanted.split(","))
    return [case for case in cases if case["name"].split("_", 1)[1] in names]


@pytest.fixture(scope="session")
def dist_runs(tmp_path_factory, tiny_model_dir, tofu_split) -> Path:
    """Runs all three launches once; returns the folder holding every case's result."""
    out = tmp_path_factory.mktemp("dist_runs")
    common = common_overrides(tiny_model_dir, tofu_split)
    reference = [
        {"name": f"single_{n}", "overrides": ["parallel.backend=single", *o]}
        for n, o in matrix_cases(tofu_split).items()
    ]
    launches = [
        ([sys.executable], selected(reference), "single"),
        (torchrun(), selected(backend_cases("ddp", tofu_split) + backend_cases("fsdp", tofu_split)), "torchrun"),
        (deepspeed_launcher(), selected(backend_cases("zero3", tofu_split)), "deepspeed"),
    ]
    return run_cases(out, common, launches)


@pytest.fixture(scope="session")
def single_reference(tmp_path_factory, tiny_model_dir, tofu_split) -> Path:
    """Just the 1-process `ngdiff_sgd` case, for the launcher tests (cheaper than the whole matrix)."""
    out = tmp_path_factory.mktemp("single_reference")
    case = {"name": "single_ngdiff_sgd", "overrides": ["parallel.backend=single", *matrix_cases()["ngdiff_sgd"]]}
    return run_cases(out, common_overrides(tiny_model_dir, tofu_split), [([sys.executable], [case], "single")])


@pytest.fixture(scope="session")
def precision_runs(tmp_path_factory, tiny_model_dir, tofu_split) -> Path:
    """bf16, stash and export cases: 1 process (fsdp and zero3 on a 1-rank group, and `single`), then
    2 ranks under torchrun (fsdp) and the deepspeed launcher (zero3)."""
    out = tmp_path_factory.mktemp("precision_runs")
    common = common_overrides(tiny_model_dir, tofu_split)
    two = precision_cases(2)
    launches = [
        ([sys.executable], precision_cases(1), "one"),
        (torchrun(), [c for c in two if "_fsdp_" in c["name"]], "torchrun"),
        (deepspeed_launcher(), [c for c in two if "_zero3_" in c["name"]], "deepspeed"),
    ]
    return run_cases(out, common, launches)
