"""Credentials stay in the environment: never in logs, config dumps, sbatch scripts or W&B.

Jobs get their keys the way Slurm and containers pass them anyway (the submitting environment is
exported to the job), so nothing we write needs a key's value. These helpers find the values of
credential-like variables and scrub them from any text before it is written or logged, together with
anything shaped like a known token (`ngdiff.secret_formats`: a key pasted into a config value).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from ngdiff.secret_formats import MASK, mask_token_formats

# names whose values are credentials (exact names, then patterns)
SECRET_NAMES = frozenset(
    {
        "WANDB_API_KEY",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HUGGINGFACE_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "GITHUB_TOKEN",
        "OPENAI_API_KEY",
        "NGC_API_KEY",
    }
)
SECRET_PATTERN = re.compile(r"(^|_)(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)($|_)", re.IGNORECASE)
MIN_LENGTH = 6  # shorter values ("1", "true") would mask ordinary text


def is_secret_name(name: str) -> bool:
    return name in SECRET_NAMES or bool(SECRET_PATTERN.search(name))


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of credential-like variables, longest first (so a key containing another is masked whole)."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` without the environment's credential values and without token-shaped strings."""
    for value in secret_values(env):
        text = text.replace(value, MASK)
    return mask_token_formats(text)


def find_secrets(value: Any, env: Mapping[str, str] | None = None, path: str = "") -> list[str]:
    """Dotted keys of a nested config whose string values hold a credential's value."""
    secrets = secret_values(env)
    found: list[str] = []

    def walk(item: Any, where: str) -> None:
        if isinstance(item, dict):
            for key, child in item.items():
                walk(child, f"{where}.{key}" if where else str(key))
        elif isinstance(item, (list, tuple)):
            for child in item:
                walk(child, where)
        elif isinstance(item, str) and any(s in item for s in secrets):
            found.append(where)

    walk(value, path)
    return found


class RedactingFilter(logging.Filter):
    """Masks credentials in every record that passes a handler (message and arguments, formatted once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of `logger` (root by default); safe to call twice."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
