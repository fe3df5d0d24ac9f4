"""k tasks: the k-task combiners against their definitions, one k = 3 run (two forget sets, one retain
set) against a textbook computation, the task list's config, names and metrics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from transformers import AutoModelForCausalLM

from ngdiff.combiners import COMBINERS, FORGET, RETAIN, CombinerOptions, TaskStats, min_norm_simplex
from ngdiff.config import ConfigError, load_config
from ngdiff.metrics_log import read_jsonl
from ngdiff.modeling import load_tokenizer
from ngdiff.objectives import NLL
from ngdiff.pipeline import run_training
from ngdiff.tasks import stream_seed, task_names
from parallel.base import DistContext
from tests.conftest import stop_requested_in_step
from tests.test_trainer_single import first_global_batch

OPTS = CombinerOptions(gdiff_coefficient=0.3, seed=7)
ROLES3 = (RETAIN, FORGET, FORGET)


def stats_of(grads: list[torch.Tensor], roles=ROLES3, losses=None, step: int = 0) -> TaskStats:
    gram = tuple(tuple(float(a @ b) for b in grads) for a in grads)
    return TaskStats(gram, tuple(losses or [1.0 + i for i in range(len(grads))]), tuple(roles), step)


def direction(weights, grads: list[torch.Tensor]) -> torch.Tensor:
    return sum(w * g for w, g in zip(weights, grads, strict=True))


def task_gradients(grads, roles=ROLES3) -> list[torch.Tensor]:
    """h_i = s_i g_i: what each task descends."""
    return [g if role == RETAIN else -g for g, role in zip(grads, roles, strict=True)]


def random_grads(seed: int, k: int = 3, n: int = 11) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.float64) * (1 + i) for i in range(k)]


# ------------------------------------------------------------------------------ the combiners, k tasks
@pytest.mark.parametrize("seed", range(4))
def test_linear_combiners_on_three_tasks(seed):
    g_r, g_f1, g_f2 = grads = random_grads(seed)
    s = stats_of(grads, losses=[1.5, 0.7, -2.0])
    expected = {
        "ga": -(g_f1 + g_f2) / 2,
        "gdiff": 0.3 * g_r - 0.7 * (g_f1 + g_f2) / 2,
        "ngdiff": g_r / g_r.norm() - g_f1 / g_f1.norm() - g_f2 / g_f2.norm(),
        "lossnorm": g_r / 1.5 - g_f1 / 0.7 - g_f2 / 2.0,
    }
    for name, want in expected.items():
        torch.testing.assert_close(direction(COMBINERS[name](s, OPTS), grads), want, rtol=1e-12, atol=1e-12)


def brute_force_min_norm(h: list[torch.Tensor], steps: int = 400) -> tuple[np.ndarray, float]:
    """The best point of a grid of the simplex (k = 3), by the norm of the combination itself."""
    best, best_norm = None, math.inf
    stacked = torch.stack(h)
    for i in range(steps + 1):
        a = torch.full((steps + 1 - i,), i / steps, dtype=torch.float64)
        b = torch.arange(steps + 1 - i, dtype=torch.float64) / steps
        lam = torch.stack([a, b, 1 - a - b], 1)
        norms = (lam @ stacked).norm(dim=1)
        j = int(norms.argmin())
        if float(norms[j]) < best_norm:
            best, best_norm = lam[j].numpy(), float(norms[j])
    return best, best_norm


@pytest.mark.parametrize("seed", range(6))
def test_mgda_weights_match_a_brute_force_search_on_the_simplex(seed):
    grads = random_grads(seed, n=2 + seed % 3)  # n < k too: the min-norm point can be 0 (interior optimum)
    h = task_gradients(grads)
    w = COMBINERS["mgda"](stats_of(grads), OPTS)
    lam = np.array([w[0], -w[1], -w[2]])
    assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0)
    best, best_norm = brute_force_min_norm(h)
    ours = float(direction(lam.tolist(), h).norm())
    assert ours <= best_norm + 1e-12  # never worse than the best grid point
    assert ours == pytest.approx(best_norm, abs=5e-3 * max(float(g.norm()) for g in h))
    if best_norm > 1e-3:  # a unique minimiser: the weights agree to the grid's resolution
        np.testing.assert_allclose(lam, best, atol=2 / 400)


def test_mgda_exact_solution_agrees_with_a_generic_solver_for_four_tasks():
    for seed in range(5):
        h = random_grads(seed, k=4, n=6)
        H = (torch.stack(h) @ torch.stack(h).T).numpy()
        ours = min_norm_simplex(H)
        result = minimize(
            lambda x, H=H: x @ H @ x,
            np.full(4, 0.25),
            method="SLSQP",
            bounds=[(0, 1)] * 4,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        assert ours @ H @ ours <= result.fun + 1e-10


def pcgrad_textbook(h: list[torch.Tensor], seed: int, step: int) -> torch.Tensor:
    """LibMTL's PCGrad on explicit vectors: each task in its own random order (itself included)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    projected = []
    for i in range(len(h)):
        g = h[i].clone()
        for j in torch.randperm(len(h), generator=generator).tolist():
            dot = g @ h[j]
            if dot < 0:
                g = g - dot / (h[j] @ h[j]) * h[j]
        projected.append(g)
    return sum(projected)


@pytest.mark.parametrize("seed", range(8))
def test_pcgrad_on_three_tasks_matches_the_projection_algorithm(seed):
    grads = random_grads(seed)
    s = stats_of(grads, step=seed)
    got = direction(COMBINERS["pcgrad"](s, OPTS), grads)
    torch.testing.assert_close(got, pcgrad_textbook(task_gradients(grads), OPTS.seed, seed), rtol=1e-10, atol=1e-10)


def test_pcgrad_three_task_case_projects():
    """A case where projections happen (the test above must not pass on conflict-free draws alone)."""
    grads = [torch.tensor(v, dtype=torch.float64) for v in ([1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, -1.0, 1.0])]
    h = task_gradients(grads)
    assert any(float(a @ b) < 0 for a, b in itertools.combinations(h, 2))
    got = direction(COMBINERS["pcgrad"](stats_of(grads), OPTS), grads)
    assert not torch.allclose(got, sum(h))
    torch.testing.assert_close(got, pcgrad_textbook(h, OPTS.seed, 0))


@pytest.mark.parametrize("k", [3, 4])
def test_imtlg_projects_equally_on_every_unit_task_gradient(k):
    roles = (RETAIN,) + (FORGET,) * (k - 1)
    for seed in range(4):
        grads = random_grads(seed, k=k, n=9)
        w = COMBINERS["imtlg"](stats_of(grads, roles), OPTS)
        d = direction(w, grads)
        projections = [float(d @ (h / h.norm())) for h in task_gradients(grads, roles)]
        assert projections == pytest.approx([projections[0]] * k, rel=1e-8)
        assert sum(wi * (1 if r == RETAIN else -1) for wi, r in zip(w, roles, strict=True)) == pytest.approx(1.0)


def test_rlw_draws_one_weight_per_task():
    w = COMBINERS["rlw"](stats_of(random_grads(0)), OPTS)
    assert w[0] > 0 > w[1] and w[2] < 0 and w[0] - w[1] - w[2] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ names, config
def test_task_names():
    assert task_names("forget", ["a/forget01.jsonl"]) == ["forget"]
    assert task_names("forget", ["a/author1.jsonl", "b/author2.json"]) == ["forget_author1", "forget_author2"]
    assert task_names("forget", ["a/x.jsonl", "b/x.jsonl"]) == ["forget1", "forget2"]
    assert task_names("retain", ["locuslab/TOFU:retain90", "c.jsonl"]) == ["retain_TOFU", "retain_c"]
    assert [stream_seed(5, FORGET, 0), stream_seed(5, RETAIN, 0), stream_seed(5, FORGET, 1)] == [5, 6, 7]


def three_task_overrides(tiny_model_dir, tofu_split, out, *extra) -> list[str]:
    return [
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']},{tofu_split['forget_b']}",
        f"data.retain={tofu_split['retain']}",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "logging.progress=false",
        "autolr.enabled=false",  # plain steps, compared with the textbook formulas (AutoLR is on by default)
        f"output_dir={out}",
        *extra,
    ]


def test_config_lists_and_task_weights(tiny_model_dir, tofu_split, tmp_path):
    cfg = load_config(None, three_task_overrides(tiny_model_dir, tofu_split, tmp_path))
    assert cfg.data.forget == (str(tofu_split["forget"]), str(tofu_split["forget_b"]))
    assert cfg.data.retain == (str(tofu_split["retain"]),)
    with pytest.raises(ConfigError, match=r"method.task_weights has 2 values for 3 tasks"):
        load_config(None, three_task_overrides(tiny_model_dir, tofu_split, tmp_path, "method.task_weights=1,2"))
    with pytest.raises(ConfigError, match=r"data.forget\[1\]: data file not found"):
        missing = f"data.forget=[{tofu_split['forget']}, {tmp_path / 'nowhere.jsonl'}]"
        load_config(None, [*three_task_overrides(tiny_model_dir, tofu_split, tmp_path), missing])
    with pytest.raises(ConfigError, match="several TOFU splits"):
        load_config(
            None,
            ["data.forget=[locuslab/TOFU:forget01, locuslab/TOFU:forget05]", "data.retain=r", "model.path=m"],
            check_sources=False,
        )


# ------------------------------------------------------------------------------ a k = 3 run, one process
def mean_nll_and_grad(model, params, batch) -> tuple[float, torch.Tensor]:
    loss = NLL().loss_sum(model, batch) / NLL().count(batch)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


@pytest.mark.parametrize("combiner", ["ngdiff", "mgda", "pcgrad"])
def test_three_task_sgd_step_is_the_textbook_computation(tiny_model_dir, tofu_split, tmp_path, combiner):
    lr = 0.05
    out = tmp_path / "run"
    extra = ["optim.name=sgd", f"optim.lr={lr}", "train.max_steps=1", f"method.combiner={combiner}"]
    cfg = load_config(None, three_task_overrides(tiny_model_dir, tofu_split, out, *extra))
    seed = cfg.train.seed
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [
        first_global_batch(cfg, tokenizer, cfg.data.retain[0], stream_seed(seed, RETAIN, 0)),
        first_global_batch(cfg, tokenizer, cfg.data.forget[0], stream_seed(seed, FORGET, 0)),
        first_global_batch(cfg, tokenizer, cfg.data.forget[1], stream_seed(seed, FORGET, 1)),
    ]
    losses, (g_r, g_f1, g_f2) = zip(*(mean_nll_and_grad(model, params, b) for b in batches), strict=True)
    h = [g_r, -g_f1, -g_f2]  # the task gradients: descend retain, ascend both forget sets
    if combiner == "ngdiff":
        d = sum(v / v.norm() for v in h)
    elif combiner == "mgda":
        H = (torch.stack(h) @ torch.stack(h).T).numpy()
        solved = minimize(
            lambda x: x @ H @ x,
            np.full(3, 1 / 3),
            method="SLSQP",
            bounds=[(0, 1)] * 3,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            options={"ftol": 1e-16, "maxiter": 1000},
        )
        d = sum(float(lam) * v for lam, v in zip(solved.x, h, strict=True))
    else:
        d = pcgrad_textbook(h, seed, 0)
    start = torch.cat([p.detach().reshape(-1) for p in params]).double()
    expected = start - lr * d

    outcome = run_training(cfg, DistContext())
    got = torch.cat([p.detach().reshape(-1) for p in outcome.trainer.backend.model.parameters() if p.requires_grad])
    tolerance = 1e-6 if combiner != "mgda" else 1e-5  # the generic solver's own accuracy
    assert float((got.double() - expected).abs().max()) < tolerance * max(1.0, float(d.abs().max()))

    row = read_jsonl(out / "metrics.jsonl")[0]
    names = ("retain", "forget_forget", "forget_forget_b")
    assert outcome.trainer.names == names
    for name, g, loss in zip(names, (g_r, g_f1, g_f2), losses, strict=True):
        assert row[f"grad_norm_{name}"] == pytest.approx(float(g.norm()), rel=1e-5)
        assert row[f"loss_{name}"] == pytest.approx(loss, rel=1e-6)
    cos = float(g_f1 @ g_f2 / (g_f1.norm() * g_f2.norm()))
    assert row["cos_forget_forget_forget_forget_b"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert row["loss_forget"] == min(row["loss_forget_forget"], row["loss_forget_forget_b"])  # the least forgotten
    assert {"retain_stream", "forget_forget_stream", "forget_forget_b_stream"} <= set(outcome.trainer.state())


def test_task_weights_scale_each_task(tiny_model_dir, tofu_split, tmp_path):
    """method.task_weights lists data.forget's files, then data.retain's; the trainer applies them in its
    own order (retain first) on top of the combiner's weights."""
    runs = {}
    for label, weights in (("plain", []), ("weighted", ["method.task_weights=[2.0, 0.5, 3.0]"])):
        extra = ["optim.name=sgd", "optim.lr=0.05", "train.max_steps=1", *weights]
        cfg = load_config(None, three_task_overrides(tiny_model_dir, tofu_split, tmp_path / label, *extra))
        runs[label] = run_training(cfg, DistContext()).results[0].weights
    plain, weighted = runs["plain"], runs["weighted"]
    assert weighted == pytest.approx((3.0 * plain[0], 2.0 * plain[1], 0.5 * plain[2]), rel=1e-12)


def test_three_task_run_resumes_exactly(tiny_model_dir, tofu_split, tmp_path):
    """Every task's stream position is in the checkpoint: a stopped and resumed k = 3 run (PCGrad, whose
    projection order depends on the step, AutoLR with fresh probes drawing from every stream) ends where
    an uninterrupted one does."""
    extra = ["train.max_steps=5", "optim.name=sgd", "optim.lr=0.05", "method.combiner=pcgrad"]
    extra += ["autolr.enabled=true", "autolr.every=2", "autolr.probe_batch=fresh", "autolr.probe_loss=combined"]

    def params(outcome):
        return torch.cat([p.detach().reshape(-1) for p in outcome.trainer.backend.model.parameters()])

    straight = run_training(
        load_config(None, three_task_overrides(tiny_model_dir, tofu_split, tmp_path / "s", *extra)), DistContext()
    )

    stopped_cfg = load_config(None, three_task_overrides(tiny_model_dir, tofu_split, tmp_path / "r", *extra))
    assert run_training(stopped_cfg, DistContext(), on_trainer=stop_requested_in_step(1)).trainer.step_index == 2
    resumed_cfg = load_config(
        None, three_task_overrides(tiny_model_dir, tofu_split, tmp_path / "r", *extra, "train.resume=auto")
    )
    resumed = run_training(resumed_cfg, DistContext())
    assert resumed.trainer.step_index == 5
    assert float((params(straight) - params(resumed)).abs().max()) < 1e-6
