"""Evaluation on a tiny model: batching changes nothing, losses match the training objective."""

from __future__ import annotations

import math

import pytest
import torch

from ngdiff.data.tokenize import encode_qa, prompt_ids
from ngdiff.eval.generation import generate_greedy, generate_greedy_ids
from ngdiff.eval.likelihood import answer_losses, sequence_token_logprobs
from ngdiff.eval.muse import evaluate_muse
from ngdiff.eval.tofu import evaluate_rows, load_rows, qa_metrics, tofu_sets
from ngdiff.objectives import NLL
from tests.conftest import tofu_rows


def test_batched_generation_is_one_at_a_time_generation(tiny):
    model, tok = tiny
    rows = tofu_rows(40)[::8]  # questions of different lengths: left padding is exercised
    prompts = [prompt_ids(tok, r["question"]) for r in rows]
    assert len({len(p) for p in prompts}) > 1
    batched = generate_greedy_ids(model, tok, prompts, max_new_tokens=8, batch_size=8)
    single = [generate_greedy_ids(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(ids) > 0 for ids in batched)
    assert generate_greedy(model, tok, prompts[:2], 8, 2) == [
        tok.decode(i, skip_special_tokens=True).strip() for i in batched[:2]
    ]


def test_answer_loss_is_the_training_nll_and_independent_of_batching(tiny):
    model, tok = tiny
    rows = tofu_rows(6)
    prompts = [prompt_ids(tok, r["question"]) for r in rows]
    answers = [encode_qa(tok, r["question"], r["answer"], 512) for r in rows]
    targets = [e.input_ids[len(p) :] for e, p in zip(answers, prompts, strict=True)]
    batched = answer_losses(model, prompts, targets, tok.pad_token_id, batch_size=6)
    single = [
        answer_losses(model, [p], [t], tok.pad_token_id, batch_size=1)[0] for p, t in zip(prompts, targets, strict=True)
    ]
    for b, s, enc in zip(batched, single, answers, strict=True):
        ids = torch.tensor([enc.input_ids])
        batch = {"input_ids": ids, "labels": torch.tensor([enc.labels]), "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            expected = float(NLL().loss_sum(model, batch))
        assert b.tokens == s.tokens == enc.answer_tokens
        assert b.loss == pytest.approx(expected, rel=1e-4)
        assert s.loss == pytest.approx(expected, rel=1e-4)


def test_likelihood_batches_hold_rows_of_similar_length_and_results_keep_the_rows_order(tiny):
    model, tok = tiny
    rows = tofu_rows(7)
    prompts = [prompt_ids(tok, r["question"]) for r in rows]
    targets = [tok(r["answer"] * (1 + i % 3), add_special_tokens=False)["input_ids"] for i, r in enumerate(rows)]
    lengths = [len(p) + len(t) for p, t in zip(prompts, targets, strict=True)]
    assert lengths != sorted(lengths, reverse=True) and len(set(lengths)) == len(lengths)
    widths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]) or None, with_kwargs=True
    )
    try:
        batched = answer_losses(model, prompts, targets, tok.pad_token_id, batch_size=3)
    finally:
        hook.remove()
    # longest first, three a batch: each batch is as wide as its own longest row
    assert widths == sorted(lengths, reverse=True)[::3]
    single = [
        answer_losses(model, [p], [t], tok.pad_token_id, batch_size=1)[0] for p, t in zip(prompts, targets, strict=True)
    ]
    assert [b.tokens for b in batched] == [len(t) for t in targets]
    assert [b.loss for b in batched] == pytest.approx([s.loss for s in single], rel=1e-5)


def test_token_logprobs_cover_every_token_after_the_first(tiny):
    model, tok = tiny
    seqs = [
        tok("a short text", add_special_tokens=True)["input_ids"],
        tok("another one here, longer", add_special_tokens=True)["input_ids"],
    ]
    lps = sequence_token_logprobs(model, seqs, tok.pad_token_id, batch_size=2)
    assert [len(x) for x in lps] == [len(s) - 1 for s in seqs]
    assert all(v < 0 for x in lps for v in x)
    alone = sequence_token_logprobs(model, seqs[:1], tok.pad_token_id, batch_size=1)[0]
    assert alone == pytest.approx(lps[0], abs=1e-5)


def test_tofu_records_are_consistent(tiny):
    model, tok = tiny
    rows = load_rows(tofu_sets("forget01")[0], max_items=3)
    records = evaluate_rows(model, tok, rows, "paraphrased_answer", max_new_tokens=6, batch_size=2)
    assert len(records) == 3
    for rec, row in zip(records, rows, strict=True):
        assert rec["question"] == row["question"]
        assert len(rec["perturb_loss"]) == len(row["perturbed_answer"]) == 5
        assert rec["avg_gt_loss"] == pytest.approx(rec["gt_loss"] / rec["num_token_gt"])
        expected = math.exp(rec["avg_paraphrased_loss"] - sum(rec["average_perturb_loss"]) / 5)
        assert rec["truth_ratio"] == pytest.approx(expected)
        assert 0.0 <= rec["rougeL_recall"] <= 1.0
    # an untrained model finds no answer more likely: each answer loss is near log(vocab)
    assert records[0]["avg_gt_loss"] == pytest.approx(math.log(len(tok)), rel=0.2)


def test_qa_metrics_for_plain_rows(tiny):
    model, tok = tiny
    rows = tofu_rows(3)
    out = qa_metrics(model, tok, rows, max_new_tokens=6)
    assert set(out) == {"rougeL_recall", "rouge1_recall", "answer_loss"}
    assert out["answer_loss"] == pytest.approx(math.log(len(tok)), rel=0.2)


def test_muse_on_a_tiny_model(tiny):
    model, tok = tiny
    items, metrics = evaluate_muse(
        model, tok, max_items=2, batch_size=2, reference_auc=0.5, verbmem_tokens=6, knowmem_tokens=6
    )
    assert [len(items[k]) for k in ("verbmem_f", "knowmem_f", "knowmem_r", "privleak_forget", "privleak_holdout")] == [
        2
    ] * 5
    assert set(metrics) == {"verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc", "privleak"}
    assert metrics["privleak"] == pytest.approx((metrics["privleak_auc"] - 0.5) / 0.5 * 100)
    # texts are cut to the model's 512 positions
    assert all(r["tokens"] <= 512 for r in items["privleak_forget"])
    assert all(r["min_k"] > 0 for r in items["privleak_holdout"])
