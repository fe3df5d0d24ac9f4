"""The user's DeepSpeed JSON: trainer keys filled in, conflicts and unsupported stages refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parallel.zero3 import DeepSpeedConfigError, build_deepspeed_config

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero3.json"
LAYOUT = dict(micro_batch=2, accumulation=4, world_size=2, precision="bf16", cpu_offload=False)


def test_shipped_config_is_filled_in():
    config = build_deepspeed_config(json.loads(SHIPPED.read_text()), **LAYOUT)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 16
    assert config["bf16"]["enabled"] is True
    assert config["gradient_clipping"] == 0.0
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_allow_untested_optimizer"] is True


def test_agreeing_values_are_accepted():
    config = build_deepspeed_config({"train_batch_size": 16, "bf16": {"enabled": True}}, **LAYOUT)
    assert config["train_batch_size"] == 16


@pytest.mark.parametrize(
    ("user", "needle"),
    [
        ({"train_batch_size": 32}, "train_batch_size=32 disagrees"),
        ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4"),
        ({"bf16": {"enabled": False}}, "bf16.enabled"),
        ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
        ({"zero_optimization": {"stage": 2}}, "stage=2 is not supported"),
    ],
)
def test_conflicts_are_clear_errors(user, needle):
    with pytest.raises(DeepSpeedConfigError, match=needle):
        build_deepspeed_config(user, **LAYOUT)


def test_cpu_offload_adds_optimizer_offload():
    config = build_deepspeed_config({}, **{**LAYOUT, "cpu_offload": True})
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert config["zero_force_ds_cpu_optimizer"] is False  # the trainer's torch optimizer steps it


def test_auto_buckets_are_sized_to_the_model():
    """Hugging Face's "auto": reduce bucket hidden^2, prefetch 0.9 hidden^2, persistence 10 hidden; and
    ngdiff's: at most 10 hidden^2 gathered parameters kept for reuse."""
    config = build_deepspeed_config(json.loads(SHIPPED.read_text()), **LAYOUT, hidden_size=64)
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096
    assert zero["stage3_prefetch_bucket_size"] == 3686
    assert zero["stage3_param_persistence_threshold"] == 640
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 40960
    explicit = build_deepspeed_config({"zero_optimization": {"reduce_bucket_size": 123}}, **LAYOUT, hidden_size=64)
    assert explicit["zero_optimization"]["reduce_bucket_size"] == 123
    unknown = build_deepspeed_config(json.loads(SHIPPED.read_text()), **LAYOUT)  # no model size: DeepSpeed's own
    assert "reduce_bucket_size" not in unknown["zero_optimization"]
