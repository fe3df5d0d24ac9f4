"""configs/baselines/: every file loads and carries the published protocol (open-unlearning / TOFU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ngdiff.config import load_config

BASELINES = Path(__file__).parents[1] / "configs" / "baselines"


def test_every_method_has_a_config():
    stems = {p.stem for p in BASELINES.glob("*.yaml")}
    assert stems == {"ga", "gdiff", "npo", "simnpo", "idk", "ngdiff", "ngdiff_adamw"}


@pytest.mark.parametrize("path", sorted(BASELINES.glob("*.yaml")), ids=lambda p: p.stem)
def test_protocol(path):
    cfg = load_config(path)
    if path.stem == "ngdiff":  # AutoLR is valid under SGD only (docs/autolr.md): never AdamW + AutoLR
        assert (cfg.optim.name, cfg.optim.weight_decay, cfg.autolr.enabled) == ("sgd", 0.0, True)
    else:
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-5, 0.01)
        assert not cfg.autolr.enabled
    assert (cfg.data.prompt_template, cfg.eval.split, cfg.eval.max_items, cfg.eval.max_new_tokens) == (
        "llama2",
        "forget10",
        300,
        200,
    )
    if path.stem == "ngdiff":
        assert cfg.optim.schedule == "constant"
        return
    assert (cfg.optim.schedule, cfg.optim.warmup_epochs, cfg.train.epochs) == ("linear", 1.0, 10)
    # HF clips alpha*g_R + gamma*g_F at 1.0; ours is that direction divided by (alpha + gamma)
    c0 = cfg.method.gdiff_coefficient if cfg.method.combiner == "gdiff" else 1.0
    # NGDiff's direction is not a weighted sum of raw losses: the clip applies to it as HF applies its 1.0
    alpha_plus_gamma = {"ga": 1.0, "gdiff": 2.0, "npo": 2.0, "idk": 2.0, "simnpo": 1.125, "ngdiff_adamw": 1.0}
    alpha_plus_gamma = alpha_plus_gamma[path.stem]
    assert cfg.optim.max_grad_norm == pytest.approx(1.0 / alpha_plus_gamma)
    if path.stem == "simnpo":
        assert (cfg.method.simnpo_beta, cfg.method.simnpo_gamma, c0) == (4.5, 0.0, pytest.approx(1 / 1.125))
    if path.stem == "npo":
        assert cfg.method.npo_beta == 0.1


RUN_CONFIGS = sorted(p for d in ("", "baselines", "fsdp", "deepspeed") for p in (BASELINES.parent / d).glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(BASELINES.parent)))
def test_no_shipped_config_runs_autolr_under_adam(path):
    """AutoLR's fit is valid under SGD; under AdamW it grows the lr and retention is lost (docs/autolr.md)."""
    cfg = load_config(path)
    assert not (cfg.autolr.enabled and cfg.optim.name != "sgd"), (cfg.optim.name, cfg.autolr.enabled)
