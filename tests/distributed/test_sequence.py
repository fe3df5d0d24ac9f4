"""`ngdiff sequence` on 2 ranks ends where one process does, under every backend: ddp and fsdp under
torchrun, zero3 under the deepspeed launcher."""

from __future__ import annotations

import json
import sys

import pytest
from dist_helpers import deepspeed_launcher, run_launch, torchrun
from safetensors.torch import load_file

from tests.conftest import tofu_rows, write_jsonl

pytestmark = pytest.mark.distributed

LAUNCHERS = {
    "ddp": lambda: [*torchrun(2), "-m", "launcher"],
    "fsdp": lambda: [*torchrun(2), "-m", "launcher"],
    "zero3": lambda: [*deepspeed_launcher(2), "--module", "launcher"],
}


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero3"])
def test_two_ranks_equal_one_process(backend, tiny_model_dir, tmp_path):
    """Two replay requests (the second trains two forget tasks): each request's final model and the
    whole matrix, scored data-parallel (sharded under fsdp / zero3), equal the one-process sequence's."""
    rows = tofu_rows(64)
    forget = [write_jsonl(tmp_path / f"{name}.jsonl", rows[k * 8 : (k + 1) * 8]) for k, name in enumerate("ab")]
    retain = write_jsonl(tmp_path / "retain.jsonl", rows[40:64])
    common = [
        "sequence",
        f"model.path={tiny_model_dir}",
        f"data.forget={forget[0]},{forget[1]}",
        f"data.retain={retain}",
        "sequence.mode=replay",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "train.max_steps=2",
        "autolr.enabled=false",
        "logging.progress=false",
        "eval.max_items=4",
        "eval.max_new_tokens=4",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    run_launch([sys.executable, "-m", "launcher", *common, f"output_dir={one}"], tmp_path / "one.log")
    run_launch(
        [*LAUNCHERS[backend](), *common, f"parallel.backend={backend}", f"output_dir={two}"],
        tmp_path / "two.log",
    )
    for index in (1, 2):
        a = load_file(one / f"request_{index}" / "final" / "model.safetensors")
        b = load_file(two / f"request_{index}" / "final" / "model.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    seq_one, seq_two = (json.loads((d / "sequence.json").read_text()) for d in (one, two))
    assert [r["steps"] for r in seq_two["requests"]] == [r["steps"] for r in seq_one["requests"]] == [2, 2]
    for metric in ("forget_answer_loss", "forget_rougeL_recall"):
        for row_one, row_two in zip(seq_one["matrix"][metric], seq_two["matrix"][metric], strict=True):
            assert row_one == pytest.approx(row_two, abs=1e-6)
    assert seq_one["utility"][1]["retain_answer_loss"] == pytest.approx(seq_two["utility"][1]["retain_answer_loss"])
