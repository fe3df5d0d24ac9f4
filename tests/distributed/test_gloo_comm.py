"""parallel.gloo_comm: the in-place all-gather and reduce-scatter that FSDP2 and ZeRO-3 use on gloo give
torch's results without a whole-tensor scratch copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.dist_helpers import run_launch, torchrun

WORKER = Path(__file__).with_name("comm_worker.py")


def ranks_results(tmp_path: Path, nproc: int) -> list[dict]:
    run_launch([*torchrun(nproc), str(WORKER), str(tmp_path)], tmp_path / "launch.log", timeout=300)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("nproc", [2, 3])
def test_collectives_match_torch_without_a_staging_copy(tmp_path, nproc):
    for result in ranks_results(tmp_path, nproc):
        assert result["all_gather_equal"] and result["all_gather_inplace_equal"]
        for op in ("sum", "avg"):
            if nproc == 2:  # one addition per element: the order cannot differ
                assert result[f"reduce_scatter_{op}_equal"], result
            else:  # the same terms, perhaps added in another order
                assert result[f"reduce_scatter_{op}_max_diff"] < 1e-5, result
            # gloo's own stages a whole copy of the input (1.0); in place, only page-sized noise is left
            assert result[f"reduce_scatter_{op}_peak"] < 0.1, result
        assert result["all_gather_peak"] < 0.1, result
