"""`ngdiff eval` on one process and under torchrun (2 ranks, gloo): same per-item results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_eval(model_dir: Path, out: Path, *extra: str) -> dict:
    args = ["eval", "--benchmark", "tofu", "--model", str(model_dir), "--max-items", "3", "--max-new-tokens", "6"]
    assert main([*args, "--output", str(out), *extra]) == 0
    return json.loads((out / "items.json").read_text())


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval1") / "out"
    run_eval(tiny_model_dir, out)
    return out


def test_outputs_and_forget_quality_subcommand(one_process, tmp_path, capsys):
    aggregate = json.loads((one_process / "aggregate.json").read_text())
    assert aggregate["benchmark"] == "tofu"
    assert 0.0 <= aggregate["metrics"]["model_utility"] <= 1.0
    items = json.loads((one_process / "items.json").read_text())
    assert [len(items[k]) for k in ("forget", "retain", "real_authors", "world_facts")] == [3, 3, 3, 3]
    assert "| Model utility |" in (one_process / "summary.md").read_text()
    capsys.readouterr()
    # the same model as its own reference: indistinguishable, p = 1
    assert main(["eval", "forget-quality", "--unlearned", str(one_process), "--reference", str(one_process)]) == 0
    assert json.loads(capsys.readouterr().out)["forget_quality"] == pytest.approx(1.0)
    legacy = REPO / "tests/fixtures/tofu_reference_eval_logs/llama2-7b_retain90_wd0.01_eval_log_forget.json"
    assert main(["eval", "forget-quality", "--unlearned", str(one_process), "--reference", str(legacy)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n_unlearned"], result["n_reference"]) == (3, 300)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--benchmark", "tofu", "--model", "/nonexistent"], "not a model folder"),
        (["eval", "--model", "x"], "--benchmark"),
        (["eval", "--benchmark", "tofu", "--model", "{model}", "--split", "forget77"], "unknown TOFU split"),
        (
            ["eval", "--benchmark", "tofu", "--model", "{model}", "--split", "forget10", "--data-dir", "{model}"],
            "not found",
        ),
        (["eval", "forget-quality", "--unlearned", "/nonexistent"], "needs --unlearned A and --reference B"),
        (["eval", "--benchmark", "muse", "--model", "{model}", "--reference", "/nonexistent"], "neither a number"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, tiny_model_dir, capsys):
    argv = [a.replace("{model}", str(tiny_model_dir)) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_eval(model_dir: Path, out: Path, *extra: str) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "launcher", "eval", "--benchmark", "tofu", "--model", str(model_dir),
        "--max-items", "3", "--max-new-tokens", "6", "--output", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "items.json").read_text())


def assert_same_items(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name])
        for x, y in zip(a[name], b[name], strict=True):
            assert x.keys() == y.keys()
            for key in x:
                if isinstance(x[key], float) or (isinstance(x[key], list) and x[key] and isinstance(x[key][0], float)):
                    assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (name, key)
                else:
                    assert x[key] == y[key], (name, key)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["", "fsdp", "zero3"])
def test_two_ranks_give_the_one_process_items(backend, one_process, tiny_model_dir, tmp_path):
    from parallel import BACKENDS

    if backend and backend not in BACKENDS:
        pytest.skip(f"parallel backend {backend} not available")
    extra = ["--backend", backend] if backend else []
    two = torchrun_eval(tiny_model_dir, tmp_path / "out2", *extra)
    assert_same_items(json.loads((one_process / "items.json").read_text()), two)
    assert json.loads((tmp_path / "out2" / "aggregate.json").read_text())["meta"]["ranks"] == 2
