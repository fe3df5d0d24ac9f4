"""Data for the two tasks: records -> token ids with labels -> cycled global-batch streams."""

from __future__ import annotations

import random

from ngdiff import TOFU_DIR
from ngdiff.data.loader import TaskStream, collate
from ngdiff.data.records import DataError, load_lines, load_records
from ngdiff.data.tokenize import Encoded, encode_qa, encode_text, prompt_ids

__all__ = [
    "DataError",
    "Encoded",
    "TaskStream",
    "collate",
    "encode_task",
    "load_lines",
    "load_records",
    "prompt_ids",
]


def encode_task(data_cfg, tokenizer, source: str, what: str, refusals_from: str | None = None) -> list[Encoded]:
    """Read and tokenize one task's set; fail early on empty sets and on a `max_length` too short.

    `refusals_from`: replace every answer with a refusal sentence from that file (IdkNLL).
    """
    if data_cfg.format == "tofu":
        q, a = data_cfg.question_key, data_cfg.answer_key
        rows = load_records(source, (q, a), what)
        answers = [row[a] for row in rows]
        if refusals_from is not None:
            refusals = load_lines(refusals_from or TOFU_DIR / "idontknow.jsonl")
            rng = random.Random(0)
            answers = [rng.choice(refusals) for _ in rows]
        encoded = [
            encode_qa(tokenizer, row[q], ans, data_cfg.max_length) for row, ans in zip(rows, answers, strict=True)
        ]
    else:
        rows = load_records(source, (data_cfg.text_key,), what)
        encoded = [encode_text(tokenizer, row[data_cfg.text_key], data_cfg.max_length) for row in rows]
    for index, example in enumerate(encoded):
        if example.answer_tokens == 0:
            raise DataError(
                f"{what}: data.max_length={data_cfg.max_length} leaves record {index} of {source} "
                "without a single token to train on; raise data.max_length"
            )
    return encoded
