"""Turning records into token ids and labels.

TOFU question/answer pairs: the loss is on the answer tokens only (prompt labels are -100); the
tokenizer's chat template is used when it has one, else a plain `Question: ...\nAnswer:` prompt; the
BOS token appears exactly once and an EOS follows the answer. Raw text: tokenized as is, with only the
special tokens the tokenizer itself adds, truncated, loss on every token.
"""

from __future__ import annotations

from dataclasses import dataclass

from ngdiff.objectives import IGNORE


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def plain_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the prompt that precedes an answer (what generation starts from)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(plain_prompt(question), add_special_tokens=True)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer as it follows its prompt, closed by EOS."""
    text = answer if tokenizer.chat_template else " " + answer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return ids


def encode_qa(tokenizer, question: str, answer: str, max_length: int) -> Encoded:
    prompt = prompt_ids(tokenizer, question)
    answer_part = answer_ids(tokenizer, answer)
    ids = (prompt + answer_part)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer_part)[:max_length]
    return Encoded(ids, labels)


def encode_text(tokenizer, text: str, max_length: int) -> Encoded:
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, list(ids))
