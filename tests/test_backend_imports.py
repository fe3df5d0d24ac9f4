"""Every backend module imports on a torch whose private FSDP2 collective classes are absent.

`parallel.gloo_comm` subclasses `AllGather` / `ReduceScatter` of FSDP2's private `_fsdp_api` (torch >= 2.9);
only gloo runs need it, so `parallel.fsdp` and `parallel.zero3` import it where a gloo group is set up.
The test removes those classes before anything of ngdiff is imported (a fresh interpreter) and imports
every backend: on NCCL such a torch still runs.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

WITHOUT_PRIVATE_COLLECTIVES = textwrap.dedent(
    """
    import torch.distributed.fsdp._fully_shard._fsdp_api as api
    del api.AllGather, api.ReduceScatter
    import importlib
    for name in ("parallel.single", "parallel.ddp", "parallel.fsdp", "parallel.zero3"):
        importlib.import_module(name)
    try:
        import parallel.gloo_comm
    except ImportError:
        print("gloo_comm needs them")
    print("ok")
    """
)


@pytest.mark.parametrize("hide", [True, False], ids=["classes_absent", "classes_present"])
def test_backends_import_without_fsdp2_private_collectives(hide):
    code = WITHOUT_PRIVATE_COLLECTIVES if hide else WITHOUT_PRIVATE_COLLECTIVES.replace("del api.", "api.")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # the simulation is real: gloo_comm itself fails without the classes, and imports with them
    assert ("gloo_comm needs them" in done.stdout) == hide, done.stdout
    assert done.stdout.strip().endswith("ok")
