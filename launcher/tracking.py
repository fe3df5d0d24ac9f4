"""Metric sinks beyond metrics.jsonl (W&B, built on rank 0 only), and what each rank says at start-up.

Called by every rank once its logging is set up: each rank masks credentials in its log handlers
and, inside a Slurm job, prints one line placing itself in the job (which node, which task, which
restart), so a multi-node log can be read without guessing.
"""

from __future__ import annotations

import logging

from launcher.secrets import install_log_redaction
from launcher.slurm_env import SlurmJob
from ngdiff.metrics_log import MetricsSink

log = logging.getLogger("ngdiff.start")


def build_sinks(cfg, ctx) -> list[MetricsSink]:
    install_log_redaction()
    job = SlurmJob.from_env()
    if job is not None:
        log.info("rank %d/%d: %s", ctx.rank, ctx.world_size, job.describe())
    if not ctx.is_main or not cfg.logging.wandb:
        return []
    from launcher.wandb_sink import WandbSink

    return [WandbSink(cfg, job=job)]
