"""The W&B sink with the real wandb package, offline; every check reads the written `.wandb` file back."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest

from launcher.slurm_env import SlurmJob
from launcher.wandb_sink import WandbSink, choose_mode
from ngdiff.config import load_config
from tests.wandb_records import find_run_files, read_finished_run


@pytest.fixture
def cfg(tiny_model_dir, tofu_split, tmp_path):
    return load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.forget={tofu_split['forget']}",
            f"data.retain={tofu_split['retain']}",
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=6",
            "autolr.enabled=true",
            "autolr.every=2",
            "logging.wandb=true",
            "logging.project=unlearn",
            "logging.group=sweep-a",
            "logging.run_name=ngdiff-lr1e-5",
            "logging.tags=[tofu,ngdiff]",
            "logging.progress=false",
        ],
    )


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def only_run(cfg):
    return read_finished_run(cfg.output_dir)


def logged_table(row: dict, key: str) -> dict:
    """A table's history entry (wandb flattens it to `key/_type`, `key/path`, `key/nrows`, ...)."""
    return {k[len(key) + 1 :]: v for k, v in row.items() if k.startswith(key + "/")}


def table_rows(cfg, logged: dict) -> dict:
    """The JSON a logged table was written to (`path` is relative to the run's files folder)."""
    (path,) = find_run_files(cfg.output_dir)
    return json.loads((path.parent / "files" / logged["path"]).read_text())


def test_a_real_run_logs_config_every_step_and_autolr_fit(cfg, capsys):
    from launcher.run import train_from_config

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        assert train_from_config(cfg) == 0
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    logged = capsys.readouterr().err  # the run's own log handler (it replaces pytest's)
    assert logged.count("W&B offline") == 1 and "upload later with `wandb sync" in logged  # said once, with the fix
    run = only_run(cfg)
    assert (run.name, run.group, run.project, run.tags) == ("ngdiff-lr1e-5", "sweep-a", "unlearn", ["tofu", "ngdiff"])
    assert run.config["method"]["combiner"] == "ngdiff" and run.config["autolr"]["every"] == 2
    assert run.exit_code == 0
    out = Path(cfg.output_dir)
    expected = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = {row["_step"]: row for row in run.history if "train/loss_retain" in row}
    assert sorted(history) == [r["step"] for r in expected] == list(range(1, 7))
    step_keys = ["loss_retain", "loss_forget", "grad_norm_retain", "grad_norm_forget", "cos_retain_forget"]
    for row in expected:
        logged = history[row["step"]]
        for key in [*step_keys, "w_retain", "w_forget", "lr"]:
            assert logged[f"train/{key}"] == pytest.approx(row[key], rel=1e-12), key
        autolr = {k: v for k, v in row.items() if k.startswith("autolr/")}
        assert {k: logged[k] for k in autolr} == pytest.approx(autolr, rel=1e-12)
    fitted = [history[s] for s in history if "autolr/A" in history[s]]
    assert len(fitted) == 3  # AutoLR every 2 steps of 6
    assert {"autolr/A", "autolr/B", "autolr/r2", "autolr/accepted", "autolr/lr_fitted"} <= set(fitted[0])
    assert any(k.startswith("autolr/probe_loss") for k in fitted[0])
    assert "_wandb/visualize/tradeoff/loss" in run.config  # the training-loss trade-off chart
    assert (out / "wandb_run_id").read_text().strip() == run.run_id  # a requeued job continues this run


def test_evaluation_results_become_tables_and_a_tradeoff_chart(cfg):
    job = SlurmJob.from_env({"SLURM_JOB_ID": "31", "SLURM_JOB_NAME": "ngdiff-eval", "SLURM_JOB_NODELIST": "n1"})
    cfg.logging.run_name = cfg.logging.group = ""
    sink = WandbSink(cfg, job=job)
    items = [
        {"question": "Who wrote X?", "answer": "A", "generated": "B", "rougeL_recall": 0.25},
        {"question": "Where was Y born?", "answer": "Paris", "generated": "Paris", "rougeL_recall": 1.0},
    ]
    sink.log({"loss_forget": 2.0, "loss_retain": 1.0, "lr": 1e-5}, step=1)
    sink.log({"forget_rougeL_recall": 0.9, "retain_rougeL_recall": 0.95, "forget_items": items}, step=1)
    sink.log({"forget_rougeL_recall": 0.4, "retain_rougeL_recall": 0.9, "tofu": {"forget_quality": 0.12}}, step=5)
    sink.finish()
    run = only_run(cfg)
    assert run.name == "ngdiff-eval-31" and run.group == "slurm-31"  # named after the Slurm job when not set
    assert run.config["slurm"]["job_id"] == "31"
    rows = {row["_step"]: row for row in run.history}
    assert rows[1]["eval/forget_rougeL_recall"] == 0.9 and rows[5]["eval/retain_rougeL_recall"] == 0.9
    assert rows[5]["eval/tofu/forget_quality"] == 0.12
    table = logged_table(rows[1], "eval/forget_items")
    assert table["_type"] == "table-file" and table["nrows"] == 2 and table["ncols"] == 4
    data = table_rows(cfg, table)
    assert data["columns"] == ["question", "answer", "generated", "rougeL_recall"]
    assert data["data"][1] == ["Where was Y born?", "Paris", "Paris", 1.0]
    chart = table_rows(cfg, logged_table(rows[5], "tradeoff/rougeL_recall_table"))
    assert chart["columns"] == ["step", "forget rougeL_recall", "retain rougeL_recall"]
    assert chart["data"] == [[1, 0.9, 0.95], [5, 0.4, 0.9]]  # one point per evaluation so far
    assert "_wandb/visualize/tradeoff/rougeL_recall" in run.config
    loss_chart = table_rows(cfg, logged_table(rows[5], "tradeoff/loss_table"))
    assert loss_chart["data"] == [[1, 2.0, 1.0]]


def test_a_failing_wandb_never_stops_training(cfg, caplog):
    sink = WandbSink(cfg)
    assert sink.run is not None

    def broken(*args, **kwargs):
        raise ConnectionError("upload stream closed")

    sink.run.log = broken
    with caplog.at_level(logging.WARNING):
        sink.log({"loss_forget": 1.0, "loss_retain": 1.0}, step=1)  # must not raise
        sink.log({"loss_forget": 1.0, "loss_retain": 1.0}, step=2)
        sink.finish()
    failures = [r.getMessage() for r in caplog.records if "training continues without W&B" in r.getMessage()]
    assert len(failures) == 1 and "ConnectionError: upload stream closed" in failures[0]
    assert sink.run is None


def test_a_wandb_that_cannot_start_leaves_a_working_no_op_sink(cfg, monkeypatch, caplog):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.CommError("403 permission denied for entity")

    monkeypatch.setattr(wandb, "init", refuse)
    with caplog.at_level(logging.WARNING):
        sink = WandbSink(cfg)
    assert sink.run is None and "W&B disabled: could not start a run" in caplog.text
    sink.log({"loss_forget": 1.0}, step=1)
    sink.finish()


def test_mode_is_offline_without_key_or_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    assert choose_mode({"WANDB_MODE": "disabled"}) == ("disabled", "WANDB_MODE=disabled")
    mode, why = choose_mode({})
    assert mode == "offline" and "no W&B API key" in why
    # a key but a server that does not answer (a closed loopback port): offline, with the reason
    mode, why = choose_mode({"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert mode == "offline" and "127.0.0.1 is not reachable" in why
