"""Evaluation inside `ngdiff train`: logged with the training metrics, per-step outputs, best model."""

from __future__ import annotations

import json

import pytest

from launcher.cli import main
from ngdiff.config import load_config
from ngdiff.errors import UserError
from ngdiff.eval.during_training import evaluation_factory, light_metric_names
from ngdiff.metrics_log import read_jsonl
from ngdiff.pipeline import run_training
from parallel.base import DistContext
from tests.conftest import free_port


def config(tiny_model_dir, tofu_split, out, *extra):
    return load_config(None, [
        f"model.path={tiny_model_dir}", f"data.forget={tofu_split['forget']}", f"data.retain={tofu_split['retain']}",
        "train.forget_batch_size=4", "train.retain_batch_size=4", "logging.progress=false", f"output_dir={out}",
        "train.max_steps=2", "optim.name=sgd", "optim.lr=0.5", *extra,
    ])  # fmt: skip


def test_tofu_eval_every_step_with_best_model(tiny_model_dir, tofu_split, tmp_path):
    out = tmp_path / "run"
    cfg = config(
        tiny_model_dir, tofu_split, out, "eval.benchmark=tofu", "eval.every=1", "eval.max_items=2",
        "eval.max_new_tokens=4", "eval.best_metric=forget_answer_loss:max",
    )  # fmt: skip
    run_training(cfg, DistContext(), evaluate_factory=evaluation_factory(cfg))
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "forget_answer_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(0.0 <= r["model_utility"] <= 1.0 for r in evals)
    best = json.loads((out / "best" / "best.json").read_text())
    losses = {r["step"]: r["forget_answer_loss"] for r in evals}
    assert best["value"] == pytest.approx(max(losses.values()))
    assert best["step"] == max(losses, key=losses.get)
    assert (out / "best" / "config.json").is_file()
    step2 = json.loads((out / "eval" / "step_00000002" / "items.json").read_text())
    assert len(step2["forget"]) == 2
    # the command evaluates the trained model the run exported, with the same numbers as the last eval
    args = ["--max-items", "2", "--max-new-tokens", "4", "--output", str(tmp_path / "after")]
    assert main(["eval", "--benchmark", "tofu", "--model", str(out / "final"), *args]) == 0
    after = json.loads((tmp_path / "after" / "aggregate.json").read_text())["metrics"]
    assert after["forget_answer_loss"] == pytest.approx(losses[2], rel=1e-4)


def test_light_intermediate_evaluations_compute_what_full_ones_do_without_forget_generation(
    tiny_model_dir, tofu_split, tmp_path
):
    """eval.intermediate=utility: before the last step, the forget sets are scored by likelihood only and
    membership inference is skipped; what a light evaluation reports equals the full evaluation's number."""
    common = ["eval.benchmark=tofu", "eval.every=1", "eval.max_items=3", "eval.max_new_tokens=6", "train.max_steps=3"]
    rows = {}
    for mode in ("full", "utility"):
        cfg = config(tiny_model_dir, tofu_split, tmp_path / mode, *common, f"eval.intermediate={mode}")
        run_training(cfg, DistContext(), evaluate_factory=evaluation_factory(cfg))
        rows[mode] = {r["step"]: r for r in read_jsonl(tmp_path / mode / "metrics.jsonl") if "model_utility" in r}
    assert sorted(rows["utility"]) == [1, 2, 3]
    light_names = set(light_metric_names("tofu", with_reference=False))
    left_out = {"forget_rougeL_recall", "forget_para_rougeL_recall", "mia_loss_auc", "exact_memorization"}
    for step in (1, 2):
        light, full = rows["utility"][step], rows["full"][step]
        assert not left_out & set(light)
        assert left_out <= set(full)
        shared = light_names & set(full)
        assert {"forget_truth_ratio", "forget_prob", "retain_rougeL_recall", "model_utility"} <= shared
        assert {k: light[k] for k in shared} == pytest.approx({k: full[k] for k in shared}, rel=1e-5)
    assert left_out <= set(rows["utility"][3])  # the last evaluation is full
    assert rows["utility"][3]["forget_rougeL_recall"] == pytest.approx(rows["full"][3]["forget_rougeL_recall"])
    meta = json.loads((tmp_path / "utility" / "eval" / "step_00000001" / "aggregate.json").read_text())["meta"]
    assert meta["evaluation"] == "light"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.benchmark=tofu", "eval.best_metric=no_such_metric"], "unknown metric"),
        (["eval.benchmark=tofu", "eval.best_metric=forget_prob:lowest"], "min or max"),
        (["eval.benchmark=tofu", "eval.split=forget42"], "unknown eval.split"),
        (["eval.benchmark=tofu", "eval.reference=/nonexistent/items.json"], "not found"),
        (["eval.benchmark=muse", "eval.best_metric=privleak"], "unknown metric"),  # needs eval.reference
        (["eval.benchmark=muse", "eval.intermediate=utility"], "eval.intermediate=utility is for eval.benchmark=tofu"),
        (
            ["eval.benchmark=tofu", "eval.intermediate=utility", "eval.best_metric=forget_rougeL_recall:min"],
            "not computed by the light evaluations",
        ),
        (["eval.benchmark=tofu", "eval.intermediate=cheap"], "eval.intermediate"),
    ],
)
def test_bad_eval_settings_fail_before_training(overrides, message, tiny_model_dir, tofu_split, tmp_path):
    with pytest.raises(UserError, match=message):
        evaluation_factory(config(tiny_model_dir, tofu_split, tmp_path / "run", *overrides))


def test_no_benchmark_no_evaluation(tiny_model_dir, tofu_split, tmp_path):
    assert evaluation_factory(config(tiny_model_dir, tofu_split, tmp_path / "run")) is None


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_sharded_run_evaluates_like_one_process(backend, tiny_model_dir, tofu_split, tmp_path):
    """Evaluation during a 2-rank sharded training run logs the numbers of the 1-process run."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    overrides = ["eval.benchmark=tofu", "eval.every=1", "eval.max_items=3", "eval.max_new_tokens=4"]
    single = config(tiny_model_dir, tofu_split, tmp_path / "one", *overrides)
    run_training(single, DistContext(), evaluate_factory=evaluation_factory(single))
    args = [
        "train", f"model.path={tiny_model_dir}", f"data.forget={tofu_split['forget']}",
        f"data.retain={tofu_split['retain']}", "train.forget_batch_size=4", "train.retain_batch_size=4",
        "logging.progress=false", f"output_dir={tmp_path / 'two'}", "train.max_steps=2", "optim.name=sgd",
        "optim.lr=0.5", f"parallel.backend={backend}", *overrides,
    ]  # fmt: skip
    port = str(free_port())
    if backend == "zero3":
        launch = [shutil.which("deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", port,
                  "--module", "launcher"]  # fmt: skip
    else:
        launch = [shutil.which("torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                  f"--master_port={port}", "-m", "launcher"]  # fmt: skip
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*launch, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    def evals(out):
        return [r for r in read_jsonl(out / "metrics.jsonl") if "forget_answer_loss" in r]

    one, two = evals(tmp_path / "one"), evals(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("forget_answer_loss", "forget_rougeL_recall", "forget_truth_ratio", "model_utility"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
