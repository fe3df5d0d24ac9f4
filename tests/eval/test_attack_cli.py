"""`ngdiff attack` end to end: one process (every attack, the retain model as yardstick) and 2 ranks under
torchrun (the same relearning curve and scores as one process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--forget", "forget01", "--steps", "2", "--lr", "1e-3", "--relearn-batch-size", "2", "--max-items", "6",
        "--max-new-tokens", "6", "--batch-size", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("attack1")
    assert (
        main(["attack", str(tiny_model_dir), *ARGS, "--retain-model", str(tiny_model_dir), "--output", str(out)]) == 0
    )
    assert (out / "attack.png").read_bytes()[:4] == b"\x89PNG"
    return json.loads((out / "attack.json").read_text())


def test_every_attack_reports_before_and_after_and_the_yardstick(one_process):
    report = one_process
    assert report["items"] == 6 and report["settings"]["ranks"] == 1 and report["settings"]["steps"] == 2
    model = report["results"]["model"]
    assert list(model["quantization"]) == ["none", "int8", "int4"]
    curve = model["relearning"]["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2]
    assert model["relearning"]["train_items"] == 3 and model["relearning"]["heldout_items"] == 3
    assert all(0.0 <= p["rougeL_recall"] <= 1.0 and p["answer_loss"] > 0 for p in curve)
    assert curve[2]["answer_loss"] != curve[0]["answer_loss"]  # relearning moved the model
    assert model["format_shift"]  # the paraphrased questions and the other templates
    # the retain model here is the same weights: every attack gives it the very same numbers
    assert report["results"]["retain_model"] == model


@pytest.mark.distributed
def test_two_ranks_relearn_and_score_as_one_process(one_process, tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "launcher", "attack", str(tiny_model_dir), *ARGS,
           "--attacks", "quantize,relearn", "--output", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "attack.json").read_text())
    assert two["settings"]["ranks"] == 2
    one, mine = one_process["results"]["model"], two["results"]["model"]
    for scheme in ("none", "int8", "int4"):
        assert mine["quantization"][scheme] == pytest.approx(one["quantization"][scheme], rel=1e-4, abs=1e-6)
    # each rank its share of every relearning batch, gradients summed: the same AdamW steps as one process
    for a, b in zip(mine["relearning"]["curve"], one["relearning"]["curve"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
