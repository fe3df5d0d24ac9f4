"""data.prompt_template: today's default unchanged, TOFU's presets tokenised as TOFU does, eval in step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ngdiff.config import ConfigError, load_config
from ngdiff.data import DataError, collate
from ngdiff.data.tokenize import encode_qa, prompt_ids
from ngdiff.eval.tofu import evaluate_rows
from ngdiff.modeling import load_tokenizer
from ngdiff.objectives import IGNORE, NLL

Q, A = "Who wrote 'The Blue Harbor'?", "Jaime Vasquez wrote it in 1998."


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def tofu_format(tok, question: str, answer: str, start: str, end: str, answer_tag: str, max_length: int = 256):
    """locuslab/tofu data_module.py convert_raw_data_to_model_format, without the padding."""
    new_question = start + question + end
    full_text = new_question + answer_tag + answer
    num_question_tokens = len(tok(new_question, add_special_tokens=True)["input_ids"])
    ids = tok(full_text, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"]
    label = [*ids, tok.eos_token_id] if len(ids) < max_length else list(ids)
    label[:num_question_tokens] = [IGNORE] * num_question_tokens
    return ids, label


def test_default_is_todays_format(tok):
    assert not tok.chat_template  # the tiny tokenizer: the plain Question/Answer prompt
    prompt = tok(f"Question: {Q}\nAnswer:", add_special_tokens=True)["input_ids"]
    answer = [*tok(" " + A, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    enc = encode_qa(tok, Q, A, 256)
    assert enc.input_ids == prompt + answer
    assert enc.labels == [IGNORE] * len(prompt) + answer
    assert prompt_ids(tok, Q) == prompt


@pytest.mark.parametrize(
    ("template", "tags"), [("llama2", ("[INST] ", " [/INST]", "")), ("phi", ("Question: ", "\n", "Answer: "))]
)
def test_presets_tokenise_as_tofu(tok, template, tags):
    ids, label = tofu_format(tok, Q, A, *tags)
    enc = encode_qa(tok, Q, A, 256, template)
    assert enc.input_ids == [*ids, tok.eos_token_id]  # EOS after the answer, as TOFU's first pad token
    assert enc.labels == label
    assert enc.input_ids.count(tok.bos_token_id) == 1
    assert prompt_ids(tok, Q, template) == tok("".join((tags[0], Q, tags[1], tags[2])))["input_ids"]


def test_custom_template_joins_the_answer(tok):
    ids, label = tofu_format(tok, Q, A, "Q: ", "\nA:", "")
    enc = encode_qa(tok, Q, A, 256, "Q: {question}\nA:")
    assert (enc.input_ids, enc.labels) == ([*ids, tok.eos_token_id], label)


def test_bad_templates_are_refused(tok, tmp_path):
    with pytest.raises(DataError, match="no chat template"):
        encode_qa(tok, Q, A, 256, "chat")
    with pytest.raises(ConfigError, match=r"data\.prompt_template 'alpaca'"):
        load_config(None, ["model.path=m", "data.forget=a:b", "data.retain=a:c", "data.prompt_template=alpaca"])


def test_evaluation_scores_the_trained_format(tok, tiny_model_dir):
    """The eval's answer loss is the training NLL of the same template's encoding."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (record,) = evaluate_rows(model, tok, [{"question": Q, "answer": A}], generate=False, prompt_template="phi")
    batch = collate([encode_qa(tok, Q, A, 256, "phi")], tok.pad_token_id)
    with torch.no_grad():
        nll = NLL().loss_sum(model, batch)
    assert record["gt_loss"] == pytest.approx(float(nll), rel=1e-5)
    assert record["num_token_gt"] == NLL().count(batch)
