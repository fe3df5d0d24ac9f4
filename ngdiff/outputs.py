"""The run's output folder: which run it holds, what ngdiff wrote there, and the guard that keeps runs apart.

ngdiff marks a folder as its run with `ngdiff-run.json`, written before anything else. The marker holds
what the run computes (its config with the output folder left out, local paths resolved, tokens masked),
a content hash of every local data file, and the entries ngdiff writes there. So a run is recognised by
what it computes, not by how its folder is spelled; `--overwrite` removes only what ngdiff wrote (and never
a model or file the new run reads); a resume on data whose rows changed is refused; and a run that failed
before its first step does not block the same command from starting again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ngdiff.checkpoint import checkpoint_root, latest_complete
from ngdiff.config import ConfigError, ExperimentConfig
from ngdiff.locks import LOCK_NAME
from ngdiff.run_folder import check_writable, write_atomically
from ngdiff.run_identity import data_fingerprints, input_paths, inside, resolved, run_record
from ngdiff.secret_formats import mask_values

log = logging.getLogger("ngdiff")

CONFIG_NAME = "config.yaml"
MARKER_NAME = "ngdiff-run.json"
MARKER_FORMAT = 1
# what ngdiff writes in a run folder: the run itself, its evaluations and best model, `ngdiff plot`'s picture,
# the W&B sink's files (launcher/wandb_sink.py) and `ngdiff slurm`'s script and logs (launcher/slurm.py)
RUN_ENTRIES = (
    MARKER_NAME,
    CONFIG_NAME,
    "metrics.jsonl",
    "summary.json",
    "checkpoints",
    "final",
    "best",
    "eval",
    "metrics.png",
    "wandb",
    "wandb_run_id",
    "slurm",
)
# entries whose presence means the run took at least one step (checkpoints and metrics are looked into)
STEP_ENTRIES = ("final", "summary.json", "best", "eval")
RESUME_HINT = "pass train.resume=auto to continue it or --overwrite to start again"
CHANGED_DATA_KEY = "train.resume_changed_data"


# --------------------------------------------------------------------------- what the folder holds


def read_marker(out: Path) -> dict[str, Any] | None:
    path = out / MARKER_NAME
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"output_dir {out}: {MARKER_NAME} cannot be read ({err}); move the folder aside") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("run"), dict):
        raise ConfigError(f"output_dir {out}: {MARKER_NAME} is not an ngdiff run marker; move the folder aside")
    return marker


def took_a_step(out: Path) -> bool:
    """Whether the run in `out` got as far as a step (logged one, checkpointed, evaluated or finished)."""
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return True
    return latest_complete(checkpoint_root(out)) is not None or any((out / name).exists() for name in STEP_ENTRIES)


def ngdiff_entries(marker: dict[str, Any] | None, own: Iterable[str]) -> list[str]:
    listed = marker.get("entries", []) if marker else []
    names = dict.fromkeys([*RUN_ENTRIES, *own, *(e for e in listed if isinstance(e, str))])
    return [n for n in names if n and "/" not in n and n not in (".", "..")]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs."""

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[f"{prefix}{key}"] = value
        return items

    before, after = flat(old), flat(new)
    absent = "(absent)"

    def show(value: Any) -> str:
        return absent if value is absent else json.dumps(value)

    return [
        f"{key}: {show(before.get(key, absent))} -> {show(after.get(key, absent))}"
        for key in dict.fromkeys([*before, *after])
        if before.get(key, absent) != after.get(key, absent)
    ]


def _summary(diffs: list[str], most: int = 6) -> str:
    more = f"; and {len(diffs) - most} more" if len(diffs) > most else ""
    return "; ".join(diffs[:most]) + more


# --------------------------------------------------------------------------- the guard


def check_output_dir(cfg: ExperimentConfig, overwrite: bool, again: str = RESUME_HINT, own: Iterable[str] = ()) -> None:
    """Raise unless `output_dir` is new, empty, ours to overwrite, or holds this same run: one that never took
    a step (it starts again) or one being resumed. Reads only (every rank calls it). `again` tells the refused
    command how to continue or redo the run (train's way by default); `own` names entries the command itself
    writes into the folder before reading them (the demo's data and models): removed with the run, and not
    an earlier run's files."""
    out = Path(cfg.output_dir)
    check_writable(out)
    if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):  # new, or only the run lock
        return
    marker = read_marker(out)
    if marker is None:
        _check_unmarked(cfg, out, overwrite)
        return
    if overwrite:
        check_inputs_survive(cfg, out, marker, own)
        return
    diffs = differences(marker["run"], run_record(cfg.to_dict(), out))
    if diffs:  # even before its first step: a submitted job that has not started yet reads this folder's config
        raise ConfigError(different_run_message(out, diffs))
    if not took_a_step(out):
        return  # this run failed (or has not begun) before its first step: it starts again
    if cfg.train.resume != "auto":
        raise ConfigError(f"output_dir {out} already holds this run; {again}")
    changed = changed_data(cfg, marker)
    if changed and not cfg.train.resume_changed_data:
        listed = "; ".join(f"{key} ({path}) sha256 {old[:12]}... -> {new[:12]}..." for key, path, old, new in changed)
        raise ConfigError(
            f"output_dir {out}: the data changed since this run started: {listed}; its checkpoints were trained on "
            f"the earlier rows. Restore the data, or pass {CHANGED_DATA_KEY}=true to resume on the new rows"
        )


def different_run_message(out: Path, diffs: list[str]) -> str:
    head = f"output_dir {out} holds a different run ({_summary(diffs)})"
    if latest_complete(checkpoint_root(out)) is not None:
        return (
            f"{head}; its checkpoints belong to that run: to continue it, give it the same values (its config is "
            f"{out / CONFIG_NAME}); to start this one, choose another output_dir"
        )
    return f"{head}; choose another output_dir, or pass --overwrite to replace what ngdiff wrote there"


def _check_unmarked(cfg: ExperimentConfig, out: Path, overwrite: bool) -> None:
    """A non-empty folder without the marker: nobody's run, or a run of an earlier ngdiff (config.yaml only),
    which may be resumed as it is but is never deleted."""
    previous = _legacy_config(out)
    if previous is None:
        raise ConfigError(
            f"output_dir {out} is not empty and holds no ngdiff run ({MARKER_NAME} missing); choose another folder "
            "(--overwrite only replaces an earlier ngdiff run)"
        )
    if overwrite:
        raise ConfigError(
            f"output_dir {out} holds a run of an earlier ngdiff version ({CONFIG_NAME} but no {MARKER_NAME}), so "
            "which of its files ngdiff wrote is not known; --overwrite removes nothing there. Move the files "
            "you want to keep and delete the folder yourself, or choose another output_dir"
        )
    diffs = differences(run_record(previous, out), run_record(cfg.to_dict(), out))
    if diffs:
        raise ConfigError(
            f"output_dir {out} holds a different run ({_summary(diffs)}), written by an earlier ngdiff version; "
            "choose another output_dir"
        )
    if cfg.train.resume != "auto":
        raise ConfigError(
            f"output_dir {out} already holds this run (written by an earlier ngdiff version); pass "
            "train.resume=auto to continue it, or choose another output_dir"
        )


def _legacy_config(out: Path) -> dict[str, Any] | None:
    saved = out / CONFIG_NAME
    if not saved.is_file():
        return None
    try:
        previous = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        return None
    ngdiff_like = isinstance(previous, dict) and isinstance(previous.get("model"), dict)
    return previous if ngdiff_like and isinstance(previous.get("train"), dict) else None


def check_inputs_survive(cfg: ExperimentConfig, out: Path, marker: dict[str, Any], own: Iterable[str]) -> None:
    """--overwrite must not delete what the new run reads (an earlier run's `final/` as model.path, ...)."""
    own = set(own)
    doomed = [(name, resolved(str(out / name))) for name in ngdiff_entries(marker, own) if name not in own]
    doomed = [(name, path) for name, path in doomed if os.path.lexists(out / name)]
    for key, path in input_paths(cfg):
        for name, entry in doomed:
            if inside(path, entry):
                raise ConfigError(
                    f"--overwrite would delete {out / name}, but {key} reads {path} from it; copy it out of "
                    "output_dir first, or choose another output_dir"
                )


def changed_data(cfg: ExperimentConfig, marker: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(key, path, recorded sha256, current sha256) of every local data file whose rows changed."""
    recorded = marker.get("data", {})
    changed = []
    for key, now in data_fingerprints(cfg).items():
        then = recorded.get(key, {})
        if "sha256" in then and "sha256" in now and then["sha256"] != now["sha256"]:
            changed.append((key, now["path"], then["sha256"], now["sha256"]))
    return changed


# --------------------------------------------------------------------------- writing


def write_output_dir(cfg: ExperimentConfig, overwrite: bool, own: Iterable[str] = ()) -> Path:
    """Rank 0 only, after `check_output_dir`: clear an earlier run if asked to (only what ngdiff wrote there),
    write the marker, then the effective config (tokens masked)."""
    out = Path(cfg.output_dir)
    own = tuple(own)
    try:
        marker = read_marker(out) if out.is_dir() else None
        if overwrite and marker is not None:
            remove_run(out, ngdiff_entries(marker, own))
            marker = None
        resumed = marker is not None and took_a_step(out)
        record = run_record(cfg.to_dict(), out)
        data = data_fingerprints(cfg)
        if resumed:
            record = marker["run"]
            _say_what_data_is_resumed_on(cfg, marker, data)
        elif marker is None and (out / CONFIG_NAME).is_file():
            log.info("output_dir %s: recording this run (its data as of now) in %s", out, MARKER_NAME)
        entries = list(dict.fromkeys([*(marker or {}).get("entries", []), *RUN_ENTRIES, *own]))
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"ngdiff_run": MARKER_FORMAT, "entries": entries, "run": record, "data": data}, indent=1)
        write_atomically(out / MARKER_NAME, text + "\n")
        config = yaml.safe_dump(mask_values(cfg.to_dict()), sort_keys=False)
        write_atomically(out / CONFIG_NAME, config)
    except OSError as err:
        raise ConfigError(
            f"output_dir {out}: cannot write there ({err.strerror or err}); choose another output_dir"
        ) from None
    return out


def _say_what_data_is_resumed_on(cfg: ExperimentConfig, marker: dict[str, Any], data: dict[str, Any]) -> None:
    for key, path, _old, _new in changed_data(cfg, marker):  # check_output_dir let them through: asked for
        log.warning(
            "resuming on changed data (%s=true): %s (%s) differs from the run's start", CHANGED_DATA_KEY, key, path
        )
    for key, item in data.items():
        if "hub" in item:
            log.info("%s is the hub dataset %s: its rows are not checked against the run's start", key, item["hub"])


def remove_run(out: Path, entries: Iterable[str]) -> None:
    """Delete the entries ngdiff wrote in `out`; anything else stays (and is named in the log), the run lock
    this run holds included (ngdiff.locks: deleting its file would let a second run lock a fresh one)."""
    entries = list(entries)
    for name in entries:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    kept = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if kept:
        log.info(
            "--overwrite removed the earlier run from %s and kept what ngdiff did not write: %s", out, ", ".join(kept)
        )
