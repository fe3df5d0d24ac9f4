"""Records that are both forget and retain data: the run pushes them down and up at once.

A forget set copied into the retain set (or a retain split that still holds the forget authors) is a
common slip that no loss curve reveals; one warning per pair of files, with the count, makes it visible.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ngdiff.data.records import load_records

if TYPE_CHECKING:
    from ngdiff.config import DataConfig

log = logging.getLogger("ngdiff.data")


def record_keys(data_cfg: DataConfig) -> tuple[str, ...]:
    """The fields that make two records the same: (question, answer), or the text."""
    if data_cfg.format == "tofu":
        return data_cfg.question_key, data_cfg.answer_key
    return (data_cfg.text_key,)


def shared_records(forget: list[dict[str, Any]], retain: list[dict[str, Any]], keys: tuple[str, ...]) -> int:
    """How many forget records also appear, field for field on `keys`, among the retain records."""
    retained = {tuple(row[k] for k in keys) for row in retain}
    return sum(1 for row in forget if tuple(row[k] for k in keys) in retained)


def warn_about_overlap(data_cfg: DataConfig) -> dict[tuple[str, str], int]:
    """Log a warning for each (forget, retain) pair of files sharing records; returns the nonzero counts."""
    keys = record_keys(data_cfg)
    retain_rows = {source: load_records(source, keys, "data.retain") for source in data_cfg.retain}
    found = {}
    for forget_source in data_cfg.forget:
        forget_rows = load_records(forget_source, keys, "data.forget")
        for retain_source, rows in retain_rows.items():
            count = shared_records(forget_rows, rows, keys)
            if count:
                found[forget_source, retain_source] = count
                log.warning(
                    "%d of the %d records of data.forget %s also appear in data.retain %s (same %s): "
                    "the run both forgets and retains them",
                    count,
                    len(forget_rows),
                    forget_source,
                    retain_source,
                    " and ".join(keys),
                )
    return found
