"""`ngdiff eval` on one process and under torchrun (2 ranks, gloo): same per-item results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from tests.conftest import free_port

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


def test_own_splits_with_and_without_companions(one_process, tiny_model_dir, tmp_path, capsys):
    from ngdiff import TOFU_DIR
    from tests.conftest import tofu_rows, write_jsonl

    companion = [json.loads(line) for line in (TOFU_DIR / "forget01_perturbed.jsonl").read_text().splitlines()[:3]]
    write_jsonl(tmp_path / "forget.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in companion])
    write_jsonl(tmp_path / "forget_perturbed.jsonl", companion)
    write_jsonl(tmp_path / "retain.jsonl", tofu_rows(3))
    own = ["--forget", str(tmp_path / "forget.jsonl"), "--retain", str(tmp_path / "retain.jsonl")]
    capsys.readouterr()
    items = run_eval(tiny_model_dir, tmp_path / "out", *own)
    assert list(items) == ["forget", "retain", "forget_para"]  # the companion has paraphrased_question
    # the forget split read from its companion is TOFU's forget01 set: the same records as --split forget01
    assert_same_items(
        {"forget": json.loads((one_process / "items.json").read_text())["forget"]}, {"forget": items["forget"]}
    )
    metrics = json.loads((tmp_path / "out" / "aggregate.json").read_text())["metrics"]
    assert "forget_truth_ratio" in metrics and "retain_truth_ratio" not in metrics and "model_utility" not in metrics
    assert metrics["retain_rougeL_recall"] == pytest.approx(sum(r["rougeL_recall"] for r in items["retain"]) / 3)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Forget quality (KS p-value): needs --reference" in summary
    assert "Model utility: needs the retain, real_authors and world_facts sets" in summary
    # one naming style: a label in words, then the value, then the key in aggregate.json
    assert re.search(r"\n\| Forget ROUGE-L recall \| [0-9.e+-]+ \| `forget_rougeL_recall` \|\n", summary)
    assert str(tmp_path / "out") in capsys.readouterr().out  # where the files went

    # without a companion the forget truth ratio (and so forget quality) is skipped, with the reason
    (tmp_path / "forget_perturbed.jsonl").unlink()
    run_eval(tiny_model_dir, tmp_path / "out2", *own, "--reference", str(one_process))
    metrics = json.loads((tmp_path / "out2" / "aggregate.json").read_text())["metrics"]
    assert "forget_truth_ratio" not in metrics and "forget_quality" not in metrics
    summary = (tmp_path / "out2" / "summary.md").read_text()
    assert "Forget truth ratio: the forget rows have no paraphrased_answer" in summary
    assert "Forget quality (KS p-value): needs the forget truth ratios" in summary


def test_own_forget_split_with_reference_gives_forget_quality(one_process, tiny_model_dir, tmp_path):
    from ngdiff import TOFU_DIR
    from tests.conftest import write_jsonl

    rows = [json.loads(line) for line in (TOFU_DIR / "forget01_perturbed.jsonl").read_text().splitlines()[:3]]
    write_jsonl(tmp_path / "mine.jsonl", rows)  # companions in the file itself
    run_eval(
        tiny_model_dir, tmp_path / "out", "--forget", str(tmp_path / "mine.jsonl"), "--reference", str(one_process)
    )
    metrics = json.loads((tmp_path / "out" / "aggregate.json").read_text())["metrics"]
    assert metrics["forget_quality"] == pytest.approx(1.0)  # the same model's truth ratios: indistinguishable


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
        (
            ["eval", "--model", "{model}", "--forget", "/nonexistent.jsonl"],
            "--forget /nonexistent.jsonl: file not found",
        ),
        (["eval", "--benchmark", "muse", "--model", "{model}", "--forget", "x.jsonl"], "drop --benchmark muse"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, tiny_model_dir, capsys):
    argv = [a.replace("{model}", str(tiny_model_dir)) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


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
    extra = ["--backend", backend] if backend else []
    two = torchrun_eval(tiny_model_dir, tmp_path / "out2", *extra)
    one = json.loads((one_process / "items.json").read_text())
    if backend:  # GradNorm needs the whole gradient of one item: unsharded evaluations only (ngdiff/eval/mia.py)
        for name in ("mia_forget", "mia_holdout"):
            assert all("gradnorm" not in item for item in two[name])
            one[name] = [{k: v for k, v in item.items() if k != "gradnorm"} for item in one[name]]
        metrics = json.loads((tmp_path / "out2" / "aggregate.json").read_text())["metrics"]
        assert "mia_gradnorm_auc" not in metrics and "mia_loss_auc" in metrics
    assert_same_items(one, two)
    assert json.loads((tmp_path / "out2" / "aggregate.json").read_text())["meta"]["ranks"] == 2
