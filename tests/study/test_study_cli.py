"""`ngdiff study`: config checks before anything is built, the quick grid end to end, resumption,
the report command and the Slurm scripts."""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.study_cli import CONFIG_DIR, array_ranges, render_study_script
from ngdiff.study.runner import plan_study
from ngdiff.study.spec import StudyError, load_study, parse_study
from ngdiff.study.world import forget_authors

QUICK = CONFIG_DIR / "quick.yaml"


def quick_raw() -> dict:
    return yaml.safe_load(QUICK.read_text())


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_configs_validate_every_run(tmp_path):
    spec = load_study(CONFIG_DIR / "default.yaml")
    default = plan_study(spec, tmp_path / "d")
    methods = {r.method for r in default.runs}
    assert len(methods) == 31 and spec.eval_every == 5
    screened = {m.name for m in spec.methods if len(m.lrs) == 2}  # the exploratory screen of the other methods
    assert len(screened) == 16 and screened <= set(spec.exploratory)
    for method in methods - screened:  # every other method: 5 lrs x3.16 apart, two decades
        lrs = sorted({r.lr for r in default.runs if r.method == method and r.stage == "selection"})
        assert len(lrs) == 5 and lrs[-1] / lrs[0] == pytest.approx(100, rel=0.01)
        assert all(b / a == pytest.approx(10**0.5, rel=0.01) for a, b in itertools.pairwise(lrs))
    verdict_methods = {name for c in spec.comparisons for name in (c.method, c.reference)}
    assert verdict_methods == {"gdiff", "gdiff-sgd", "npo", "ngdiff", "ngdiff-adamw", "ngdiff+autolr"}
    assert not verdict_methods & set(spec.exploratory) and methods == verdict_methods | set(spec.exploratory)
    every = spec.runs({m.name: m.lrs[0] for m in spec.methods})
    tuning = {m: sum(r.method == m and r.stage == "selection" for r in every) for m in verdict_methods}
    assert set(tuning.values()) == {10}  # equal tuning budgets: 5 lrs x 2 seeds
    for method in verdict_methods:  # >= 4 seeds on each of >= 2 worlds at the selected lr
        confirmed = [(r.world, r.seed) for r in every if r.method == method and r.stage == "confirmation"]
        worlds = {w for w, _ in confirmed}
        assert len(worlds) >= 2 and all(sum(w == x for x, _ in confirmed) >= 4 for w in worlds)
    claim2 = {r.lr for r in every if r.stage == "claim2"}
    assert max(claim2) / min(claim2) == pytest.approx(1000, rel=0.01)
    # the confirmation's worlds forget different authors, each with its own fine-tuning seed and a second
    # retain model (the retrain noise floor of D); their forget sets are the same size
    confirmation_worlds = sorted({r.world for r in every if r.stage == "confirmation"})
    worlds = [spec.world_spec(label) for label in confirmation_worlds]
    assert confirmation_worlds == ["base", "pair45"]
    assert len({(w.forget_split, *forget_authors(w)) for w in worlds}) == 2
    assert len({w.finetune.seed for w in worlds}) == 2 and all(w.second_retain_seed == 100 for w in worlds)
    assert all(len(forget_authors(w)) == 2 for w in worlds)
    quick = plan_study(load_study(QUICK), tmp_path / "q")
    assert len({r.method for r in quick.runs}) >= 4
    assert not (tmp_path / "d").exists() and not (tmp_path / "q").exists()  # validation builds nothing


def test_shipped_muse_configs_validate_every_run(tmp_path):
    spec = load_study(CONFIG_DIR / "muse_default.yaml")
    grid = plan_study(spec, tmp_path / "m")
    assert spec.world.kind == "muse" and not spec.exploratory
    verdict_methods = {name for c in spec.comparisons for name in (c.method, c.reference)}
    assert {r.method for r in grid.runs} == verdict_methods == {m.name for m in spec.methods}
    every = spec.runs({m.name: m.lrs[0] for m in spec.methods})
    grids = {m.name: m.lrs for m in spec.methods}
    sgd = {m.name for m in spec.methods if "optim.name=sgd" in m.overrides}
    assert sgd == {"ngdiff", "ngdiff+autolr", "gdiff-sgd"}
    assert len({grids[m] for m in sgd}) == 1 and len({grids[m] for m in verdict_methods - sgd}) == 1
    for lrs in grids.values():  # 5 lrs x3.16 apart, two decades, per optimizer family
        assert len(lrs) == 5 and lrs[-1] / lrs[0] == pytest.approx(100, rel=0.01)
    tuning = {m: sum(r.method == m and r.stage == "selection" for r in every) for m in verdict_methods}
    assert set(tuning.values()) == {10}  # equal tuning budgets: 5 lrs x 2 seeds
    for method in verdict_methods:  # >= 4 fresh seeds on each of 2 worlds at the selected lr
        confirmed = [(r.world, r.seed) for r in every if r.method == method and r.stage == "confirmation"]
        assert {w for w, _ in confirmed} == {"base", "ft1"} and len(confirmed) == 8
        assert not {s for _, s in confirmed} & {r.seed for r in every if r.stage == "selection"}
    # the replicate world differs from the study's own only in the seed of its initialisation and fine-tuning
    assert spec.world_spec("ft1") == replace(spec.world, finetune=replace(spec.world.finetune, seed=1))
    quick = plan_study(load_study(CONFIG_DIR / "muse_quick.yaml"), tmp_path / "q")
    assert len({r.method for r in quick.runs}) == 4
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists()  # validation builds nothing


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.update(lrz=[1]), "unknown key lrz (did you mean lrs?)"),
        (lambda raw: raw["world"].update(retain_author=3), "world.retain_author (did you mean world.retain_authors?)"),
        (lambda raw: raw.update(lrs=[]), "lrs must be a non-empty list"),
        (lambda raw: raw.update(lrs=[1e-3, "fast"]), "lrs must be a number, got 'fast'"),
        (lambda raw: raw.update(eval_every=0), "eval_every"),
        (lambda raw: raw["methods"].update(bad="method.combiner=ngdiff"), "methods.bad must be a list"),
        (lambda raw: raw["world"].update(kind="gpu"), "world.kind must be cpu, muse or cluster"),
        (lambda raw: raw.update(plots={"lr_methods": ["nope"]}), "plots.lr_methods names unknown method 'nope'"),
    ],
)
def test_study_config_errors_name_the_key(tmp_path, change, message):
    raw = quick_raw()
    change(raw)
    with pytest.raises(StudyError) as err:
        parse_study(raw, "s.yaml")
    assert message in str(err.value) and "s.yaml" in str(err.value)


def test_a_bad_method_override_names_the_method_before_anything_is_built(tmp_path, capsys):
    raw = quick_raw()
    raw["methods"]["broken"] = ["method.combiner=ngdif"]
    out = tmp_path / "out"
    assert main(["study", str(write(tmp_path, raw)), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "method 'broken'" in err and "did you mean ngdiff?" in err
    assert not out.exists()
    raw["methods"]["broken"] = ["optim.nmae=sgd"]
    with pytest.raises(StudyError, match=r"method 'broken'.*optim\.name"):
        plan_study(parse_study(raw), out)


@pytest.mark.parametrize("flags", [["--dry-run"], ["--partition", "cpu", "--time", "00:10:00"]])
def test_a_slurm_option_without_slurm_is_refused_before_anything_runs(tmp_path, capsys, flags):
    out = tmp_path / "out"
    assert main(["study", "--quick", "--output-dir", str(out), *flags]) == 2
    assert f"{', '.join(f for f in flags if f.startswith('--'))} only apply with --slurm" in capsys.readouterr().err
    assert not out.exists()  # a dry run here once ran the whole study


def test_array_ranges():
    assert array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_ranges([3]) == "3"


def test_slurm_scripts_run_the_world_one_task_per_run_and_the_report(tmp_path):
    args = argparse.Namespace(
        python="/opt/py", partition="cpu", time="00:30:00", account="", gpus_per_task=1, cpus_per_task=2
    )
    study = tmp_path / "s"
    script = render_study_script("array", study, args, array="0-2,5", dependency="afterok:12")
    lines = script.splitlines()
    for directive in ("--array=0-2,5", "--dependency=afterok:12", "--requeue", "--partition=cpu", "--gpus-per-task=1"):
        assert f"#SBATCH {directive}" in lines
    assert f'exec /opt/py -m launcher study run-one {study.resolve()} "$SLURM_ARRAY_TASK_ID"' in lines
    report = render_study_script("report", study, args)
    assert f"exec /opt/py -m launcher study report {study.resolve()}" in report and "--gpus-per-task" not in report


@pytest.fixture
def one_thread():
    """The quick world's models are too small for a second thread to help, and on a shared machine torch's two
    threads wait on each other: the quick study took 16 min at a load average of 7 with them, 2 min with one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # `ngdiff study --quick`: about 1 minute on an idle 2-core machine (the world is most of it)
def test_quick_study_end_to_end_then_resumes_without_redoing_anything(tmp_path, capsys, one_thread):
    out = tmp_path / "quick"
    # two worker processes run the 4 runs (ngdiff.study.workers), each run's output in its own log
    assert main(["study", "--quick", "--output-dir", str(out), "--no-progress", "--workers", "2"]) == 0
    assert len(list((out / "logs").glob("*__s0.log"))) == 4
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert len(methods) >= 4
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        assert [r["step"] for r in mine] == [0, 5, 10, 15, 20]  # the target, then every eval_every steps
        for r in mine:
            assert 0.0 <= r["forget_quality"] <= 1.0 and 0.0 <= r["model_utility"] <= 1.0
            assert {"lr", "seed", "forget_rougeL_recall", "retain_rougeL_recall"} <= set(r)
        assert mine[-1]["loss_forget"] is not None and mine[-1]["lr_now"] > 0
    # the quick world is healthy: the target recites its forget set, the retain model does not, and the
    # target's utility is above 0; so the summary ranks the methods: each one's row, its selected lr marked
    world = json.loads((out / "world" / "world.json").read_text())
    target, retain = world["target_metrics"], world["reference_metrics"]
    assert world["health"] == {"healthy": True, "reasons": []}
    assert target["forget_rougeL_recall"] >= 0.3 and target["model_utility"] > 0
    assert target["forget_ks_statistic"] >= 0.2 and retain["forget_rougeL_recall"] < target["forget_rougeL_recall"]
    summary = (out / "summary.md").read_text()
    assert "World unhealthy" not in summary and "Per run, the best point is" in summary
    assert f"Target (world `base`): D = {target['forget_ks_statistic']:.4g}" in summary
    for method in methods:  # one row per method (one lr each), marked as its selected lr
        assert sum(line.startswith(f"| {method} | ") and " ✓ |" in line for line in summary.splitlines()) == 1
    for name in ("pareto.png", "pareto_all.png", "lr.png", "autolr.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # the rows alone (no world, no run folders) give the same summary and every picture
    rebuilt = tmp_path / "rebuilt"
    assert main(["study", "report", "--results", str(out / "results.jsonl"), "--out", str(rebuilt)]) == 0
    assert (rebuilt / "summary.md").read_text() == summary
    assert "## Cost" in summary and "| grid | 4 |" in summary  # from cost.json beside the rows
    for name in ("pareto.png", "pareto_all.png", "lr.png", "autolr.png"):
        assert (rebuilt / name).read_bytes()[:4] == b"\x89PNG"
    assert {(r["world"], r["stage"]) for r in rows} == {("base", "grid")}
    assert all(r["ks_d"] == r["forget_ks_statistic"] for r in rows)
    # every run keeps its end point's weights in bf16, and its selected point's (or names the target)
    import torch
    from transformers import AutoModelForCausalLM

    from ngdiff.study.endpoints import endpoints

    best_step = {e.method: e.best_step for e in endpoints(rows)}
    for weights in sorted((out / "runs").glob("*/weights")):
        end = AutoModelForCausalLM.from_pretrained(weights / "end")
        assert next(end.parameters()).dtype == torch.bfloat16
        point = json.loads((weights / "selected" / "point.json").read_text())
        method = json.loads((weights.parent / "done.json").read_text())["method"]
        assert point["step"] == best_step[method]  # the rule of the summary (smallest D above the floor)
        if point["step"] > 0:
            assert AutoModelForCausalLM.from_pretrained(weights / "selected").num_parameters() == end.num_parameters()
    assert len(list((out / "runs").glob("*/weights/end"))) == 4
    world_mtime = (out / "world" / "world.json").stat().st_mtime
    capsys.readouterr()
    # again: every run is finished, the world is cached; nothing is redone and the report is the same
    assert main(["study", "--quick", "--output-dir", str(out), "--no-progress"]) == 0
    assert "4 already finished" in capsys.readouterr().out
    assert (out / "world" / "world.json").stat().st_mtime == world_mtime
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == rows
    assert main(["study", "report", str(out)]) == 0
    # privacy and attacks on the kept weights: each method's selected point and the retain model once
    attack = ["study", "attack", str(out), "--relearn-steps", "1", "--no-progress"]
    assert main(attack) == 0
    scored = [json.loads(line) for line in (out / "attacks.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in scored) == sorted([*methods, "retain model"])
    yardstick = next(r for r in scored if r["method"] == "retain model")
    assert yardstick["privleak"] == 0.0  # the retain model against its own Min-K% AUC
    for r in scored:
        assert 0.0 <= r["mia_mink_auc"] <= 1.0 and -1.0 <= r["int4_recovery"] <= 1.0
        assert r["forget_items"] == world["info"]["eval_items"]["forget01_perturbed.jsonl"]
    summary = (out / "summary.md").read_text()
    assert "## Privacy and attacks (selected points)" in summary
    assert all(f"| {m} | 1 | " in summary.split("## Privacy and attacks")[1] for m in methods)
    assert (out / "attacks.png").read_bytes()[:4] == b"\x89PNG"
    before = (out / "attacks.jsonl").read_text()
    assert main(attack) == 0 and (out / "attacks.jsonl").read_text() == before  # nothing scored twice
    assert main([*attack[:-3], "--relearn-steps", "2"]) == 2  # other settings: refused, not mixed
    assert "scored with" in capsys.readouterr().err


def test_local_order_runs_every_first_seed_before_extra_seeds_and_the_lr_plot_methods_first(tmp_path):
    from ngdiff.study.runner import priority

    spec = load_study(CONFIG_DIR / "default.yaml")
    order = sorted(spec.runs(), key=lambda run: priority(spec, run))
    first_seed = [r for r in spec.runs() if r.seed == 0]
    assert order[: len(first_seed)] == sorted(first_seed, key=lambda run: priority(spec, run))
    head = {r.method for r in order[: len(spec.lrs) * len(spec.lr_plot_methods)]}
    assert head == set(spec.lr_plot_methods)
    assert sorted(order, key=lambda r: r.run_id) == sorted(spec.runs(), key=lambda r: r.run_id)  # nothing lost


def test_a_method_may_have_its_own_lr_grid_and_seeds():
    raw = quick_raw()
    raw["lrs"] = [1e-4, 1e-3]
    raw["methods"] = {"adam": ["method.combiner=gdiff"], "sgd": {"overrides": ["optim.name=sgd"], "lrs": [0.1, 1.0]}}
    raw["methods"]["sgd"]["seeds"] = [3, 4]
    runs = parse_study(raw).runs()
    assert [(r.method, r.lr, r.seed) for r in runs] == [
        ("adam", 1e-4, 0), ("adam", 1e-3, 0), ("sgd", 0.1, 3), ("sgd", 0.1, 4), ("sgd", 1.0, 3), ("sgd", 1.0, 4)
    ]  # fmt: skip
    raw["methods"]["sgd"]["lrs"] = [0.1, -1]
    with pytest.raises(StudyError, match=r"methods\.sgd\.lrs must be positive"):
        parse_study(raw)


CLUSTER_WORLD = {
    "kind": "cluster",
    "benchmark": "tofu",
    "target": "locuslab/tofu_ft_llama2-7b",
    "split": "forget10",
    "forget": "locuslab/TOFU:forget10",
    "retain": "locuslab/TOFU:retain90",
    "reference": "tests/fixtures/tofu_reference_eval_logs/llama2-7b_retain90_wd0.01_eval_log_forget.json",
}


def test_a_cluster_world_validates_every_run_without_touching_a_model(tmp_path):
    raw = {
        "world": dict(CLUSTER_WORLD),
        "common": ["data.prompt_template=llama2", "parallel.backend=fsdp"],
        "lrs": [1e-5, 1e-4],
        "eval_every": 5,
        "methods": {"gdiff": ["method.combiner=gdiff"], "ngdiff": ["method.combiner=ngdiff"]},
    }
    assert len(plan_study(parse_study(raw), tmp_path / "c").runs) == 4
    del raw["world"]["reference"]
    with pytest.raises(StudyError, match=r"world\.retain_model or world\.reference"):
        plan_study(parse_study(raw), tmp_path / "c")
    raw["world"]["reference"] = CLUSTER_WORLD["reference"]
    raw["common"] = ["data.prompt_template=nonsense"]
    with pytest.raises(StudyError, match="prompt_template"):
        plan_study(parse_study(raw), tmp_path / "c")
