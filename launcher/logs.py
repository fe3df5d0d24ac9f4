"""Readable logs: one format, rank-tagged; only rank 0 speaks at INFO unless asked otherwise.

Quiet by default: the libraries' own INFO lines and transformers' per-load/per-save bars ("Loading
weights", "Writing model shards") say nothing a user acts on, and they bury ngdiff's phase messages.
`--verbose` (or `logging.verbose=true`) brings them back, with INFO from every rank. The start-up
lines (which rank runs where: `ngdiff.start`) are INFO too, and come from every rank: a multi-rank
log says where each process landed without a flag.
"""

from __future__ import annotations

import logging
import os
import sys

START_LOGGER = "ngdiff.start"  # one line per rank at start-up, INFO on every rank
COMPAT_LOGGER = "ngdiff.compat"  # parallel.compat (not imported here: it is cheap, but logs stay light)
NOISY_LOGGERS = ("datasets", "urllib3", "filelock", "httpx", "DeepSpeed", "absl", "accelerate")


def setup_logging(rank: int = 0, verbose: bool = False) -> None:
    level = logging.INFO if rank == 0 or verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger(START_LOGGER).setLevel(logging.INFO)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    # the library internals a run patches (parallel.compat), listed once at start-up at DEBUG
    logging.getLogger(COMPAT_LOGGER).setLevel(logging.DEBUG if verbose else logging.NOTSET)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries(verbose)


def quiet_libraries(verbose: bool = False) -> None:
    """transformers' progress bars and INFO off (errors only) unless `verbose`; hub download bars stay on
    (a multi-GB download deserves one); `datasets` reads its switch from the environment at import."""
    import huggingface_hub.utils
    import transformers.utils.logging as hf_logging

    if verbose:
        hf_logging.set_verbosity_warning()  # transformers' own default
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()  # transformers' switch turns the hub's off too
    if "datasets" in sys.modules:
        import datasets.utils.logging as ds_logging

        (ds_logging.enable_progress_bar if verbose else ds_logging.disable_progress_bar)()
    elif not verbose:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
