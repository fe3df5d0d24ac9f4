"""Forget/retain objectives against their reference formulas (official SimNPO code, TOFU/open-unlearning KL,
open-unlearning's src/trainer/utils.py and src/trainer/unlearn/*.py on hand-computed toy cases)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ngdiff.config import ConfigError, load_config
from ngdiff.data import DataError, collate, encode_task
from ngdiff.modeling import load_tokenizer
from ngdiff.objectives import (
    CEU,
    DPO,
    NPO,
    UNDIAL,
    WGA,
    KLToReference,
    PDUForget,
    RMUForget,
    RMURetain,
    SatImp,
    SimNPO,
    build_objectives,
)


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


# ---------------------------------------------------------------- open-unlearning's objectives, by hand
# A toy "model" with fixed logits over a vocabulary of two tokens, so every value below is closed form:
# one sequence of three positions, labels [-100, 1, 1]: the targets are token 1 at position 1 (predicted
# by the logits at position 0, p = 3/4) and token 1 at position 2 (predicted at position 1, p = 1/4).
LN3 = math.log(3.0)


class ToyModel(torch.nn.Module):
    """Returns `logits` whatever the input; its one "decoder layer" `model.layers.0` outputs `hidden`."""

    def __init__(self, logits: list[list[float]], hidden: list[list[float]] | None = None):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([logits]))
        self.hidden = torch.nn.Parameter(torch.tensor([hidden or [[0.0, 0.0]] * len(logits)]))
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, input_ids, attention_mask, use_cache=False):
        self.model.layers[0](self.hidden)
        return SimpleNamespace(logits=self.logits)


TOY = ToyModel([[0.0, LN3], [LN3, 0.0], [0.0, 0.0]])
UNIFORM = ToyModel([[0.0, 0.0]] * 3)


def toy_batch(labels: list[int], alternate: list[int] | None = None) -> dict[str, torch.Tensor]:
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    batch["labels"] = torch.tensor([labels])
    if alternate is not None:
        batch.update({f"alt_{key}": value.clone() for key, value in batch.items()})
        batch["alt_labels"] = torch.tensor([alternate])
    return batch


BATCH = toy_batch([-100, 1, 1])


def close(value: torch.Tensor, expected: float) -> None:
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_wga_weighs_each_token_nll_by_its_probability():
    """compute_wga_loss: -mean(p^beta NLL); ascended here as sum p^beta NLL: 3/4 ln(4/3) + 1/4 ln 4."""
    close(WGA(beta=1.0).loss_sum(TOY, BATCH), 0.75 * math.log(4 / 3) + 0.25 * math.log(4))
    close(WGA(beta=2.0).loss_sum(TOY, BATCH), 0.75**2 * math.log(4 / 3) + 0.25**2 * math.log(4))
    assert WGA().count(BATCH) == 2


def test_satimp_weighs_by_p_to_beta1_times_one_minus_p_to_beta2():
    expected = 0.75**5 * 0.25 * math.log(4 / 3) + 0.25**5 * 0.75 * math.log(4)
    close(SatImp(beta1=5.0, beta2=1.0).loss_sum(TOY, BATCH), expected)


def test_undial_distils_the_reference_with_the_true_token_lowered():
    """Teacher logits (0, 0) less beta = ln 3 on token 1: target (3/4, 1/4) at both positions; the model's
    log-probs are (ln 1/4, ln 3/4) then (ln 3/4, ln 1/4): CE sums to ln 4 + ln(4/3); returned negated."""
    close(UNDIAL(beta=LN3).loss_sum(TOY, BATCH, UNIFORM), -math.log(16 / 3))


def test_ceu_drops_the_first_answer_token_and_removes_the_true_token_from_the_target():
    """Only position 2 counts (the first labelled token is skipped); its target without token 1 is (1, 0),
    so CE = -ln p_0 = ln(4/3) at logits (ln 3, 0); returned negated."""
    close(CEU(ignore_first_n=1).loss_sum(TOY, BATCH), -math.log(4 / 3))
    assert CEU(ignore_first_n=1).count(BATCH) == 1
    close(CEU(ignore_first_n=0).loss_sum(TOY, BATCH), -(math.log(4) + math.log(4 / 3)))  # (0, 1) at position 0
    assert CEU(ignore_first_n=0).count(BATCH) == 2


def test_pdu_squares_max_minus_mean_logit_at_the_labelled_positions():
    """pdu.py masks the logits with the unshifted labels: positions 1 (ln 3, 0) and 2 (0, 0)."""
    close(PDUForget().loss_sum(TOY, BATCH), -((LN3 / 2) ** 2))
    assert PDUForget().count(BATCH) == 2


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_dpo_prefers_the_alternate_over_the_original(beta):
    """log p: original (1, 1) = ln(3/16), alternate (1, 0) = ln(9/16); reference ln(1/4) both, so the margin
    is ln 3 and -L = (2/beta) log sigmoid(beta ln 3)."""
    batch = toy_batch([-100, 1, 1], alternate=[-100, 1, 0])
    expected = (2 / beta) * math.log(1 / (1 + 3**-beta))
    close(DPO(beta=beta).loss_sum(TOY, batch, UNIFORM), expected)
    assert DPO().count(batch) == 1
    with pytest.raises(ValueError, match="alternate answer"):
        DPO().loss_sum(TOY, BATCH, UNIFORM)


def test_rmu_measures_the_named_layer_against_the_steering_vector_and_the_reference():
    forget = RMUForget(layer="layers.0", steering_coeff=3.0, seed=5)
    target = forget.control_vector(2)
    assert float(target.norm()) == pytest.approx(3.0) and bool((target > 0).all())
    assert torch.equal(target, RMUForget(steering_coeff=3.0, seed=5).control_vector(2))  # drawn from the seed
    # labelled positions (unshifted, as rmu.py) 1 and 2: distance 0 and mean((1, 1)^2) = 1, averaged: 1/2
    hidden = [[9.0, 9.0], target.tolist(), (target + 1).tolist()]
    model = ToyModel([[0.0, 0.0]] * 3, hidden)
    close(forget.loss_sum(model, BATCH), -0.5)
    assert forget.count(BATCH) == 1
    # retain: the frozen start's activations differ by (2, 0) and (0, 2): 2 per token, 2 on average
    shifts = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    frozen = ToyModel([[0.0, 0.0]] * 3, [[0.0, 0.0], *(target + shifts[1:]).tolist()])
    close(RMURetain(layer="model.layers.0").loss_sum(model, BATCH, frozen), 2.0)
    with pytest.raises(ValueError, match="matches 0 modules"):
        RMUForget(layer="model.layers.9").loss_sum(model, BATCH)


def test_the_new_objectives_take_their_method_keys():
    cfg = load_config(
        None,
        [
            "model.path=m",
            "data.forget=a:b",
            "data.retain=a:c",
            "method.wga_beta=2",
            "method.satimp_beta1=3",
            "method.undial_beta=4",
            "method.dpo_beta=0.5",
            "method.ceu_ignore_first_n=0",
            "method.rmu_layer=model.layers.1",
            "method.rmu_steering_coeff=6",
        ],
    )
    m = cfg.method
    assert build_objectives("wga", "nll", method=m)[0].beta == 2.0
    assert build_objectives("satimp", "nll", method=m)[0].beta1 == 3.0
    assert build_objectives("undial", "nll", method=m)[0].beta == 4.0
    assert build_objectives("idkdpo", "nll", method=m)[0].beta == 0.5
    assert build_objectives("ceu", "nll", method=m)[0].ignore_first_n == 0
    forget, retain = build_objectives("rmu", "rmu", method=m, seed=3)
    assert (forget.layer, forget.steering_coeff, forget.seed, retain.layer) == (
        "model.layers.1",
        6.0,
        3,
        "model.layers.1",
    )
    defaults = load_config(None, ["model.path=m", "data.forget=a:b", "data.retain=a:c"]).method
    assert (defaults.dpo_beta, defaults.wga_beta, defaults.satimp_beta1, defaults.satimp_beta2) == (0.1, 1.0, 5.0, 1.0)
    assert (defaults.undial_beta, defaults.ceu_ignore_first_n, defaults.rmu_steering_coeff) == (10.0, 1, 2.0)


def test_idkdpo_pairs_each_answer_with_a_refusal(setup, tiny_model_dir, tofu_split):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.forget={tofu_split['forget']}", "data.retain=x"])
    plain = encode_task(cfg.data, tokenizer, cfg.data.forget[0], "forget")
    paired = encode_task(cfg.data, tokenizer, cfg.data.forget[0], "forget", cfg.data.idk, alternates="refusal_pairs")
    refused = encode_task(cfg.data, tokenizer, cfg.data.forget[0], "forget", cfg.data.idk)
    assert paired[3].input_ids == plain[3].input_ids and paired[3].alternate == refused[3]
    batch = collate([paired[0], paired[1]], tokenizer.pad_token_id)
    assert torch.equal(batch["alt_labels"], collate([refused[0], refused[1]], tokenizer.pad_token_id)["labels"])


def test_dpo_reads_the_alternate_answer_field(tiny_model_dir, tmp_path):
    from tests.conftest import write_jsonl

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [{"question": "Who?", "answer": "Alice wrote it.", "other": "Bob wrote it."}]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    cfg = load_config(
        None,
        [
            "model.path=m",
            f"data.forget={path}",
            "data.retain=x",
            "data.alternate_key=other",
            "method.forget_objective=dpo",
        ],
    )
    (example,) = encode_task(cfg.data, tokenizer, str(path), "forget", alternates="alternate_key")
    data_cfg = cfg.data
    assert (
        example.alternate.input_ids
        == encode_task(
            data_cfg,
            tokenizer,
            str(write_jsonl(tmp_path / "g.jsonl", [{"question": "Who?", "answer": "Bob wrote it."}])),
            "g",
        )[0].input_ids
    )
    with pytest.raises(DataError, match="lacks field other"):
        encode_task(
            cfg.data,
            tokenizer,
            str(write_jsonl(tmp_path / "h.jsonl", rows[:1] and [{"question": "q", "answer": "a"}])),
            "forget",
            alternates="alternate_key",
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.forget_objective=dpo"], "set data.alternate_key"),
        (
            ["method.forget_objective=npo", "data.alternate_key=other"],
            "read only by method.forget_objective=dpo",
        ),
        (["method.forget_objective=rmu", "method.rmu_layer= "], "method.rmu_layer must name"),
        (["method.forget_objective=wga", "method.wga_beta=-1"], "method.wga_beta must not be negative"),
        (["method.forget_objective=undial", "method.undial_beta=0"], "method.undial_beta must be positive"),
    ],
)
def test_objective_settings_are_refused_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.path=m", "data.forget=a:b", "data.retain=a:c", *overrides])


def test_rmu_trains_only_the_named_parameters(tiny_model_dir, tofu_split, tmp_path):
    """method.rmu_trainable: the other parameters are frozen before the backend wraps the model."""
    from ngdiff.pipeline import run_training
    from parallel.base import DistContext
    from tests.conftest import tiny_run_overrides

    overrides = [
        "method.forget_objective=rmu",
        "method.retain_objective=rmu",
        "method.rmu_layer=model.layers.1",
        r"method.rmu_trainable=model\.layers\.1\.mlp\..*",
        "optim.name=sgd",
        "optim.lr=0.5",
        "train.max_steps=2",
        f"output_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(None, tiny_run_overrides(tiny_model_dir, tofu_split, *overrides))
    trained = run_training(cfg, DistContext()).trainer.backend.model.state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    moved = {name for name, value in start.items() if not torch.equal(value, trained[name])}
    assert moved == {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    with pytest.raises(ConfigError, match=r"applies to method\.forget_objective=rmu"):
        load_config(None, tiny_run_overrides(tiny_model_dir, tofu_split, "method.rmu_trainable=.*"))
