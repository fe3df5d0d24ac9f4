"""Membership inference, PrivLeak and memorisation: hand-computed cases on a stub model with fixed
log-probabilities, and a tiny model that memorised one set and not another."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ngdiff.eval.likelihood import answer_grad_norms, answer_token_stats
from ngdiff.eval.memorization import exact_memorization, extraction_strength
from ngdiff.eval.mia import mia_auc, mia_metrics, min_k_plus_plus_score, mink_score, zlib_score
from ngdiff.eval.privacy import tofu_privleak

# next-token distributions at positions 0, 1, 2 (vocab of 3); the stub returns their logs at every row
TABLE = [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]


class StubLM(torch.nn.Module):
    """Logits = log TABLE[position] + a trainable bias (zero): known log-probabilities, a real gradient."""

    def __init__(self, table=TABLE):
        super().__init__()
        rows = [*table, [1 / len(table[0])] * len(table[0])]  # the last position predicts nothing scored
        self.table = torch.log(torch.tensor(rows, dtype=torch.float64)).float()
        self.bias = torch.nn.Parameter(torch.zeros(len(table[0])))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.table[:t].expand(b, t, -1) + self.bias)


def test_token_stats_of_a_known_distribution():
    # prompt [0], answer [1, 0, 2]: predicted at positions 0, 1, 2 with p = .25, .25, .8; the last (EOS) is
    # in the loss but not in the per-token statistics (open-unlearning's tokenwise_logprobs)
    (st,) = answer_token_stats(StubLM(), [[0]], [[1, 0, 2]], pad_id=0)
    assert st.avg_loss == pytest.approx(-(2 * math.log(0.25) + math.log(0.8)) / 3)
    assert st.token_logprobs == pytest.approx([math.log(0.25)] * 2)
    mu0 = 0.5 * math.log(0.5) + 0.5 * math.log(0.25)  # sum p log p at position 0 (same at 1, permuted)
    var0 = 0.5 * math.log(0.5) ** 2 + 0.5 * math.log(0.25) ** 2 - mu0**2
    assert st.mu == pytest.approx([mu0, mu0]) and st.sigma == pytest.approx([var0, var0])
    assert (st.preds, st.labels) == ([0, 1], [1, 0])
    # Min-40% of 2 tokens: the single lowest; Min-K%++ standardises it first
    assert mink_score(st.token_logprobs) == pytest.approx(math.log(4))
    z = (math.log(0.25) - mu0) / math.sqrt(var0)
    assert min_k_plus_plus_score(st.token_logprobs, st.mu, st.sigma) == pytest.approx(-z)
    assert exact_memorization(st.preds, st.labels) == 0.0


def test_gradnorm_of_a_bias_only_model():
    # d/d bias of the mean NLL of tokens 1 and 0 under uniform logits: mean(softmax - onehot) = (-1/6, -1/6, 1/3)
    model = StubLM([[1 / 3] * 3] * 3)
    (norm,) = answer_grad_norms(model, [[0]], [[1, 0, 2]], pad_id=0)
    assert norm == pytest.approx(math.sqrt(1 / 36 + 1 / 36 + 1 / 9))
    assert model.bias.grad is None  # gradients are cleared afterwards


def test_scores_auc_privleak_by_hand():
    assert zlib_score(2.4, "aaaa") == pytest.approx(2.4 / 12)  # zlib.compress(b"aaaa") is 12 bytes
    assert mink_score([-1.0, -5.0, -2.0, -3.0, -4.0]) == pytest.approx(4.5)  # int(5 * 0.4) = 2 lowest
    assert mink_score([]) == 0.0
    # forget labelled 0, holdout 1: holdout scored above forget in 3 of 4 pairs
    assert mia_auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)
    assert mia_auc([1.0, 2.0], [3.0, 4.0]) == pytest.approx(1.0)
    # open-unlearning privacy.py: ((1 - auc) - (1 - ref)) / (1 - ref) * 100
    assert tofu_privleak(0.75, 0.5) == pytest.approx(-50.0)
    assert tofu_privleak(0.6, 0.6) == pytest.approx(0.0)


def test_memorisation_by_hand():
    assert exact_memorization([0, 1, 2], [5, 1, 2]) == pytest.approx(2 / 3)
    assert exact_memorization([], []) is None
    assert extraction_strength([0, 1, 2], [5, 1, 2]) == pytest.approx(1 - 1 / 3)  # suffix from k = 1
    assert extraction_strength([1, 2], [1, 2]) == 1.0
    assert extraction_strength([0, 0, 0], [1, 1, 1]) == pytest.approx(1 / 3)  # open-unlearning's loop ends at k = n-1
    assert extraction_strength([], []) == 0.0


def test_mia_metrics_aggregate_and_privleak_reference():
    def rec(x, em=1.0):
        return {k: x for k in ("loss", "zlib", "min_k", "min_k_plus_plus")} | {
            "exact_memorization": em,
            "extraction_strength": em / 2,
            "ref_min_k": -x,
        }

    forget, holdout = [rec(1.0, 1.0), rec(3.0, 0.0)], [rec(2.0), rec(4.0)]
    out = mia_metrics(forget, holdout)
    assert out["mia_loss_auc"] == out["mia_mink_auc"] == pytest.approx(0.75)
    assert "mia_gradnorm_auc" not in out and "mia_reference_auc" not in out
    # the reference model's own Min-K% AUC (scores negated: 1 - 0.75) is PrivLeak's reference
    assert out["privleak_reference_auc"] == pytest.approx(0.25)
    assert out["privleak"] == pytest.approx(((1 - 0.75) - 0.75) / 0.75 * 100)
    assert mia_metrics(forget, holdout, reference_auc=0.5)["privleak"] == pytest.approx(-50.0)
    assert (out["exact_memorization"], out["extraction_strength"]) == (0.5, 0.25)


def test_reference_attack_is_the_loss_gap(tiny):
    from ngdiff.eval.mia import mia_records
    from tests.conftest import tofu_rows

    model, tok = tiny
    rows = tofu_rows(3)
    records = mia_records(model, tok, rows, reference_model=model, gradnorm=False)
    assert [r["reference"] for r in records] == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    assert all(r["ref_min_k"] == pytest.approx(r["min_k"]) for r in records)


@pytest.fixture(scope="module")
def memorised(tiny_model_dir, tmp_path_factory):
    """The tiny model fine-tuned on set A; set B (interleaved questions of the same authors) unseen."""
    from ngdiff.data.tokenize import encode_qa
    from ngdiff.finetune import FinetuneConfig, finetune
    from ngdiff.modeling import load_tokenizer
    from tests.conftest import tofu_rows

    tok = load_tokenizer(str(tiny_model_dir))
    rows = tofu_rows(40)
    a, b = rows[0:20:2], rows[1:20:2]
    cfg = FinetuneConfig(epochs=40, batch_size=10, lr=1e-2, warmup_steps=5)
    examples = [encode_qa(tok, r["question"], r["answer"], 256) for r in a]
    folder = finetune(tiny_model_dir, tok, examples, tmp_path_factory.mktemp("mia") / "a", cfg, progress=False)
    return {"a": folder, "neither": tiny_model_dir}, tok, a, b


def test_memorised_set_is_detected_unseen_sets_are_not(memorised):
    from transformers import AutoModelForCausalLM

    from ngdiff.eval.mia import mia_records

    dirs, tok, a, b = memorised
    aucs = {}
    for name, folder in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        aucs[name] = mia_metrics(mia_records(model, tok, a), mia_records(model, tok, b))
    for key in ("mia_loss_auc", "mia_mink_auc", "mia_minkpp_auc"):
        assert aucs["a"][key] > 0.9, (key, aucs)
    for key in ("mia_zlib_auc", "mia_gradnorm_auc"):
        assert aucs["a"][key] > 0.7, (key, aucs)
    # GradNorm is left out here: on a random-weight model the gradient size follows answer length, not
    # membership (it scored 0.2 on these 10 vs 10 rows)
    for key in ("mia_loss_auc", "mia_zlib_auc", "mia_mink_auc", "mia_minkpp_auc"):
        assert abs(aucs["neither"][key] - 0.5) < 0.3, (key, aucs)
    assert aucs["a"]["exact_memorization"] > aucs["neither"]["exact_memorization"]
