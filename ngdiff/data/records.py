"""Reading records (local JSON/JSONL files, or hub datasets through `datasets`), checked early.

Local files are parsed here rather than by `datasets`, so that an error can name the line of the record
at fault and tell a missing field from a null, empty or non-string one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ngdiff.errors import UserError


class DataError(UserError):
    """Unusable data: the message names the file (or dataset) and what is wrong."""


def looks_like_local_path(value: str) -> bool:
    """A file path rather than a hub dataset name."""
    return value.startswith((".", "/", "~")) or value.endswith((".json", ".jsonl")) or Path(value).exists()


def load_records(source: str, required: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """All rows of `source` as dicts; each must hold every field in `required` as a non-empty string.

    `source` is a local .json/.jsonl file or a hub dataset: `name`, `name:config` or `name:config:split`
    (split `train` by default), e.g. `locuslab/TOFU:forget10` or `muse-bench/MUSE-News:raw:forget`.
    Errors name a local record by its file line (JSONL) or, like a hub record, by its 1-based number.
    """
    if looks_like_local_path(source):
        placed = read_local_records(source, what)
    else:
        placed = [(f"record {index + 1}", row) for index, row in enumerate(load_hub_records(source, what))]
    if not placed:
        raise DataError(f"{what}: {source} holds no records (an empty set cannot be trained on)")
    for where, row in placed:
        problem = record_problem(row, required)
        if problem:
            raise DataError(f"{what}: {where} of {source} {problem}")
    return [row for _, row in placed]


def record_problem(row: Any, required: tuple[str, ...]) -> str:
    """What keeps `row` from being trained on (a missing, null, empty or non-string field), or ''."""
    if not isinstance(row, dict):
        return f"is a JSON {json_type(row)}, not an object with fields {', '.join(required)}"
    for key in required:
        if key not in row:
            return f"lacks field {key} (it has: {', '.join(map(str, row)) or 'nothing'})"
        value = row[key]
        if value is None:
            return f"has field {key} set to null; give it a string"
        if not isinstance(value, str):
            return f"has field {key} as a JSON {json_type(value)} ({json.dumps(value)[:60]}); it must be a string"
        if not value.strip():
            return f"has field {key} empty"
    return ""


def json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_local_records(source: str, what: str) -> list[tuple[str, Any]]:
    """(where, record) of a local JSON array of objects or JSONL file; `where` names its line or number."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{what}: data file not found: {source}")
    text = read_utf8(path, f"{what}: {source}")
    if text.lstrip().startswith("["):  # one JSON array of records
        try:
            return numbered(json.loads(text))
        except json.JSONDecodeError as err:
            raise DataError(f"{what}: cannot read {source} as a JSON array: {err}") from None
    placed = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            placed.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            whole = json_object(text)  # one pretty-printed object: a record, or columns as `datasets` reads them
            if whole is None:
                raise DataError(f"{what}: cannot read {source} as JSON or JSONL: line {number}: {err.msg}") from None
            return whole
    return placed


def numbered(rows: list[Any]) -> list[tuple[str, Any]]:
    return [(f"record {index + 1}", row) for index, row in enumerate(rows)]


def json_object(text: str) -> list[tuple[str, Any]] | None:
    """The records of a file holding one JSON object: its columns' rows if every value is a list of one
    length (`{"question": [...], "answer": [...]}`), else the object itself; None if it is no object."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(whole, dict):
        return None
    columns = list(whole.values())
    if columns and all(isinstance(c, list) for c in columns) and len({len(c) for c in columns}) == 1:
        return numbered([dict(zip(whole, values, strict=True)) for values in zip(*columns, strict=True)])
    return numbered([whole])


def load_hub_records(source: str, what: str) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    name, config, split = [*source.split(":"), "", ""][:3]
    try:
        return datasets.load_dataset(name, config or None, split=split or "train").to_list()
    except Exception as err:  # offline, unknown name, gated: say which source failed
        raise DataError(f"{what}: cannot load hub dataset {source!r}: {err}") from err


def read_utf8(path: Path, what: str) -> str:
    """The file's text; a file in another encoding is one error naming the first bad byte's line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{what} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it as UTF-8"
        ) from None


def load_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a plain text file (the refusal sentences of `idontknow.jsonl`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    return [line.strip() for line in read_utf8(path, str(path)).splitlines() if line.strip()]
