"""A MUSE sequence's cells (`eval.benchmark=muse`, text forget sets): each set scored by MUSE's own metric.

MUSE's sustainability protocol (github.com/jaechan-repo/muse_bench: `baselines/scripts/unlearn_bbc_sust.sh`
unlearns the folds `sust/forget_{2,3,4}` one after another from the fold-1 model; `knowmem/scripts/
get_utility_scal_sust.py` scores each fold's model) measures utility only: KnowMem on the retain QA
(`knowmem/retain2_qa.json` with its `_icl` examples, 32 new tokens). That is each row's retain cell here,
from `eval.data_dir`'s MUSE files (the bundled ones when empty). The forget cells go further than MUSE:
forget set j on request i's model is VerbMem (MUSE's `verbmem/get_rouge.py`: greedy continuation of 128
tokens, ROUGE-L F1 against the ground truth, mean x 100) on prompts cut from set j's own texts, the first
`sequence.verbmem_prompt_words` words of each (as ngdiff.study.muse_world cuts the world's VerbMem prompts),
because MUSE has no VerbMem prompts for folds 2-4 and a matrix of one utility number per row would not say
whether an earlier fold came back. `eval.max_items` caps both (the first N texts, the first N questions).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ngdiff import MUSE_DIR
from ngdiff.config import ConfigError, ExperimentConfig
from ngdiff.data import load_records
from ngdiff.eval.muse import MUSE_FILES, knowmem_items, load_muse, muse_aggregate, verbmem_items, verbmem_row
from ngdiff.eval.sharding import ONE_PROCESS, EvalDist

FORGET_METRIC = "forget_verbmem"  # a matrix metric: the forget cells' keys start with forget_
RETAIN_METRIC = "retain_knowmem"
RETAIN_SET = "retain"  # the one retain cell's name: its metric reads back as retain_knowmem


def knowmem_file(cfg: ExperimentConfig) -> Path:
    """The retain QA the utility cell asks (eval.data_dir's MUSE files, the bundled ones when empty)."""
    return Path(cfg.eval.data_dir or MUSE_DIR) / MUSE_FILES["knowmem_retain"]


def verbmem_prompts(cfg: ExperimentConfig, source: str | Path) -> list[dict[str, str]]:
    """VerbMem items cut from the set's texts (`data.text_key`, the first `eval.max_items`), each text's
    first `sequence.verbmem_prompt_words` words as the prompt. A text too short to leave a continuation is
    refused: its ground truth would be empty and its ROUGE-L undefined."""
    words = cfg.sequence.verbmem_prompt_words
    rows = load_records(str(source), (cfg.data.text_key,), "sequence forget set")
    texts = [r[cfg.data.text_key] for r in rows]
    if cfg.eval.max_items > 0:
        texts = texts[: cfg.eval.max_items]
    for index, text in enumerate(texts, start=1):
        count = len(re.findall(r"\S+", text))
        if count <= words:
            raise ConfigError(
                f"{source}: text {index} has {count} words, none left to continue after the "
                f"{words}-word VerbMem prompt; lower sequence.verbmem_prompt_words or drop the text"
            )
    return [verbmem_row(text, words) for text in texts]


def check_muse_cells(cfg: ExperimentConfig) -> None:
    """Everything the cells will read, read now: every set's prompts, the retain QA and its examples."""
    for source in cfg.data.forget:
        verbmem_prompts(cfg, source)
    for key in ("knowmem_retain", "knowmem_retain_icl"):
        load_muse(key, cfg.eval.data_dir or None)


def score_muse_cell(
    model, tokenizer, cfg: ExperimentConfig, role: str, source: Path, ed: EvalDist = ONE_PROCESS
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """(items, metrics) of one cell: VerbMem of a forget set, or KnowMem on the retain QA."""
    batch, data_dir = cfg.eval.batch_size, cfg.eval.data_dir or None
    if role == "forget":
        items = {"verbmem_f": verbmem_items(model, tokenizer, verbmem_prompts(cfg, source), batch_size=batch, ed=ed)}
        return items, {FORGET_METRIC: muse_aggregate(items)["verbmem_f"]}
    qa = load_muse("knowmem_retain", data_dir, cfg.eval.max_items)
    icl = load_muse("knowmem_retain_icl", data_dir)
    items = {"knowmem_r": knowmem_items(model, tokenizer, qa, icl, batch_size=batch, ed=ed)}
    return items, {RETAIN_METRIC: muse_aggregate(items)["knowmem_r"]}
