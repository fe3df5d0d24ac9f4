"""The run's output folder: refuse to mix two different runs in one, write the effective config."""

from __future__ import annotations

from pathlib import Path

import yaml

from ngdiff.config import ConfigError, ExperimentConfig, dump_config
from ngdiff.locks import LOCK_NAME, clear_locked_folder

CONFIG_NAME = "config.yaml"
# keys that may change between a run and its resumption without making it a different run
RESUME_FREE = {
    ("train", "resume"),
    ("logging", "wandb"),
    ("logging", "progress"),
    ("logging", "run_name"),
    ("logging", "verbose"),
}


def _comparable(raw: dict) -> dict:
    return {
        section: (
            {k: v for k, v in values.items() if (section, k) not in RESUME_FREE} if isinstance(values, dict) else values
        )
        for section, values in raw.items()
    }


RESUME_HINT = "pass train.resume=auto to continue it or --overwrite to start again"


def check_output_dir(cfg: ExperimentConfig, overwrite: bool, again: str = RESUME_HINT) -> None:
    """Raise unless `output_dir` is new, empty, ours to overwrite, or the same run being resumed;
    `again` tells the refused command how to continue or redo the run (train's way by default)."""
    out = Path(cfg.output_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    if not any(p.name != LOCK_NAME for p in out.iterdir()):  # new, or only the run lock (ngdiff.locks)
        return
    saved = out / CONFIG_NAME
    if not saved.is_file():
        raise ConfigError(
            f"output_dir {out} is not empty and holds no ngdiff run ({CONFIG_NAME} missing); choose another folder "
            "(--overwrite only replaces an earlier ngdiff run)"
        )
    if overwrite:
        return
    previous = yaml.safe_load(saved.read_text()) or {}
    if _comparable(previous) != _comparable(cfg.to_dict()):
        raise ConfigError(
            f"output_dir {out} holds a different run (its {CONFIG_NAME} differs); "
            "choose another folder or pass --overwrite"
        )
    if cfg.train.resume != "auto":
        raise ConfigError(f"output_dir {out} already holds this run; {again}")


def write_output_dir(cfg: ExperimentConfig, overwrite: bool) -> Path:
    """Rank 0 only, after `check_output_dir`: clear an old run if asked to, write the effective config."""
    out = Path(cfg.output_dir)
    if overwrite and (out / CONFIG_NAME).is_file():  # check_output_dir made sure it is an ngdiff run
        clear_locked_folder(out)  # everything but the run lock, which this run holds
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(dump_config(cfg))
    return out
