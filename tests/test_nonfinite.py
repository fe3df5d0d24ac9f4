"""A diverging run stops at its first non-finite number with one line naming the step, and exports nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launcher.cli import main
from ngdiff.autolr import AutoLR, AutoLRRecord
from ngdiff.config import AutoLRConfig, OptimConfig, load_config
from ngdiff.finite import NonFiniteError
from ngdiff.metrics_log import read_jsonl
from ngdiff.pipeline import run_training
from parallel.base import DistContext
from tests.conftest import tiny_run_overrides
from tests.test_autolr import Quadratic, make_backend


def train_args(tiny_model_dir, tofu_split, out, *extra) -> list[str]:
    return tiny_run_overrides(tiny_model_dir, tofu_split, f"output_dir={out}", *extra)


def test_a_huge_lr_stops_the_run_at_the_first_nan_step_with_one_line(tiny_model_dir, tofu_split, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["train", *train_args(tiny_model_dir, tofu_split, out, "optim.lr=1e6", "train.max_steps=4")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ngdiff: ")]
    assert code == 2 and not any("Traceback" in line for line in lines)
    # step 1's update (1e6 x a unit-ish direction) is finite; step 2's forward overflows
    assert errors == [
        "ngdiff: error: step 2: grad_norm_retain is nan; its update was not applied, no model exported; "
        "the run diverged; lower optim.lr (or bound the step with optim.max_grad_norm) and start again"
    ]
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1] and all(math.isfinite(v) for v in rows[0].values())


def test_an_infinite_lr_is_a_config_error_before_anything_runs(tiny_model_dir, tofu_split, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", *train_args(tiny_model_dir, tofu_split, out, "optim.lr=inf")]) == 2
    assert "ngdiff: config error: command line: optim.lr must be a finite number, got 'inf'" in capsys.readouterr().err
    assert not out.exists()


def poison_after_step(index: int):
    """An `on_trainer` hook: after 0-based step `index`, one weight overflows (as a finite but huge step can
    make it), with every statistic of the step itself still finite."""

    def hook(trainer) -> None:
        original = trainer.unlearning_step

        def step():
            result = original()
            if trainer.step_index == index:
                trainer.backend.local_params()[0].view(-1)[0] = math.inf
                trainer.backend.params_changed()
            return result

        trainer.unlearning_step = step

    return hook


def test_weights_that_overflow_on_the_last_step_are_not_exported(tiny_model_dir, tofu_split, tmp_path):
    cfg = load_config(None, train_args(tiny_model_dir, tofu_split, tmp_path / "o", "train.max_steps=2"))
    with pytest.raises(NonFiniteError, match=r"^after step 2: the model's weights are not all finite; no model"):
        run_training(cfg, DistContext(), on_trainer=poison_after_step(1))
    assert not (tmp_path / "o" / "final").exists() and not (tmp_path / "o" / "summary.json").exists()


def test_weights_that_overflow_before_the_last_step_stop_the_next_one(tiny_model_dir, tofu_split, tmp_path):
    cfg = load_config(None, train_args(tiny_model_dir, tofu_split, tmp_path / "o", "train.max_steps=3"))
    with pytest.raises(NonFiniteError, match=r"^step 2: loss_retain is nan; its update was not applied"):
        run_training(cfg, DistContext(), on_trainer=poison_after_step(0))
    assert not (tmp_path / "o" / "final").exists()


def test_a_nan_autolr_probe_stops_the_step_with_its_name():
    """L = theta^2 / 2, NaN below theta = -3: the step lands at 1 - 5 = -4 (probe r = +1; r = -1 is at 6)."""
    model = Quadratic(torch.ones(1, dtype=torch.float64), torch.zeros(1), torch.ones(1)).double()
    backend = make_backend(model, OptimConfig(name="sgd", lr=5.0))
    backend.zero_grad()
    model.loss().backward()

    def probe_sums() -> torch.Tensor:
        loss = float(model.loss()) if float(model.theta.min()) >= -3 else math.nan
        return torch.tensor([loss, 1.0], dtype=torch.float64)

    with pytest.raises(NonFiniteError, match=r"^step 4: autolr/probe_loss_\+1 is nan; the step was probed"):
        AutoLR(AutoLRConfig(enabled=True), backend, 10).step(5.0, 3, probe_sums, lambda row: float(row[0] / row[1]))


def test_summary_json_stays_strict_json_when_a_metric_is_nan(tiny_model_dir, tofu_split, tmp_path):
    def rejected_fit(trainer) -> None:
        original = trainer.unlearning_step

        def step():
            result = original()  # an AutoLR record whose fit has no curvature: A, B and r2 are NaN
            result.autolr = AutoLRRecord(
                result.lr, result.lr, (-1.0, 0.0, 1.0), [1.0] * 3, math.nan, math.nan, 0.0, False
            )
            return result

        trainer.unlearning_step = step

    cfg = load_config(None, train_args(tiny_model_dir, tofu_split, tmp_path / "o", "train.max_steps=1"))
    run_training(cfg, DistContext(), on_trainer=rejected_fit)
    text = (tmp_path / "o" / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"summary.json holds {name}"))
    assert summary["last_autolr/A"] == "nan" and summary["last_autolr/acceptance_rate"] == "nan"
    assert summary["steps"] == 1 and math.isfinite(summary["last_loss_forget"])
