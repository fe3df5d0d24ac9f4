"""What a run computes, independent of where its folder lies: the identity `ngdiff-run.json` records.

Two runs are the same run when their configs agree once the output folder and the keys a resume may
change are left out, every local path is spelled one way (absolute and resolved, or relative to the run
folder when inside it) and token-shaped values are masked. Data files are fingerprinted by content, so a
resume notices rows that changed under the same path; `input_paths` lists what a run reads, so that
`--overwrite` never deletes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ngdiff.config import ExperimentConfig
from ngdiff.secret_formats import mask_values

OUTPUT_PLACEHOLDER = "<output_dir>"
# keys that may change between a run and its resumption without making it a different run
RESUME_FREE = {
    ("train", "resume"),
    ("train", "resume_changed_data"),
    ("logging", "wandb"),
    ("logging", "progress"),
    ("logging", "run_name"),
    ("logging", "verbose"),
}
# keys naming files or folders the run reads (compared resolved; checked against what --overwrite removes)
PATH_KEYS = (
    ("model", "path"),
    ("model", "reference_path"),
    ("data", "forget"),
    ("data", "retain"),
    ("data", "idk"),
    ("parallel", "deepspeed_config"),
    ("eval", "data_dir"),
    ("eval", "reference"),
)
DATA_KEYS = ("forget", "retain", "idk")


def resolved(value: str) -> Path:
    return Path(os.path.abspath(Path(value).expanduser())).resolve()


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def looks_local(value: str) -> bool:
    """A filesystem path rather than a hub name (`name`, `namespace/name` or `name:split`)."""
    return value.startswith((".", "/", "~")) or value.endswith((".json", ".jsonl")) or Path(value).expanduser().exists()


def normal_path(value: str, out: Path) -> str:
    """One spelling per file: absolute and resolved, or relative to the output folder when inside it (so the
    demo's own data and model compare equal after the folder moved); hub names stay as they are."""
    if not value:
        return value
    path = resolved(value)
    if inside(path, resolved(str(out))):
        return str(Path(OUTPUT_PLACEHOLDER) / path.relative_to(resolved(str(out))))
    return str(path) if looks_local(value) else value


def run_record(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    """What the run computes: its config, tokens masked, without the output folder and the keys a resume may
    change, with every path in one spelling."""
    record: dict[str, Any] = {}
    for section, values in mask_values(raw).items():
        if section == "output_dir":
            continue
        if not isinstance(values, dict):
            record[section] = values
            continue
        kept = {}
        for key, value in values.items():
            if (section, key) in RESUME_FREE:
                continue
            if (section, key) in PATH_KEYS:
                value = [normal_path(v, out) for v in value] if isinstance(value, list) else normal_path(value, out)
            kept[key] = value
        record[section] = kept
    return record


def data_files(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(config key, value) of every data source the run reads."""
    files = []
    for key in DATA_KEYS:
        values = getattr(cfg.data, key)
        values = (values,) if isinstance(values, str) else values
        for index, value in enumerate(v for v in values if v):
            files.append((f"data.{key}" if len(values) == 1 else f"data.{key}[{index}]", value))
    return files


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprints(cfg: ExperimentConfig) -> dict[str, dict[str, str]]:
    """Per data key: a local file's path and sha256, or a hub dataset's name (its rows are not hashed)."""
    prints: dict[str, dict[str, str]] = {}
    for key, value in data_files(cfg):
        path = Path(value).expanduser()
        if path.is_file():
            prints[key] = {"path": str(resolved(value)), "sha256": file_hash(path)}
        elif not looks_local(value):
            prints[key] = {"hub": value, "note": "a hub dataset: its name is recorded, its rows are not hashed"}
    return prints


def input_paths(cfg: ExperimentConfig) -> list[tuple[str, Path]]:
    """(config key, resolved path) of every local file or folder the run reads, a LoRA adapter's base included."""
    found: list[tuple[str, Path]] = []
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        values = (value,) if isinstance(value, str) else value
        for item in values:
            if item and looks_local(item):
                found.append((f"{section}.{key}", resolved(item)))
    for key, path in list(found):
        adapter = path / "adapter_config.json"
        if key.startswith("model.") and adapter.is_file():
            try:
                base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
            except (OSError, ValueError):
                base = ""
            if base and looks_local(base):
                found.append((f"{key} (its adapter's base model)", resolved(base)))
    return found
