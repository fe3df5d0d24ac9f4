"""optim.schedule / warmup: HF's formulas, applied as a multiplier on the lr each step, resumable."""

from __future__ import annotations

import pytest
import torch
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from ngdiff.config import ConfigError
from ngdiff.metrics_log import read_jsonl
from ngdiff.pipeline import run_training
from ngdiff.schedule import lr_factor, warmup_steps_of
from parallel.base import DistContext
from tests.conftest import stop_requested_in_step
from tests.test_trainer_single import config, final_params, max_diff


def hf_factors(make, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make(optimizer)
    factors = []
    for _ in range(total):
        factors.append(optimizer.param_groups[0]["lr"])  # the lr the HF Trainer's step uses
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_factors_match_hugging_face(warmup):
    total = 10
    linear = hf_factors(lambda o: get_linear_schedule_with_warmup(o, warmup, total), total)
    constant = hf_factors(lambda o: get_constant_schedule_with_warmup(o, warmup), total)
    assert [lr_factor("linear", t, warmup, total) for t in range(total)] == pytest.approx(linear)
    assert [lr_factor("constant", t, warmup, total) for t in range(total)] == pytest.approx(constant)


def test_warmup_in_epochs_is_floored_like_open_unlearning():
    assert warmup_steps_of(0, 1.0, 7) == 7
    assert warmup_steps_of(0, 0.5, 7) == 3
    assert warmup_steps_of(4, 0.0, 7) == 4


def test_both_warmups_are_refused(tiny_model_dir, tofu_split, tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps or optim\.warmup_epochs"):
        config(tiny_model_dir, tofu_split, tmp_path, "optim.warmup_steps=2", "optim.warmup_epochs=1")
    with pytest.raises(ConfigError, match=r"optim\.schedule"):
        config(tiny_model_dir, tofu_split, tmp_path, "optim.schedule=cosine")


def test_logged_lr_follows_the_schedule_and_a_resumed_run_matches(tiny_model_dir, tofu_split, tmp_path):
    # forget set 16 rows / batch 4 = 4 steps per epoch: warmup_epochs=0.5 -> 2 warmup steps
    # the schedule alone: AutoLR (on by default) would rescale the lr it multiplies
    extra = (
        "train.max_steps=6",
        "optim.lr=1e-3",
        "optim.schedule=linear",
        "optim.warmup_epochs=0.5",
        "autolr.enabled=false",
    )
    straight = run_training(config(tiny_model_dir, tofu_split, tmp_path / "s", *extra), DistContext())
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "s" / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3 * f for f in (0, 0.5, 1.0, 0.75, 0.5, 0.25)])

    first = run_training(
        config(tiny_model_dir, tofu_split, tmp_path / "r", *extra), DistContext(), on_trainer=stop_requested_in_step(2)
    )
    assert first.trainer.step_index == 3
    resumed = run_training(
        config(tiny_model_dir, tofu_split, tmp_path / "r", *extra, "train.resume=auto"), DistContext()
    )
    assert max_diff(final_params(straight), final_params(resumed)) < 1e-6
    assert [r["lr"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == pytest.approx(lrs)
