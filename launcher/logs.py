"""Readable logs: one format, rank-tagged; only rank 0 speaks at INFO unless asked otherwise."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(rank: int = 0, verbose: bool = False) -> None:
    level = logging.INFO if rank == 0 or verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("datasets", "transformers", "urllib3", "filelock", "httpx", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
