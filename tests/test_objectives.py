"""Forget/retain objectives against their reference formulas (official SimNPO code, TOFU/open-unlearning KL)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ngdiff.config import load_config
from ngdiff.data import collate, encode_task
from ngdiff.modeling import load_tokenizer
from ngdiff.objectives import NPO, KLToReference, SimNPO, build_objectives


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tofu_split):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = load_config(
        None,
        [f"model.path={tiny_model_dir}", f"data.forget={tofu_split['forget']}", f"data.retain={tofu_split['retain']}"],
    )
    examples = encode_task(cfg.data, tokenizer, cfg.data.forget[0], "forget")[:4]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tokenizer, examples, model, reference


def test_simnpo_is_the_official_formula(setup):
    """Unlearn-Simple TOFU/dataloader.py: -(2/b) logsigmoid(b * (NLL/|y| - gamma)), NLL summed per sequence."""
    tokenizer, examples, model, _ = setup
    batch = collate(examples, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none").sum(-1)
    beta, gamma = 2.5, 0.75
    official = -F.logsigmoid(beta * (nll / (labels != -100).sum(-1) - gamma)) * 2 / beta
    got = SimNPO(beta=beta, gamma=gamma).loss_sum(model, batch)
    torch.testing.assert_close(got, -official.sum(), rtol=1e-5, atol=1e-5)  # returned negated (sign convention)


def test_simnpo_and_npo_take_their_own_keys():
    forget, _ = build_objectives("simnpo", "nll", npo_beta=0.1, simnpo_beta=4.5, simnpo_gamma=0.2)
    assert isinstance(forget, SimNPO) and (forget.beta, forget.gamma) == (4.5, 0.2)
    forget, _ = build_objectives("npo", "nll", npo_beta=0.3, simnpo_beta=4.5)
    assert isinstance(forget, NPO) and forget.beta == 0.3
    cfg = load_config(None, ["model.path=m", "data.forget=a:b", "data.retain=a:c"])
    assert (cfg.method.simnpo_beta, cfg.method.simnpo_gamma, cfg.method.npo_beta) == (2.5, 0.0, 0.1)


def test_retain_kl_covers_every_attended_position_prompt_included(setup):
    """TOFU / open-unlearning: kl_div(log p, log p_ref, log_target) over all (here: attended) positions."""
    tokenizer, examples, model, reference = setup
    batch = collate(examples, tokenizer.pad_token_id)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    cur = torch.log_softmax(model(**kwargs).logits, -1)
    ref = torch.log_softmax(reference(**kwargs).logits, -1)
    mask = batch["attention_mask"].bool()
    expected = F.kl_div(cur[mask], ref[mask], reduction="sum", log_target=True)
    kl = KLToReference()
    torch.testing.assert_close(kl.loss_sum(model, batch, reference), expected, rtol=1e-5, atol=1e-6)
    assert kl.count(batch) == int(mask.sum()) > int((batch["labels"] != -100).sum())


def test_retain_kl_does_not_depend_on_padding(setup):
    """Each example alone (no padding) sums to the same KL as the padded batch: exact under any split."""
    tokenizer, examples, model, reference = setup
    kl = KLToReference()
    together = kl.loss_sum(model, collate(examples, tokenizer.pad_token_id), reference)
    alone = sum(kl.loss_sum(model, collate([e], tokenizer.pad_token_id), reference) for e in examples)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
