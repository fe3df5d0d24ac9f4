"""Reading records (local JSON/JSONL files or hub datasets) through `datasets`, checked early."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ngdiff.errors import UserError


class DataError(UserError):
    """Unusable data: the message names the file (or dataset) and what is wrong."""


def looks_like_local_path(value: str) -> bool:
    """A file path rather than a hub dataset name."""
    return value.startswith((".", "/", "~")) or value.endswith((".json", ".jsonl")) or Path(value).exists()


def load_records(source: str, required: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """All rows of `source` as dicts; each must hold every field in `required`.

    `source` is a local .json/.jsonl file or a hub dataset: `name`, `name:config` or `name:config:split`
    (split `train` by default), e.g. `locuslab/TOFU:forget10` or `muse-bench/MUSE-News:raw:forget`.
    """
    import datasets

    datasets.disable_progress_bars()
    if looks_like_local_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"{what}: data file not found: {source}")
        if not path.read_text().strip():
            raise DataError(f"{what}: {source} holds no records (an empty set cannot be trained on)")
        try:
            dataset = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as err:  # datasets wraps JSON errors in several types
            raise DataError(f"{what}: cannot read {source} as JSON or JSONL: {err}") from err
    else:
        name, config, split = [*source.split(":"), "", ""][:3]
        try:
            dataset = datasets.load_dataset(name, config or None, split=split or "train")
        except Exception as err:  # offline, unknown name, gated: say which source failed
            raise DataError(f"{what}: cannot load hub dataset {source!r}: {err}") from err
    rows = dataset.to_list()
    if not rows:
        raise DataError(f"{what}: {source} holds no records (an empty set cannot be trained on)")
    for index, row in enumerate(rows):
        missing = [key for key in required if row.get(key) in (None, "")]
        if missing:
            raise DataError(
                f"{what}: record {index} of {source} lacks field(s) {', '.join(missing)} "
                f"(it has: {', '.join(sorted(row)) or 'nothing'})"
            )
    return rows


def load_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a plain text file (the refusal sentences of `idontknow.jsonl`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
