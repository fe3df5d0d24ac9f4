"""Credentials never reach logs, config dumps or sbatch scripts (the submission paths are in test_slurm*)."""

from __future__ import annotations

import io
import logging

from launcher.secrets import MASK, RedactingFilter, find_secrets, install_log_redaction, redact, secret_values
from ngdiff.config import dump_config, load_config

KEY = "0123456789abcdef0123456789abcdef01234567"


def test_values_of_credential_variables_are_found_and_masked():
    env = {
        "WANDB_API_KEY": KEY,
        "HF_TOKEN": "hf_" + "x" * 30,
        "AWS_SECRET_ACCESS_KEY": "aws/secret+value",
        "TOKENIZERS_PARALLELISM": "false_but_long",  # a tokenizer switch, not a token
        "SLURM_JOB_ID": "123456",
        "WANDB_PROJECT": "public-project-name",
    }
    assert set(secret_values(env)) == {KEY, "hf_" + "x" * 30, "aws/secret+value"}
    text = f"key={KEY} hf={'hf_' + 'x' * 30} job=123456 tok=false_but_long"
    assert redact(text, env) == f"key={MASK} hf={MASK} job=123456 tok=false_but_long"


def test_config_values_holding_a_credential_are_reported_by_key():
    cfg = {"logging": {"entity": "team", "tags": ["a", f"k{KEY}"]}, "model": {"path": "/models/x"}}
    assert find_secrets(cfg, {"WANDB_API_KEY": KEY}) == ["logging.tags"]
    assert find_secrets(cfg, {}) == []


def test_log_records_are_masked_in_message_and_arguments(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    stream = io.StringIO()
    logger = logging.getLogger("ngdiff.test_secrets")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    install_log_redaction(logger)
    install_log_redaction(logger)  # idempotent
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    try:
        logger.warning("login with %s failed", KEY)
        logger.warning(f"env dump: WANDB_API_KEY={KEY}")
    finally:
        logger.removeHandler(handler)
    assert KEY not in stream.getvalue() and stream.getvalue().count(MASK) == 2


def test_the_config_dump_holds_no_environment(tiny_model_dir, tofu_split, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.forget={tofu_split['forget']}",
            f"data.retain={tofu_split['retain']}",
            "logging.wandb=true",
        ],
    )
    assert KEY not in dump_config(cfg)
