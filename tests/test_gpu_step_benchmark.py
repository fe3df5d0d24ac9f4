"""benchmarks/gpu_step.py: its FLOP count and a CPU run of its whole code path (`--tiny`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ngdiff.memory_plan import ModelShape

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def test_model_flops_follow_palm():
    from benchmarks.gpu_step import model_flops_per_step

    shape = ModelShape(params=1000, block_params=0, outside_params=0, layers=2, hidden=4, intermediate=8,
                       kv_width=4, vocab=10)  # fmt: skip
    # 6 x (1000 - 40 embedding) x 64 tokens + 12 x 2 layers x 4 hidden x 16 positions x 64 tokens
    assert model_flops_per_step(shape, tokens=64, seq_len=16) == 6 * 960 * 64 + 12 * 2 * 4 * 16 * 64


def test_tiny_run_reports_both_variants(tmp_path):
    out = tmp_path / "gpu_step.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--tiny", "--backends", "single,fsdp",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["backend"] for r in results] == ["single", "fsdp"]
    for r in results:
        assert r["tokens_per_step"] == (2 + 2) * 32  # every sequence is exactly --seq-len tokens
        for variant in ("ngdiff", "gdiff_one"):
            assert r[variant]["step_s"] > 0
            assert r[variant]["tokens_per_s"] == r["tokens_per_step"] / r[variant]["step_s"]
        assert r["ngdiff_over_gdiff"] == r["ngdiff"]["step_s"] / r["gdiff_one"]["step_s"]
    assert "| fsdp | ngdiff |" in proc.stdout
