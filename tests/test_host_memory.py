"""The process keeps freed heap memory: repeated forward passes stop costing page faults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# five forward passes of a tiny Llama on an evaluation-sized batch, after one warm-up pass: the minor page
# faults they cost (the kernel zeroing pages that malloc gave back and asked for again)
WORKLOAD = """
import resource, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from ngdiff.host_memory import keep_freed_heap
print(keep_freed_heap() if sys.argv[1] == "keep" else None)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=2000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 2000, (40, 120))
with torch.no_grad():
    model(input_ids=ids)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        model(input_ids=ids)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_workload(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_TOP_PAD_"}
    environ |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, env=environ, check=True, cwd=REPO
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_forward_passes_stop_faulting_pages_once_freed_heap_is_kept():
    said, baseline = run_workload("default")
    assert said == "None"
    said, kept = run_workload("keep")
    assert said == "True"
    assert baseline > 10_000  # the defaults hand the activations' pages back after every pass
    assert kept < baseline / 5


def test_a_users_own_malloc_setting_is_left_alone():
    said, _ = run_workload("keep", MALLOC_TOP_PAD_="131072")
    assert said == "False"
