"""Credentials recognised by their form (Hugging Face, W&B, GitHub, OpenAI, AWS keys), not by a variable's name.

A token pasted into a config value (a W&B tag, a run name) never passes through the environment, so the
environment-based masking in `launcher/secrets.py` cannot know it. These patterns are specific (a fixed
prefix and a long random tail) so that ordinary text, paths and numbers are left alone. `launcher/`
reuses them; `ngdiff/` writes `config.yaml` with them.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
TOKEN_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),  # Hugging Face user access token
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}"),  # GitHub classic and app tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,}"),  # GitHub fine-grained token
    re.compile(r"\bsk-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{20,}"),  # OpenAI key (sk-..., sk-proj-...)
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
)
# a W&B API key is 40 hex digits, the form of a git commit id too: masked only where it stands as a value
# (the whole value, or right after `=` on a command line), never inside running text
WANDB_KEY = re.compile(r"[0-9a-f]{40}")
WANDB_KEY_AFTER_EQUALS = re.compile(r"(?<==)[0-9a-f]{40}(?![0-9A-Za-z])")


def mask_token_formats(text: str) -> str:
    """`text` with every token-shaped substring replaced by MASK."""
    if WANDB_KEY.fullmatch(text.strip()):
        return MASK
    for pattern in (*TOKEN_PATTERNS, WANDB_KEY_AFTER_EQUALS):
        text = pattern.sub(MASK, text)
    return text


def mask_values(value: Any) -> Any:
    """A nested config (dicts, lists, strings) with token-shaped strings masked; other values unchanged."""
    if isinstance(value, dict):
        return {key: mask_values(child) for key, child in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_values(child) for child in value]
    return mask_token_formats(value) if isinstance(value, str) else value
