"""Every forget objective with every combiner unlearns: a few SGD steps raise the forget-set NLL.

The README promises that every combination works; this is the end-to-end check of the sign convention
(ngdiff/objectives/) through each combiner's weights (ngdiff/combiners.py) and the trainer.

Each step sees the whole forget set (batch 16 = the set), so what is measured is what is optimised:
every combiner's direction d has <d, g_F> < 0 to first order (MGDA's min-norm point included:
<d*, -g_F> >= |d*|^2), and NLL, NPO and SimNPO's gradients all point along the answers' NLL gradient,
so the forget NLL rises; so do open-unlearning's: DPO and IdkDPO (the original answer loses to its
alternate), WGA and SatImp (reweighted NLL), UNDIAL and CE-U (targets without the true token) and PDU
(flattened logits), each entering as the quantity forgetting raises (ngdiff/objectives/__init__.py).
RMU moves an activation, not the answers' NLL: for it the test checks what it optimises, the (negated)
distance of the steered layer's output to its random target rises. IdK is different in principle: it
does not push the true answers' NLL up, it pulls the refusals' NLL down (the true answers only lose once
the refusal displaces them), and on a small model learning any text of the same frame first lowers the
true answers' NLL too (measured: idk + gdiff/imtlg/lossnorm/mgda/pcgrad/rlw lower it at lr 0.05).
For IdK the test checks what it optimises: the refusal NLL of the pairs it trained on falls.

The combined direction is clipped to norm 1 (optim.max_grad_norm) so that every combiner takes a step of
the same bounded length and the test is about direction: unclipped, idk + pcgrad (no conflict, so the
plain sum of both gradients, twice GDiff's step) overshot at lr 0.05 (retain gradient norm 1.4 -> 18 in
three steps, refusal NLL 4.47 -> 6.10), a step-size effect, not a sign error.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ngdiff.combiners import COMBINERS, CombinerOptions, TaskStats, get_combiner
from ngdiff.config import DataConfig, load_config
from ngdiff.data import collate, encode_task
from ngdiff.finetune import FinetuneConfig, finetune
from ngdiff.modeling import load_tokenizer
from ngdiff.objectives import FORGET_OBJECTIVES, NLL, build_objectives
from ngdiff.pipeline import run_training
from parallel.base import DistContext

# what the tiny model (2 layers) and the test's data need beyond the defaults
OBJECTIVE_OVERRIDES = {"dpo": ("data.alternate_key=alternate",), "rmu": ("method.rmu_layer=model.layers.1",)}


@pytest.fixture(scope="module")
def learned_model_dir(tiny_model_dir, tofu_split, tmp_path_factory):
    """The tiny model fine-tuned on forget + retain: unlearning needs something learned to remove.

    The untrained tiny model sits at NLL ~ ln(vocab) on every answer, where *any* training (the IdK
    refusals included, which share the frame, EOS and frequent tokens with the true answers) lowers it.
    And SimNPO's per-sequence weight sigmoid(-beta (NLL/|y| - gamma)) is ~1e-5 at NLL/|y| = 4.5 with
    beta 2.5: SimNPO, by design, stops pushing on answers it already finds unlikely, so the forget set
    must be learned well for it to move in a few steps.
    """
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = [
        e for key in ("forget", "retain") for e in encode_task(DataConfig(), tokenizer, str(tofu_split[key]), key)
    ]
    return finetune(
        tiny_model_dir,
        tokenizer,
        examples,
        tmp_path_factory.mktemp("learned"),
        FinetuneConfig(epochs=30, batch_size=8, lr=3e-3, warmup_steps=5),
        progress=False,
    )


def forget_nll(model, examples, pad_id: int, objective=None) -> float:
    objective = objective or NLL()
    batch = collate(examples, pad_id)
    with torch.no_grad():
        return float(objective.loss_sum(model, batch) / objective.count(batch))


# krum (TorchJD's Krum) needs at least 3 tasks (n_byzantine + 3 rows) and these runs have two; it is a
# robust-aggregation rule that picks one task's gradient, which with one retain and two forget tasks may be
# the retain gradient alone: it is not expected to unlearn, only to run (tests/distributed: k3_krum_sgd)
TWO_TASK_COMBINERS = sorted(set(COMBINERS) - {"krum"})
# Every objective meets every core combiner; every other combiner (BLUR, GRU, TorchJD's weightings) meets
# the two forget objectives of different shape (token NLL, sequence-level NPO). The full product (12 x 19)
# would take CI a quarter of an hour for no other path through the code.
CORE_COMBINERS = ("ga", "gdiff", "imtlg", "lossnorm", "mgda", "ngdiff", "pcgrad", "rlw")
PAIRS = [(o, c) for o in sorted(FORGET_OBJECTIVES) for c in CORE_COMBINERS] + [
    (o, c) for c in TWO_TASK_COMBINERS if c not in CORE_COMBINERS for o in ("nll", "npo")
]


@pytest.mark.slow  # 120 short runs: a few minutes on an idle machine
@pytest.mark.parametrize(("objective", "combiner"), PAIRS)
def test_a_few_sgd_steps_raise_the_forget_nll(learned_model_dir, tofu_split, tmp_path, objective, combiner):
    forget = tofu_split["forget_alternates" if objective == "dpo" else "forget"]
    cfg = load_config(
        None,
        [
            f"model.path={learned_model_dir}",
            f"data.forget={forget}",
            f"data.retain={tofu_split['retain']}",
            f"method.combiner={combiner}",
            f"method.forget_objective={objective}",
            "optim.name=sgd",
            "optim.lr=0.05",
            "optim.max_grad_norm=1.0",  # every combiner's step has the same bound: the test is about direction
            "train.max_steps=3",
            "train.forget_batch_size=16",
            "train.retain_batch_size=8",
            "logging.progress=false",
            f"output_dir={tmp_path / 'run'}",
            *OBJECTIVE_OVERRIDES.get(objective, ()),
        ],
    )
    tokenizer = load_tokenizer(str(learned_model_dir))
    if objective == "idk":  # the (question, refusal) pairs of the three steps (one epoch each)
        drawn = encode_task(cfg.data, tokenizer, cfg.data.forget[0], "forget", cfg.data.idk, seed=cfg.train.seed)
        examples = [drawn.draw(i, epoch) for epoch in range(3) for i in range(len(drawn))]
    else:
        examples = encode_task(cfg.data, tokenizer, cfg.data.forget[0], "forget")
    before = forget_nll(AutoModelForCausalLM.from_pretrained(learned_model_dir), examples, tokenizer.pad_token_id)
    if objective == "rmu":  # RMU moves an activation, not the NLL: the distance to its target must fall
        rmu = build_objectives("rmu", "nll", method=cfg.method, seed=cfg.train.seed)[0]
        before = forget_nll(
            AutoModelForCausalLM.from_pretrained(learned_model_dir), examples, tokenizer.pad_token_id, rmu
        )
    outcome = run_training(cfg, DistContext())
    after = forget_nll(
        outcome.trainer.backend.model, examples, tokenizer.pad_token_id, rmu if objective == "rmu" else None
    )
    if objective == "rmu":
        assert after > before, (
            f"rmu + {combiner}: minus the distance to the steering vector {before:.4f} -> {after:.4f}"
        )
    elif objective == "idk":
        assert after < before, f"idk + {combiner}: refusal NLL {before:.4f} -> {after:.4f}"
    else:
        assert after > before, f"{objective} + {combiner}: forget NLL {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("loss_forget", [0.7, -0.7])
def test_lossnorm_divides_by_the_magnitude_of_the_forget_quantity(loss_forget):
    """NPO/SimNPO/IdK report a negative forget quantity: w_F must stay negative (push it up)."""
    s = TaskStats.two(a=1.0, b=1.0, c=0.0, loss_retain=1.5, loss_forget=loss_forget)
    w = get_combiner("lossnorm")(s, CombinerOptions())
    assert w[1] == pytest.approx(-1 / 0.7)
    assert w[0] == pytest.approx(1 / 1.5)


@pytest.mark.parametrize("combiner", TWO_TASK_COMBINERS)
@pytest.mark.parametrize("loss_forget", [0.7, -13.9])
def test_every_combiner_pushes_the_forget_quantity_up_whatever_its_sign(combiner, loss_forget):
    """w_F <= 0 whether the forget quantity is an NLL (> 0) or NPO/SimNPO/IdK's negated loss (< 0)."""
    s = TaskStats.two(a=2.0, b=3.0, c=0.5, loss_retain=1.5, loss_forget=loss_forget, step=3)
    w = get_combiner(combiner)(s, CombinerOptions(seed=1))
    assert w[1] < 0 and w[0] >= 0
