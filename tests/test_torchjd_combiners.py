"""TorchJD's Gramian weightings as combiners (ngdiff/torchjd_adapter.py): the convention (ngdiff's direction is
TorchJD's aggregation of the task descent gradients), ranks agreeing, resumable state, and ngdiff's own MGDA,
PCGrad and IMTL-G against TorchJD's."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ngdiff.combiners import COMBINERS, CombinerOptions, TaskStats, get_combiner, min_norm_simplex, step_seed
from ngdiff.config import ConfigError, load_config
from ngdiff.errors import UserError
from ngdiff.torchjd_adapter import WEIGHTINGS

aggregation = pytest.importorskip("torchjd.aggregation")

OPTS = CombinerOptions(seed=7, cagrad_c=0.4, fairgrad_alpha=2.0)
ROLES = {2: ("retain", "forget"), 3: ("retain", "forget", "forget")}
SIGNS = {"retain": 1.0, "forget": -1.0}


def aggregator(name: str):
    """TorchJD's own aggregator of each combiner, with the combiner's settings."""
    return {
        "upgrad": lambda: aggregation.UPGrad(),
        "dualproj": lambda: aggregation.DualProj(),
        "cagrad": lambda: aggregation.CAGrad(c=OPTS.cagrad_c),
        "aligned_mtl": lambda: aggregation.AlignedMTL(),
        "fairgrad": lambda: aggregation.FairGrad(alpha=OPTS.fairgrad_alpha),
        "krum": lambda: aggregation.Krum(n_byzantine=0),
        "gradvac": lambda: aggregation.GradVac(),
        "pcd": lambda: aggregation.PCD(),
        "torchjd_mgda": lambda: aggregation.MGDA(),
        "torchjd_pcgrad": lambda: aggregation.PCGrad(),
        "torchjd_imtlg": lambda: aggregation.IMTLG(),
    }[name]()


def task_gradients(seed: int, k: int, n: int = 23) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.float64) * (1 + i) for i in range(k)]


def stats_of(grads: list[torch.Tensor], roles: tuple[str, ...], step: int = 0) -> TaskStats:
    gram = tuple(tuple(float(a @ b) for b in grads) for a in grads)
    return TaskStats(gram, tuple(1.0 for _ in grads), roles, step)


def ngdiff_direction(name, grads, roles, step=0, combiner=None) -> torch.Tensor:
    weights = (combiner or get_combiner(name))(stats_of(grads, roles, step), OPTS)
    return sum(w * g for w, g in zip(weights, grads, strict=True))


def torchjd_direction(name, grads, roles, step=0, agg=None) -> torch.Tensor:
    """TorchJD's aggregation of the stacked rows h_i = s_i g_i (PCD: the first forget task's row first),
    its global RNG seeded as the adapter seeds it."""
    rows = [SIGNS[role] * g for g, role in zip(grads, roles, strict=True)]
    if name == "pcd":
        first = roles.index("forget")
        rows.insert(0, rows.pop(first))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(step_seed(OPTS, step))
        return (agg or aggregator(name))(torch.stack(rows))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_upgrad_is_torchjds_upgrad_of_the_task_descent_gradients(seed, k):
    grads, roles = task_gradients(seed, k), ROLES[k]
    rows = torch.stack([SIGNS[role] * g for g, role in zip(grads, roles, strict=True)])
    torch.testing.assert_close(
        ngdiff_direction("upgrad", grads, roles), aggregation.UPGrad()(rows), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_weighting_equals_torchjds_aggregator(name, k):
    if k < WEIGHTINGS[name].min_tasks:
        pytest.skip(f"{name} needs {WEIGHTINGS[name].min_tasks} tasks")
    grads, roles = task_gradients(k, k), ROLES[k]
    # several steps: the stateful ones (GradVac, PCD) carry their state from step to step like TorchJD's
    combiner, agg = get_combiner(name), aggregator(name)
    for step in range(3):
        grads = [g + 0.3 * step * torch.roll(g, step) for g in grads]
        ours = ngdiff_direction(name, grads, roles, step, combiner)
        torch.testing.assert_close(ours, torchjd_direction(name, grads, roles, step, agg), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_ranks_agree_and_the_run_rng_is_untouched(name):
    """Two processes (two fresh combiners) get the same weights from the same all-reduced Gram matrix, and
    the randomised weightings' draws leave torch's global RNG where it was."""
    grads, roles = task_gradients(1, 3), ROLES[3]
    before = torch.get_rng_state()
    one, two = get_combiner(name), get_combiner(name)
    for step in range(3):
        s = stats_of(grads, roles, step)
        assert one(s, OPTS) == two(s, OPTS)
    assert torch.equal(torch.get_rng_state(), before)


def test_randomised_weightings_draw_per_step():
    """PCGrad's projection order is drawn from (seed, step): over steps, k = 3 meets more than one order."""
    # task (descent) gradients h = (1, 0), (-1, 1), (-1, -2) pairwise conflict, so the order matters
    grads = [torch.tensor(v, dtype=torch.float64) for v in ([1.0, 0.0], [1.0, -1.0], [1.0, 2.0])]
    weights = {get_combiner("torchjd_pcgrad")(stats_of(grads, ROLES[3], step), OPTS) for step in range(12)}
    assert len(weights) > 1


@pytest.mark.parametrize("name", ["gradvac", "pcd"])
def test_state_round_trips_through_the_json_trainer_state(name):
    """Stopped after 2 of 5 steps, its state written as JSON and loaded into a fresh combiner: steps 3-5 give
    exactly the weights of the uninterrupted combiner."""
    roles = ROLES[3]
    steps = [stats_of([g * (1 + 0.2 * t) + t for g in task_gradients(t, 3)], roles, t) for t in range(5)]
    uninterrupted = get_combiner(name)
    expected = [uninterrupted(s, OPTS) for s in steps]
    first = get_combiner(name)
    for s in steps[:2]:
        first(s, OPTS)
    state = json.loads(json.dumps(first.state_dict()))
    assert state, "a stateful weighting has state to save"
    resumed = get_combiner(name)
    resumed.load_state_dict(state)
    assert [resumed(s, OPTS) for s in steps[2:]] == expected[2:]
    assert resumed.state_dict() == json.loads(json.dumps(uninterrupted.state_dict()))
    restarted = get_combiner(name)  # without the state the weights differ: the test can fail
    assert [restarted(s, OPTS) for s in steps[2:]] != expected[2:]


def test_stateless_weightings_have_no_state():
    combiner = get_combiner("upgrad")
    combiner(stats_of(task_gradients(0, 2), ROLES[2]), OPTS)
    assert combiner.state_dict() == {}


# ---------------------------------------------------------------------------- ngdiff's own vs TorchJD's


def random_gram(seed: int, k: int) -> TaskStats:
    return stats_of(task_gradients(100 + seed, k, n=7), ROLES[k], step=seed)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_pcgrad_equals_torchjds(seed, k):
    """Same algorithm: TorchJD skips j = i, ngdiff projects onto itself too (never a conflict, a no-op); with
    the same seed both draw the same orders (torch.randperm on a generator seeded alike)."""
    s = random_gram(seed, k)
    assert COMBINERS["pcgrad"](s, OPTS) == pytest.approx(COMBINERS["torchjd_pcgrad"](s, OPTS), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_imtlg_equals_torchjds_on_a_full_rank_gram(seed, k):
    """Equal projections on every unit task gradient is H alpha proportional to the norms: TorchJD's
    pinv(H) sqrt(diag H), normalised to sum 1, is ngdiff's solve where H is invertible."""
    s = random_gram(seed, k)
    assert COMBINERS["imtlg"](s, OPTS) == pytest.approx(COMBINERS["torchjd_imtlg"](s, OPTS), rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_mgda_equals_torchjds_for_two_tasks(seed):
    """For two tasks TorchJD's first Frank-Wolfe step (exact line search from the midpoint) is the closed
    form, so both give the min-norm point."""
    s = random_gram(seed, 2)
    assert COMBINERS["mgda"](s, OPTS) == pytest.approx(COMBINERS["torchjd_mgda"](s, OPTS), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_mgda_for_three_tasks_torchjd_stops_short_of_the_minimum(seed):
    """The documented difference: TorchJD runs Frank-Wolfe (at most 100 iterations, stopping once a step is
    below 1e-3), ngdiff solves the quadratic programme exactly. So |d| is never smaller for TorchJD's, and
    TorchJD's weights are an approximation of ngdiff's."""
    s = random_gram(seed, 3)
    H = s.task_gram()
    ours = np.abs(COMBINERS["mgda"](s, OPTS))
    theirs = np.abs(COMBINERS["torchjd_mgda"](s, OPTS))
    assert ours @ H @ ours <= theirs @ H @ theirs + 1e-12
    assert ours @ H @ ours == pytest.approx(theirs @ H @ theirs, rel=5e-2)
    np.testing.assert_allclose(ours, min_norm_simplex(H), atol=1e-12)


def test_mgda_for_three_tasks_differs_measurably_somewhere():
    """The difference above is real: on some Gram matrix TorchJD's weights are off by more than 1e-3."""
    gaps = []
    for seed in range(12):
        s = random_gram(seed, 3)
        gaps.append(np.abs(np.subtract(COMBINERS["mgda"](s, OPTS), COMBINERS["torchjd_mgda"](s, OPTS))).max())
    assert max(gaps) > 1e-3


# ---------------------------------------------------------------------------- errors


def test_a_missing_torchjd_is_one_config_error_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchjd" else real(name, *a))
    with pytest.raises(ConfigError, match=r'method.combiner=upgrad needs torchjd.*pip install "ngdiff\[torchjd\]"'):
        load_config(None, ["method.combiner=upgrad"], check_sources=False)
    with pytest.raises(UserError, match=r"pip install"):  # the Python API, past the config, says the same
        get_combiner("upgrad")(stats_of(task_gradients(0, 2), ROLES[2]), OPTS)


def test_krum_with_two_tasks_is_a_config_error():
    with pytest.raises(ConfigError, match=r"method\.combiner=krum needs at least 3 tasks"):
        load_config(None, ["method.combiner=krum", "data.forget=a.jsonl", "data.retain=b.jsonl"], check_sources=False)
    config = load_config(
        None, ["method.combiner=krum", "data.forget=a.jsonl,c.jsonl", "data.retain=b.jsonl"], check_sources=False
    )
    assert config.method.combiner == "krum"


def test_torchjd_imports_after_deepspeed_left_its_init_subclass_on_module():
    """After a zero.Init context, nn.Module keeps a non-chaining `__init_subclass__` (DeepSpeed restores it as
    an attribute); TorchJD's Module + Generic classes must still define (a fresh process: TorchJD unimported)."""
    script = (
        "import torch\n"
        "torch.nn.Module.__init_subclass__ = torch.nn.Module.__init_subclass__  # what DeepSpeed's exit leaves\n"
        "from ngdiff.combiners import TaskStats, get_combiner, CombinerOptions\n"
        "print(get_combiner('upgrad')(TaskStats.two(2.0, 3.0, 0.5, 1.0, 1.0), CombinerOptions()))\n"
        "assert '__init_subclass__' in vars(torch.nn.Module)  # DeepSpeed's leftover put back\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("(0.62")
