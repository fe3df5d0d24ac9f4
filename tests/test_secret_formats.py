"""Token-shaped strings are masked wherever the environment's credentials are; ordinary text is not."""

from __future__ import annotations

import io
import logging

import pytest

from launcher.secrets import MASK, install_log_redaction, redact
from ngdiff.secret_formats import mask_token_formats, mask_values

TOKENS = {
    "hugging face": "hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z",
    "github classic": "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "github fine-grained": "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    "openai": "sk-proj-" + "Ab12Cd34Ef56Gh78Ij90Kl12",
    "aws": "AKIA" + "IOSFODNN7EXAMPLE",
}
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("kind", sorted(TOKENS))
def test_known_token_formats_are_masked_inside_text(kind):
    token = TOKENS[kind]
    assert mask_token_formats(f"tags: [tofu, team-{token}]") == f"tags: [tofu, team-{MASK}]"
    assert redact(f"logging.run_name={token} done", env={}) == f"logging.run_name={MASK} done"


def test_a_wandb_key_is_masked_as_a_value_but_a_commit_id_in_text_is_not():
    assert mask_token_formats(WANDB_KEY) == MASK
    assert redact(f"ngdiff train logging.entity={WANDB_KEY}", env={}) == f"ngdiff train logging.entity={MASK}"
    assert mask_token_formats(f"built from commit {WANDB_KEY}") == f"built from commit {WANDB_KEY}"


@pytest.mark.parametrize(
    "text",
    [
        "hf_transfer is enabled",
        "sk-learn-style-pipeline-config",
        "model.path=/models/Llama-2-7b-hf_chat_finetuned",
        "ghp_short",
        "AKIAshort and AKIA1234",
        "outputs/run/checkpoints/step_00000012",
        "task-weighted github_pat_x",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert mask_token_formats(text) == text and redact(text, env={}) == text


def test_nested_config_values_are_masked():
    raw = {"logging": {"tags": ["tofu", TOKENS["hugging face"]], "entity": WANDB_KEY}, "train": {"seed": 42}}
    assert mask_values(raw) == {"logging": {"tags": ["tofu", MASK], "entity": MASK}, "train": {"seed": 42}}


def test_log_records_mask_tokens_with_no_credential_in_the_environment(monkeypatch):
    for name in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    stream = io.StringIO()
    logger = logging.getLogger("ngdiff.test_secret_formats")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    install_log_redaction(logger)
    try:
        logger.warning("tags %s", [TOKENS["github classic"]])
    finally:
        logger.removeHandler(handler)
    assert TOKENS["github classic"] not in stream.getvalue() and MASK in stream.getvalue()
