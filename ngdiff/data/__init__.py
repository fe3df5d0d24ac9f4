"""Data for the two tasks: records -> token ids with labels -> cycled global-batch streams."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ngdiff import TOFU_DIR
from ngdiff.data.loader import TaskStream, collate
from ngdiff.data.records import DataError, load_lines, load_records
from ngdiff.data.tokenize import Encoded, encode_qa, encode_text, prompt_ids

if TYPE_CHECKING:
    from ngdiff.config import DataConfig

__all__ = [
    "DataError",
    "DrawnRefusals",
    "Encoded",
    "TaskStream",
    "collate",
    "encode_task",
    "load_lines",
    "load_records",
    "prompt_ids",
]


class DrawnRefusals(Sequence[Encoded]):
    """The forget questions, each answered by a refusal drawn afresh at every access (IdkNLL).

    TOFU's TextDatasetQA (data_module.py, `loss_type == "idk"`) draws a random `idontknow.jsonl` line in
    each `__getitem__`; here the draw depends on (seed, epoch, index) only, so every rank and a resumed
    run draw the same refusal for the same access. `draw` is what `TaskStream` calls; indexing gives
    epoch 0's draw.
    """

    def __init__(
        self,
        encode: Callable[[str, str], Encoded],
        questions: list[str],
        refusals: list[str],
        seed: int,
        answers: list[str] | None = None,
    ):
        """`answers`: keep each question's own answer and pair the refusal with it as its alternate (IdkDPO)."""
        if not refusals:
            raise DataError("data.idk: the refusal file holds no sentences")
        self.encode, self.questions, self.refusals, self.seed = encode, questions, refusals, seed
        self.answers = answers

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self.draw(i, 0) for i in range(len(self))[index]]
        return self.draw(index, 0)

    def refusal(self, index: int, epoch: int) -> str:
        return random.Random(f"idk:{self.seed}:{epoch}:{index}").choice(self.refusals)

    def draw(self, index: int, epoch: int) -> Encoded:
        refused = self.encode(self.questions[index], self.refusal(index, epoch))
        if self.answers is None:
            return refused
        return with_alternate(self.encode(self.questions[index], self.answers[index]), refused)


def with_alternate(original: Encoded, alternate: Encoded) -> Encoded:
    return Encoded(original.input_ids, original.labels, alternate)


def encode_task(
    data_cfg: DataConfig,
    tokenizer,
    source: str,
    what: str,
    refusals_from: str | None = None,
    seed: int = 0,
    alternates: str = "",
) -> Sequence[Encoded]:
    """Read and tokenize one task's set; fail early on empty sets and on a `max_length` too short.

    `refusals_from`: answer every question with a refusal from that file (IdkNLL), drawn per access
    from (`seed`, epoch, index): see `DrawnRefusals`. `alternates` (an objective's `alternates`):
    "refusal_pairs" keeps the answers and pairs each with such a refusal (IdkDPO); "alternate_key" pairs
    each answer with the record's `data.alternate_key` field (DPO).
    """
    if data_cfg.format == "tofu":
        q, a = data_cfg.question_key, data_cfg.answer_key
        alt = data_cfg.alternate_key if alternates == "alternate_key" else ""
        rows = load_format_records(data_cfg, source, what, (alt,) if alt else ())

        def encode(question: str, answer: str) -> Encoded:
            return encode_qa(tokenizer, question, answer, data_cfg.max_length, data_cfg.prompt_template)

        if refusals_from is not None:
            refusals = load_lines(refusals_from or TOFU_DIR / "idontknow.jsonl")
            answers = [row[a] for row in rows] if alternates == "refusal_pairs" else None
            drawn = DrawnRefusals(encode, [row[q] for row in rows], refusals, seed, answers)
            # the prompt alone decides whether a record keeps an answer token, so one refusal checks all
            check_answer_tokens([encode(row[q], refusals[0]) for row in rows], data_cfg, source, what)
            if answers is not None:
                check_answer_tokens([encode(row[q], row[a]) for row in rows], data_cfg, source, what)
            return drawn
        encoded = [encode(row[q], row[a]) for row in rows]
        if alt:
            paired = [encode(row[q], row[alt]) for row in rows]
            check_answer_tokens(paired, data_cfg, source, f"{what} ({alt})")
            encoded = [with_alternate(e, p) for e, p in zip(encoded, paired, strict=True)]
    else:
        rows = load_format_records(data_cfg, source, what)
        encoded = [encode_text(tokenizer, row[data_cfg.text_key], data_cfg.max_length) for row in rows]
    check_answer_tokens(encoded, data_cfg, source, what)
    return encoded


def format_fields(data_cfg: DataConfig, data_format: str) -> tuple[str, ...]:
    """The fields each record of `data_format` must hold, under the configured key names."""
    if data_format == "tofu":
        return data_cfg.question_key, data_cfg.answer_key
    return (data_cfg.text_key,)


def load_format_records(data_cfg: DataConfig, source: str, what: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """The records of `source` with the fields `data.format` reads (and `extra` ones, e.g. DPO's alternate
    answer); when they lack them but hold the other format's fields (Q/A records under `text`, or the
    reverse), the error names the format that fits."""
    try:
        return load_records(source, (*format_fields(data_cfg, data_cfg.format), *extra), what)
    except DataError as err:
        other = "text" if data_cfg.format == "tofu" else "tofu"
        fields = format_fields(data_cfg, other)
        try:
            load_records(source, fields, what)
        except DataError:
            raise err from None
        raise DataError(
            f"{err}; its records hold the fields of data.format={other} ({', '.join(fields)}): set data.format={other}"
        ) from None


def check_answer_tokens(encoded: Sequence[Encoded], data_cfg: DataConfig, source: str, what: str) -> None:
    for index, example in enumerate(encoded):
        if example.answer_tokens == 0:
            raise DataError(
                f"{what}: data.max_length={data_cfg.max_length} leaves record {index + 1} of {source} "
                "without a single token to train on; raise data.max_length"
            )
