"""summary.md and the report from hand-made result rows: known medians and geometric means, every seed shown,
no arithmetic mean of p-values, lr selection on the selection stage, verdicts on the confirmation stage
only, the report rebuilt from results.jsonl alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.study_cli import CONFIG_DIR
from ngdiff.study.report import report_files
from ngdiff.study.spec import StudyError, parse_study
from ngdiff.study.summary import analyse, summary_markdown

QUICK = CONFIG_DIR / "quick.yaml"
D_TARGET, U_TARGET = 0.8, 0.6


def study_raw() -> dict:
    raw = yaml.safe_load(QUICK.read_text())
    raw.update(
        lrs=[1e-3, 1e-2],
        methods={"A": ["method.combiner=ngdiff"], "B": ["method.combiner=gdiff"], "X": ["method.combiner=ga"]},
        exploratory=["X"],
        stages={
            "selection": {"seeds": [0, 1, 2]},
            "confirmation": {"worlds": [{}, {"name": "w2", "finetune": {"seed": 1}}], "seeds": [3, 4, 5, 6]},
        },
        comparisons=[{"method": "A", "reference": "B", "endpoint": "best_gap", "direction": "greater"}],
        plots={"lr_methods": ["A", "B"]},
    )
    return raw


def run(stage, world, method, lr, seed, d, u=0.59, fq=0.01, d_end=None) -> list[dict]:
    """Three rows of one run: the target (step 0), a point with D = d, the end point."""
    base = {"world": world, "stage": stage, "method": method, "lr": lr, "seed": seed}
    return [
        {**base, "step": 0, "ks_d": D_TARGET, "forget_ks_statistic": D_TARGET, "forget_quality": 1e-6,
         "model_utility": U_TARGET},
        {**base, "step": 5, "ks_d": d, "forget_ks_statistic": d, "forget_quality": fq, "model_utility": u},
        {**base, "step": 10, "ks_d": d_end or d, "forget_ks_statistic": d_end or d, "forget_quality": fq,
         "model_utility": u},
    ]  # fmt: skip


def hand_rows() -> list[dict]:
    rows = []
    # selection: A's best lr is 1e-2 (D 0.2, G 0.75), its 1e-3 cell only reaches D 0.6 (G 0.25);
    # A at 1e-2 has forget qualities 1e-4, 1e-3, 1e-1: median 1e-3, geometric mean 10^(-8/3), mean 0.0337
    for seed, fq in zip((0, 1, 2), (1e-4, 1e-3, 1e-1), strict=True):
        rows += run("selection", "base", "A", 1e-2, seed, 0.2, fq=fq)
        rows += run("selection", "base", "A", 1e-3, seed, 0.6)
        rows += run("selection", "base", "B", 1e-3, seed, 0.4)
        rows += run("selection", "base", "B", 1e-2, seed, 0.5, u=0.3)  # below the floor: only step 0 qualifies
        rows += run("selection", "base", "X", 1e-3, seed, 0.1)
    # confirmation: A beats B by 0.25 of G on every (world, seed), with a little noise
    for world in ("base", "w2"):
        for seed in (3, 4, 5, 6):
            jitter = 0.01 * ((seed * 7 + len(world)) % 3 - 1)
            rows += run("confirmation", world, "A", 1e-2, seed, 0.3 + jitter)
            rows += run("confirmation", world, "B", 1e-3, seed, 0.5)
    return rows


def test_summary_shows_medians_geometric_means_every_seed_and_a_verdict_with_its_ci():
    spec = parse_study(study_raw())
    analysis = analyse(hand_rows(), spec, n_boot=2000)
    assert analysis.selected == {"A": 1e-2, "B": 1e-3, "X": 1e-3}
    text = summary_markdown(analysis, ["confirmation__w2__X__lr1e-03__s3"], reference_utility=0.58)
    # A's selected cell: median G 0.75, median D 0.2, forget quality median 1e-3 and geometric mean 10^(-8/3)
    geo = 10 ** (-8 / 3)
    assert f"| A | 0.01 ✓ | 3 | 0.75 | 0.2 | 0.001 | {geo:.3g} | s0 0.0001, s1 0.001, s2 0.1 |" in text
    assert "0.0337" not in text  # never the arithmetic mean (0.0337) of the p-values
    assert "| B | 0.01 | 3 | 0 | 0.8 |" in text  # B at 1e-2 broke the floor: its best point is the target
    assert "| X (exploratory) | 0.001 ✓ |" in text
    (verdict,) = analysis.verdicts
    assert verdict.verdict == "supported" and verdict.n_pairs == 8 and verdict.n_worlds == 2
    assert verdict.ci_low > 0.2 and verdict.ci_high < 0.3 and verdict.estimate == pytest.approx(0.25, abs=0.01)
    assert f"- {verdict.sentence()} (lrs 0.01 vs 0.001)" in text
    assert "[0.2" in verdict.sentence() and "MDE" in verdict.sentence() and "2 worlds x 4 seeds: supported" in text
    assert "## Floor sensitivity" in text and "| A vs B on G | supported (" in text
    assert "Retain model (gold standard): utility = 0.58." in text
    assert "Runs not finished (1): confirmation__w2__X__lr1e-03__s3" in text


def test_verdicts_use_confirmation_rows_only_and_a_thin_design_says_so():
    spec = parse_study(study_raw())
    rows = hand_rows()
    # selection rows where B is far better than A would flip the verdict if they were used
    rows += run("selection", "base", "A", 1e-2, 9, 0.79) + run("selection", "base", "B", 1e-3, 9, 0.0001)
    (verdict,) = analyse(rows, spec, n_boot=2000).verdicts
    assert verdict.n_pairs == 8 and set(verdict.seeds_per_world) == {4}
    thin = [r for r in hand_rows() if not (r["stage"] == "confirmation" and (r["world"] == "w2" or r["seed"] > 4))]
    text = summary_markdown(analyse(thin, spec, n_boot=2000))
    (line,) = [line for line in text.splitlines() if line.startswith("- A vs B")]
    assert line.endswith("1 world x 2 seeds: inconclusive (below the design minimum of 2 worlds x 4 seeds) "
                         "(lrs 0.01 vs 0.001)")  # fmt: skip


def test_a_study_without_stages_says_its_verdicts_reuse_the_selection_runs():
    raw = study_raw()
    del raw["stages"]
    raw["seeds"] = [0, 1, 2]
    rows = [{**r, "stage": "grid"} for r in hand_rows() if r["stage"] == "selection"]
    text = summary_markdown(analyse(rows, parse_study(raw), n_boot=500))
    assert "no separate confirmation stage" in text
    assert "(lr selected on the same runs: no separate confirmation stage)" in text


def test_stages_select_on_the_selection_runs_then_confirm_each_method_at_its_lr():
    spec = parse_study(study_raw())
    assert {(r.stage, r.method) for r in spec.runs()} == {("selection", m) for m in "ABX"}
    # the verdict methods A, B: every lr x seed; the exploratory X is tuned on the first seed only
    assert len(spec.runs()) == 2 * 2 * 3 + 2 * 1
    confirmation = [r for r in spec.runs({"A": 1e-2, "B": 1e-3, "X": 1e-3}) if r.stage == "confirmation"]
    assert {(r.method, r.lr) for r in confirmation} == {("A", 1e-2), ("B", 1e-3)}  # X is exploratory
    assert {(r.world, r.seed) for r in confirmation} == {(w, s) for w in ("base", "w2") for s in (3, 4, 5, 6)}
    assert confirmation[0].run_id == "confirmation__base__A__lr1e-02__s3"
    assert spec.world_spec("w2").finetune.seed == 1 and spec.world_spec("base").finetune.seed == 0
    selection = len(spec.runs())
    assert spec.runs() == spec.runs({"A": 1e-2, "B": 1e-3})[:selection]  # Slurm indices never move


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw["comparisons"][0].update(reference="X"), "exploratory"),
        (lambda raw: raw["comparisons"][0].update(endpoint="best_quality"), "endpoint 'best_quality'"),
        (lambda raw: raw["comparisons"][0].update(method="C"), "comparisons[0].method names unknown method 'C'"),
        (lambda raw: raw["stages"]["confirmation"].update(seeds=[2, 3]), "reuses world 'base' with seed 2"),
        (lambda raw: raw["stages"].pop("confirmation"), "exactly selection and confirmation"),
        (lambda raw: raw["stages"]["selection"].update(worlds=[{"retain_authorz": 3}]), "retain_authorz"),
        (lambda raw: raw.update(exploratory=["Y"]), "exploratory names unknown method 'Y'"),
        (lambda raw: raw.update(keep_weights="yes"), "keep_weights must be true or false"),
        (lambda raw: raw.update(summary={"select_on": "best_quality"}), "summary.select_on 'best_quality'"),
    ],
)
def test_stage_and_comparison_errors_name_the_key(change, message):
    raw = study_raw()
    change(raw)
    with pytest.raises(StudyError) as err:
        parse_study(raw, "s.yaml")
    assert message in str(err.value) and "s.yaml" in str(err.value)


def test_the_report_is_rebuilt_from_results_jsonl_alone(tmp_path):
    rows = hand_rows()
    results = tmp_path / "committed" / "results.jsonl"
    results.parent.mkdir()
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study_raw()))
    out = tmp_path / "rebuilt"
    assert main(["study", "report", "--results", str(results), "--config", str(config), "--out", str(out)]) == 0
    direct = tmp_path / "direct"
    direct.mkdir()
    report_files(rows, parse_study(study_raw(), str(config)), direct)
    assert (out / "summary.md").read_text() == (direct / "summary.md").read_text()
    assert "2 worlds x 4 seeds: supported" in (out / "summary.md").read_text()
    for name in ("pareto.png", "pareto_all.png", "lr.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in results.parent.iterdir()) == ["results.jsonl"]  # nothing written beside it
    assert main(["study", "report", "--results", str(results), "--out", str(out)]) == 2  # no study.yaml beside it


def test_a_cell_whose_arithmetic_and_geometric_means_differ_reports_only_median_and_geometric_mean():
    spec = parse_study(study_raw())
    rows = []
    for seed, fq in zip((0, 1, 2), (1e-6, 1e-6, 0.9), strict=True):
        rows += run("selection", "base", "A", 1e-2, seed, 0.2, fq=fq)
        rows += run("selection", "base", "B", 1e-3, seed, 0.4)
    text = summary_markdown(analyse(rows, spec, n_boot=200))
    mean, geo = (1e-6 + 1e-6 + 0.9) / 3, math.exp((2 * math.log(1e-6) + math.log(0.9)) / 3)
    assert f"| 1e-06 | {geo:.3g} |" in text and f"{mean:.3g}" not in text
    assert "not tested (no confirmation runs of A, B yet)" in text


def test_kept_weights_follow_the_best_qualifying_point(tmp_path):
    from ngdiff.study.runner import keep_selected_weights

    class Backend:
        class ctx:
            is_main = True

        def export_pretrained(self, folder: Path, tokenizer, dtype: str) -> None:
            folder.mkdir(parents=True)
            (folder / "model.txt").write_text(f"{self.step} {dtype}")

        def barrier(self) -> None:
            pass

    backend = Backend()
    trajectory = {5: (0.5, 0.59), 10: (0.3, 0.50), 15: (0.4, 0.58), 20: (0.2, 0.57), 25: (0.25, 0.6)}

    def factory(backend, tokenizer):
        def evaluate(step, final=True):
            backend.step = step
            d, u = trajectory[step]
            return {"forget_ks_statistic": d, "model_utility": u}

        return evaluate

    folder = tmp_path / "weights" / "selected"
    evaluate = keep_selected_weights(factory, folder, {"forget_ks_statistic": 0.8, "model_utility": 0.6}, 0.95,
                                     "model_utility")(backend, None)  # fmt: skip
    saved = []
    for step in trajectory:
        evaluate(step)
        saved.append((folder / "model.txt").read_text() if folder.exists() else None)
    # floor 0.57: step 10 (utility 0.50) breaks it; 15 and 20 improve on the best D so far; 25 does not
    assert saved == ["5 bf16", "5 bf16", "15 bf16", "20 bf16", "20 bf16"]
    assert json.loads((folder / "point.json").read_text())["step"] == 20
    assert sorted(p.name for p in folder.parent.iterdir()) == ["selected"]  # no partial or old copy left


def test_the_confirmation_runs_join_the_plan_once_the_selection_has_finished(tmp_path):
    from ngdiff.study.runner import SELECTION_FILE, plan_study, replan, world_dir

    spec = parse_study(study_raw())
    study = tmp_path / "study"
    plan = plan_study(spec, study)
    assert {r.stage for r in plan.runs} == {"selection"}
    for label in ("base", "w2"):  # the worlds' records, as a built world leaves them
        folder = world_dir(spec, label, study)
        folder.mkdir(parents=True)
        target = {"forget_ks_statistic": D_TARGET, "forget_quality": 1e-6, "model_utility": U_TARGET}
        (folder / "world.json").write_text(json.dumps({"target_metrics": target}))
    assert world_dir(spec, "w2", study) == study / "worlds" / "w2"
    for index, r in enumerate(plan.runs):
        folder = plan.run_dir(r)
        folder.mkdir(parents=True)
        key = ("selection", r.method, r.lr, r.seed)
        rows = [row for row in hand_rows() if (row["stage"], row["method"], row["lr"], row["seed"]) == key]
        keep = ("step", "forget_ks_statistic", "forget_quality", "model_utility")
        metrics = [{**{k: row[k] for k in keep}, "eval_seconds": 1.0} for row in rows if row["step"] > 0]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        done = {"method": r.method, "lr": r.lr, "seed": r.seed, "stage": r.stage, "world": r.world, "steps": 10,
                "budget_epochs": 2.0}  # fmt: skip
        if index < len(plan.runs) - 1:
            (folder / "done.json").write_text(json.dumps(done))
    assert len(replan(plan).runs) == len(plan.runs)  # one selection run unfinished: no confirmation yet
    (folder / "done.json").write_text(json.dumps(done))
    confirmed = [r for r in replan(plan).runs if r.stage == "confirmation"]
    assert {(r.method, r.lr) for r in confirmed} == {("A", 1e-2), ("B", 1e-3)} and len(confirmed) == 16
    saved = json.loads((study / SELECTION_FILE).read_text())
    assert saved == {"endpoint": "best_gap", "fraction": 0.95, "lrs": {"A": 0.01, "B": 0.001, "X": 0.001}}


def test_a_second_retain_model_reaches_the_rows_and_marks_where_g_is_within_retraining_noise(tmp_path):
    from ngdiff.study.runner import study_rows
    from ngdiff.study.summary import Retrain, retrain_of

    spec = parse_study(study_raw())
    run_dir = tmp_path / "runs" / "one"
    run_dir.mkdir(parents=True)
    point = {"step": 5, "forget_ks_statistic": 0.2, "forget_quality": 0.01, "model_utility": 0.59}
    (run_dir / "metrics.jsonl").write_text(json.dumps({**point, "eval_seconds": 1.0}) + "\n")
    done = {"method": "A", "lr": 1e-2, "seed": 3, "stage": "confirmation", "world": "w2", "steps": 5}
    (run_dir / "done.json").write_text(json.dumps(done))
    target = {"forget_ks_statistic": D_TARGET, "forget_quality": 1e-6, "model_utility": U_TARGET}
    world = {"target_metrics": target, "reference_metrics": {"model_utility": 0.62}}
    calibration = {"d_retain_retain": 0.1, "forget_quality_ceiling": 0.99}
    rows = study_rows(spec, tmp_path, {"w2": {**world, "calibration": calibration}})
    assert (rows[0]["step"], rows[0]["retrain_ks_d"], rows[0]["retrain_forget_quality"]) == (0, 0.1, 0.99)
    assert retrain_of(rows) == {"w2": Retrain(0.1, 0.99)}
    assert retrain_of(study_rows(spec, tmp_path, {"w2": world})) == {}  # one retain model: no floor to show
    text = summary_markdown(analyse(hand_rows(), spec, n_boot=200), retrain=retrain_of(rows))
    # D_target 0.8 and a retrain at D 0.1: G above 1 - 0.1 / 0.8 = 0.875 is noise
    assert (
        "Target (world `w2`): D = 0.8, utility = 0.6, floor = 0.57. A second retain model (a retrain): D = 0.1, "
        "forget quality = 0.99; G above 0.875 is within retraining noise." in text
    )
    assert "Target (world `base`): D = 0.8, utility = 0.6, floor = 0.57.\n" in text


def test_each_world_states_its_own_retain_model_utility():
    from ngdiff.study.summary import reference_utilities_of

    rows = hand_rows()
    for row in rows:
        if row["step"] == 0:
            row["retain_model_utility"] = {"base": 0.62, "w2": 0.61}[row["world"]]
    utilities = reference_utilities_of(rows)
    assert utilities == {"base": 0.62, "w2": 0.61}
    text = summary_markdown(analyse(rows, parse_study(study_raw()), n_boot=200), reference_utility=utilities)
    assert "Retain model (gold standard, world `base`): utility = 0.62.\n" in text
    assert "Retain model (gold standard, world `w2`): utility = 0.61.\n" in text
    assert "Retain model (gold standard): utility" not in text
    for same in ({"base": 0.62}, {"base": 0.62, "w2": 0.62}):  # one world, or worlds that agree: one line
        text = summary_markdown(analyse(rows, parse_study(study_raw()), n_boot=200), reference_utility=same)
        assert "Retain model (gold standard): utility = 0.62.\n" in text and "world `w2`): utility" not in text
