"""Metric sinks beyond metrics.jsonl (W&B), built on rank 0 only."""

from __future__ import annotations

from ngdiff.metrics_log import MetricsSink


def build_sinks(cfg, ctx) -> list[MetricsSink]:
    if not ctx.is_main or not cfg.logging.wandb:
        return []
    from launcher.wandb_sink import WandbSink

    return [WandbSink(cfg)]
