"""Periodic evaluation inside a training run (all ranks take part; rank 0 gets the numbers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def evaluation_factory(cfg) -> Callable[[Any, Any], Callable[[int], dict[str, Any]]] | None:
    """None when the config asks for no evaluation during training."""
    if cfg.eval.benchmark == "none":
        return None
    raise NotImplementedError("evaluation during training arrives with the evaluation module")
