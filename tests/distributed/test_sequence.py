"""`ngdiff sequence` under torchrun: two requests of replay on 2 ddp ranks end where one process does."""

from __future__ import annotations

import json
import sys

import pytest
from dist_helpers import run_launch, torchrun
from safetensors.torch import load_file

from tests.conftest import tofu_rows, write_jsonl

pytestmark = pytest.mark.distributed


def test_two_ranks_under_ddp_equal_one_process(tiny_model_dir, tmp_path):
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
        [*torchrun(2), "-m", "launcher", *common, "parallel.backend=ddp", f"output_dir={two}"], tmp_path / "two.log"
    )
    for index in (1, 2):
        a = load_file(one / f"request_{index}" / "final" / "model.safetensors")
        b = load_file(two / f"request_{index}" / "final" / "model.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # the matrix is scored data-parallel on 2 ranks (each a slice of the items): the same numbers
    seq_one, seq_two = (json.loads((d / "sequence.json").read_text()) for d in (one, two))
    for metric in ("forget_answer_loss", "forget_rougeL_recall"):
        for row_one, row_two in zip(seq_one["matrix"][metric], seq_two["matrix"][metric], strict=True):
            assert row_one == pytest.approx(row_two, abs=1e-6)
    assert seq_one["utility"][1]["retain_answer_loss"] == pytest.approx(seq_two["utility"][1]["retain_answer_loss"])
