"""Read an offline W&B run back from its `.wandb` file, to check what a run really logged.

wandb 0.31 ships no Python reader for its transaction log, so this follows its documented layout:
a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then 32 KiB blocks of LevelDB-log records
(4-byte checksum, 2-byte length, 1-byte type: full / first / middle / last), each payload one
`wandb_internal_pb2.Record` protobuf, parsed with wandb's own message classes.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_payloads(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    out: list[bytes] = []
    pos, pending = len(HEADER), b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")
    return out


@dataclass
class OfflineRun:
    run_id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> OfflineRun:
    """Run metadata, config, every history row (with `_step`), summary and exit code of a `.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = OfflineRun()
    for payload in read_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.group, run.project = r.run_id, r.display_name, r.run_group, r.project
            run.tags = list(r.tags)
            for item in r.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def find_run_files(root: Path) -> list[Path]:
    return sorted(Path(root).glob("**/offline-run-*/run-*.wandb"))


def read_finished_run(root: Path, timeout: float = 60.0) -> OfflineRun:
    """The one run under `root`, once its exit record is on disk.

    `run.finish()` returns when wandb's service has the run's records, not when they are flushed
    to the file, so a reader in the same process polls briefly."""
    deadline = time.monotonic() + timeout
    while True:
        files = find_run_files(root)
        if len(files) > 1:
            raise AssertionError(f"expected one W&B run under {root}, found {files}")
        run = read_run(files[0]) if files else None
        if run is not None and run.exit_code is not None:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished W&B run under {root} after {timeout:.0f} s (files: {files})")
        time.sleep(0.2)
