"""Weights & Biases as a metrics sink (rank 0 only): step metrics, AutoLR fits, evaluation tables.

W&B is an observer, never a dependency of the run: without an API key or network it logs offline
(`wandb sync` uploads later) and says so once; any W&B error disables the sink with one warning
and training goes on. Credentials stay in the environment: the logged config is scrubbed.

Keys: step metrics go under `train/` (losses, gradient norms, cos(g_R, g_F), combiner weights, lr),
AutoLR's probe and fit under `autolr/`, evaluation numbers under `eval/`, per-item evaluation
results as `wandb.Table`s, and every forget/retain pair of evaluation numbers as a trade-off chart
(`tradeoff/<metric>`, one point per evaluation). At the end the training losses get one too.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import socket
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from launcher.secrets import redact
from launcher.slurm_env import SlurmJob
from ngdiff.metrics_log import is_step_metric

log = logging.getLogger("ngdiff.wandb")

KEPT_PREFIXES = ("train/", "eval/", "autolr/", "tradeoff/")
RUN_ID_FILE = "wandb_run_id"


def api_endpoint(env: Mapping[str, str]) -> tuple[str, int]:
    """(host, port) of the W&B server: api.wandb.ai or a self-hosted WANDB_BASE_URL."""
    url = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def has_api_key(env: Mapping[str, str]) -> bool:
    """A key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if env.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(api_endpoint(env)[0]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def choose_mode(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(W&B mode, why): the user's WANDB_MODE wins; no key or no network means offline."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"], f"WANDB_MODE={env['WANDB_MODE']}"
    if not has_api_key(env):
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    host, port = api_endpoint(env)
    if not reachable(host, port):
        return "offline", f"{host} is not reachable"
    return "online", "API key found and server reachable"


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return redact(value) if isinstance(value, str) else value


@contextmanager
def masked_argv() -> Iterator[None]:
    """W&B records the command line (sys.argv) with the run: credentials on it are masked first."""
    saved = sys.argv
    sys.argv = [redact(arg) for arg in saved]
    try:
        yield
    finally:
        sys.argv = saved


def _key(name: str) -> str:
    """Panel section of a top-level metric: train/ for step metrics, kept prefixes, else eval/."""
    if name.startswith(KEPT_PREFIXES):
        return name
    return f"train/{name}" if is_step_metric(name) else f"eval/{name}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Top-level names get their section (`_key`); nested dicts become `section/name/sub` keys."""
    flat: dict[str, Any] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}" if prefix else _key(str(name))
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{key}/"))
        else:
            flat[key] = value
    return flat


class WandbSink:
    """`log(metrics, step)` / `finish()`, like every sink; built by `tracking.build_sinks` on rank 0."""

    def __init__(self, cfg, job: SlurmJob | None = None, env: Mapping[str, str] | None = None):
        self.cfg = cfg
        self.job = job if job is not None else SlurmJob.from_env()
        self.run = None
        self.mode = "disabled"
        self.last_step = 0
        self._losses: list[tuple[int, float, float]] = []  # (step, forget, retain) for the final chart
        self._tradeoff: dict[str, list[tuple[int, float, float]]] = {}
        try:
            self._start(os.environ if env is None else env)
        except Exception as err:  # W&B must never stop training
            log.warning("W&B disabled: could not start a run (%s: %s)", type(err).__name__, redact(str(err)))
            self.run = None

    # ------------------------------------------------------------------ start-up
    def run_id(self) -> str:
        """One W&B run per output folder, across requeues and resubmissions (kept in the folder)."""
        path = Path(self.cfg.output_dir) / RUN_ID_FILE
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
        return run_id

    def init_kwargs(self, mode: str) -> dict[str, Any]:
        lc = self.cfg.logging
        config = _scrub(self.cfg.to_dict())
        if self.job is not None:
            config["slurm"] = self.job.as_config()
        return {
            "project": lc.project or "ngdiff",
            "entity": lc.entity or None,
            "name": _scrub(lc.run_name or (self.job.run_name if self.job else None)),
            "group": _scrub(lc.group or (self.job.group if self.job else None)),
            "tags": [redact(tag) for tag in lc.tags],
            "config": config,
            "dir": str(Path(self.cfg.output_dir)),
            "id": self.run_id(),
            "resume": "allow",
            "mode": mode,
            "settings": {"silent": True, "init_timeout": 60},  # we say offline/online ourselves, once
        }

    def _start(self, env: Mapping[str, str]) -> None:
        import wandb

        mode, why = choose_mode(env)
        if mode == "disabled":
            log.warning("W&B disabled (%s)", why)
            return
        try:
            with masked_argv():
                self.run = wandb.init(**self.init_kwargs(mode))
        except Exception as err:
            if mode == "offline":
                raise
            log.warning("W&B online start failed (%s); retrying offline", redact(str(err)))
            mode, why = "offline", f"online start failed: {type(err).__name__}"
            with masked_argv():
                self.run = wandb.init(**self.init_kwargs(mode))
        self.mode = mode
        if mode == "offline":
            log.warning(
                "W&B offline: %s; run files in %s; upload later with `wandb sync %s`",
                why,
                self.run.dir and Path(self.run.dir).parent,
                self.run.dir and Path(self.run.dir).parent,
            )
        else:
            log.info("W&B run %s: %s", self.run.name, self.run.url)

    # ------------------------------------------------------------------ logging
    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self._log(metrics, step)
        except Exception as err:
            self._give_up("log", err)

    def _log(self, metrics: dict[str, Any], step: int) -> None:
        import wandb

        payload: dict[str, Any] = {}
        evaluation: dict[str, float] = {}
        for key, value in _flatten(metrics).items():
            if _is_number(value) or isinstance(value, bool):
                payload[key] = value
                if key.startswith("eval/") and _is_number(value) and math.isfinite(value):
                    evaluation[key] = float(value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(r, Mapping) for r in value):
                columns = list(dict.fromkeys(c for row in value for c in row))
                rows = [[_cell(row.get(c)) for c in columns] for row in value]
                payload[key] = wandb.Table(columns=columns, data=rows)
            elif isinstance(value, str):
                self.run.summary[key] = redact(value)
        if "loss_forget" in metrics and "loss_retain" in metrics:
            self._losses.append((step, float(metrics["loss_forget"]), float(metrics["loss_retain"])))
        payload.update(self._tradeoff_charts(evaluation, step))
        if payload:
            self.run.log(payload, step=max(step, self.last_step))
            self.last_step = max(step, self.last_step)

    def _tradeoff_charts(self, evaluation: dict[str, float], step: int) -> dict[str, Any]:
        """One forget-vs-retain scatter per metric that exists for both (e.g. ROUGE-L recall)."""
        import wandb

        charts = {}
        for key, forget in evaluation.items():
            leaf = key.rsplit("/", 1)[-1]
            if "forget" not in leaf:
                continue
            partner = key[: len(key) - len(leaf)] + leaf.replace("forget", "retain")
            if partner not in evaluation:
                continue
            metric = leaf.replace("forget", "").strip("_") or "value"
            points = self._tradeoff.setdefault(metric, [])
            points.append((step, forget, evaluation[partner]))
            table = wandb.Table(columns=["step", f"forget {metric}", f"retain {metric}"], data=points)
            charts[f"tradeoff/{metric}"] = wandb.plot.scatter(
                table, f"forget {metric}", f"retain {metric}", title=f"forget vs retain: {metric}"
            )
        return charts

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            import wandb

            if self._losses:
                table = wandb.Table(columns=["step", "loss_forget", "loss_retain"], data=self._losses)
                chart = wandb.plot.scatter(table, "loss_forget", "loss_retain", title="forget vs retain: loss")
                self.run.log({"tradeoff/loss": chart}, step=self.last_step)
            self.run.finish()
        except Exception as err:
            self._give_up("finish", err)
        self.run = None

    def _give_up(self, action: str, err: Exception) -> None:
        log.warning(
            "W&B %s failed (%s: %s); training continues without W&B", action, type(err).__name__, redact(str(err))
        )
        run, self.run = self.run, None
        try:
            if run is not None:
                run.finish(exit_code=1)
        except Exception:  # already broken; nothing more to report
            pass


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str, bool)):
        return redact(value) if isinstance(value, str) else value
    return redact(str(value))
