"""Turning records into token ids and labels.

TOFU question/answer pairs: the loss is on the answer tokens only (prompt labels are -100), the BOS
token appears exactly once and an EOS follows the answer. `data.prompt_template` picks the format:

- `""` (default): the tokenizer's chat template when it has one, else `Question: ...\nAnswer:`, prompt
  and answer tokenised apart;
- `chat`: the tokenizer's chat template (an error if it has none);
- `llama2`, `phi`: the tags TOFU fine-tuned its models with (locuslab/tofu config/model_config.yaml);
- any string with `{question}`: that prompt, the answer joined directly after it.

The presets and custom strings tokenise as TOFU's data_module.py `convert_raw_data_to_model_format`:
question and answer joined as one string, labels -100 on the tokens of the tagged question alone (so
the answer tag, e.g. `Answer: `, is trained on, as in TOFU). Raw text: tokenized as is, with only the
special tokens the tokenizer itself adds, truncated, loss on every token.
"""

from __future__ import annotations

from dataclasses import dataclass

from ngdiff.data.records import DataError
from ngdiff.objectives import IGNORE


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    alternate: Encoded | None = None  # the same question with another answer (DPO's preferred one)

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


# (question_start_tag, question_end_tag, answer_tag) of locuslab/tofu config/model_config.yaml
TOFU_TAGS = {"llama2": ("[INST] ", " [/INST]", ""), "phi": ("Question: ", "\n", "Answer: ")}
PROMPT_PRESETS = ("", "chat", *TOFU_TAGS)


def check_prompt_template(template: str) -> None:
    if template not in PROMPT_PRESETS and "{question}" not in template:
        raise ValueError(
            f"data.prompt_template {template!r}: use chat, llama2, phi, a string containing {{question}}, "
            "or leave it empty (chat template if the tokenizer has one, else Question/Answer)"
        )


def plain_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def tagged(template: str, question: str) -> tuple[str, str] | None:
    """(tagged question, answer tag) for the TOFU-style joined formats; None for the chat/plain ones."""
    if template in TOFU_TAGS:
        start, end, answer_tag = TOFU_TAGS[template]
        return start + question + end, answer_tag
    if "{question}" in template:
        return template.replace("{question}", question), ""
    return None


def uses_chat(tokenizer, template: str) -> bool:
    if template == "chat" and not tokenizer.chat_template:
        raise DataError("data.prompt_template=chat, but the tokenizer has no chat template")
    return template == "chat" or (template == "" and bool(tokenizer.chat_template))


def prompt_ids(tokenizer, question: str, template: str = "") -> list[int]:
    """Token ids of the prompt that precedes an answer (what generation starts from)."""
    parts = tagged(template, question)
    if parts is not None:
        return tokenizer("".join(parts), add_special_tokens=True)["input_ids"]
    if uses_chat(tokenizer, template):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(plain_prompt(question), add_special_tokens=True)["input_ids"]


def with_eos(tokenizer, ids: list[int]) -> list[int]:
    return [*ids, tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else list(ids)


def answer_ids(tokenizer, answer: str, template: str = "") -> list[int]:
    """Token ids of an answer as it follows its prompt, closed by EOS (the tokenised-apart formats)."""
    text = answer if uses_chat(tokenizer, template) else " " + answer
    return with_eos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def qa_ids(tokenizer, question: str, answer: str, template: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS) of one pair, split where the loss starts."""
    parts = tagged(template, question)
    if parts is None:
        return prompt_ids(tokenizer, question, template), answer_ids(tokenizer, answer, template)
    tagged_question, answer_tag = parts
    full = tokenizer(tagged_question + answer_tag + answer, add_special_tokens=True)["input_ids"]
    n_question = len(tokenizer(tagged_question, add_special_tokens=True)["input_ids"])
    return full[:n_question], with_eos(tokenizer, full[n_question:])


def encode_qa(tokenizer, question: str, answer: str, max_length: int, template: str = "") -> Encoded:
    prompt, answer_part = qa_ids(tokenizer, question, answer, template)
    ids = (prompt + answer_part)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer_part)[:max_length]
    return Encoded(ids, labels)


def encode_text(tokenizer, text: str, max_length: int) -> Encoded:
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, list(ids))
