"""The MUSE-News CPU world (`world.kind: muse`): its data cut from the bundled files, its checks, its rows'
distance, and `configs/study/muse_quick.yaml` end to end (world, 4 runs, summary, rebuilt from the rows)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml

from launcher.cli import main
from launcher.study_cli import CONFIG_DIR
from ngdiff.eval.muse import MUSE_FILES
from ngdiff.study.endpoints import endpoints
from ngdiff.study.health import world_health
from ngdiff.study.muse_world import MUSE_DISTANCE, muse_world_data, with_distance, word_chunks
from ngdiff.study.runner import plan_study
from ngdiff.study.spec import StudyError, load_study, parse_study
from ngdiff.study.summary import rule_of

MUSE_QUICK = CONFIG_DIR / "muse_quick.yaml"


def test_word_chunks_never_span_two_texts_and_keep_whitespace():
    texts = ["a b c d e f g", "h i\n\nj k", "l"]
    # a text's last piece shorter than half a chunk ("g", "k", "l" at 3 words) is dropped
    assert word_chunks(texts, 3, 3) == ["a b c", "d e f", "h i\n\nj"]
    assert word_chunks(texts, 2, 5) == ["a b", "c d", "e f", "g", "h i"]
    with pytest.raises(StudyError, match="give 3 chunks of 3 words, fewer than the 4 asked"):
        word_chunks(texts, 3, 4)


def quick_world():
    return load_study(MUSE_QUICK).world


def test_world_data_follows_muse_layout_and_keeps_the_two_sides_apart():
    world = quick_world()
    sets = muse_world_data(world)
    muse = world.muse
    assert set(sets["evaluation"]) == set(MUSE_FILES.values())
    forget_chunks = sets["evaluation"]["privleak/forget.json"]
    assert len(forget_chunks) == muse.forget_chunks == len(sets["evaluation"]["privleak/holdout.json"])
    assert all(len(re.findall(r"\S+", c)) == muse.chunk_words for c in forget_chunks)
    # VerbMem: each prompt and its ground truth are one trained forget chunk, cut after prompt_words words
    for row, chunk in zip(sets["evaluation"]["verbmem/forget.json"], forget_chunks, strict=False):
        assert row["prompt"] + row["gt"] == chunk and len(row["prompt"].split()) == muse.prompt_words
    # KnowMem pairs are trained in the prompt's own format; the retain model never sees the forget side
    texts = {side: {r["text"] for r in sets[side]} for side in ("forget", "retain", "reference_train", "target_train")}
    qa = sets["evaluation"]["knowmem/forget_qa.json"]
    assert (
        len(qa) == muse.knowmem_items
        and f"Question: {qa[0]['question']}\nAnswer: {qa[0]['answer']}\n\n" in (texts["forget"])
    )
    assert set(forget_chunks) <= texts["forget"] and not texts["forget"] & texts["retain"]
    assert texts["reference_train"] == texts["retain"] and texts["target_train"] == texts["forget"] | texts["retain"]
    holdout = set(sets["evaluation"]["privleak/holdout.json"])
    assert not holdout & texts["target_train"]  # PrivLeak's non-members were never trained on
    assert sets["evaluation"]["knowmem/forget_qa_icl.json"] == []  # knowmem_shots: 0


def test_a_world_with_the_sustainability_folds_trains_them_into_the_target_only():
    from ngdiff import MUSE_DIR
    from ngdiff.study.muse_world import FOLD_ARTICLES

    world = quick_world()
    world = dataclasses.replace(world, muse=dataclasses.replace(world.muse, folds=4))
    sets, muse = muse_world_data(world), world.muse
    assert len(sets["folds"]) == 4
    for k, fold in enumerate(sets["folds"], start=1):
        articles = json.loads((MUSE_DIR / FOLD_ARTICLES[k - 1]).read_text())
        assert [r["text"] for r in fold] == word_chunks(articles, muse.chunk_words, muse.forget_chunks)
    # fold 1 is the forget set's chunks (its QA pairs are no fold's text); folds 2-4 are trained by the target alone
    assert sets["folds"][0] == sets["forget"][: muse.forget_chunks]
    later = [r for fold in sets["folds"][1:] for r in fold]
    assert sets["target_train"] == [*sets["retain"], *sets["forget"], *later]
    assert sets["reference_train"] == sets["retain"]
    texts = [r["text"] for fold in sets["folds"] for r in fold]
    assert len(set(texts)) == len(texts) == 4 * muse.forget_chunks  # the folds share no chunk
    assert muse_world_data(quick_world())["folds"] == sets["folds"][:1]  # folds 1: the world as before


@pytest.mark.parametrize(
    ("muse", "message"),
    [
        ({"chunk_words": 0}, "world.muse.chunk_words must be positive"),
        ({"knowmem_shots": 11}, "knowmem_shots must lie in 0..10"),
        ({"prompt_words": 40}, "prompt_words must lie in 1..chunk_words-1"),
        ({"verbmem_items": 13}, r"verbmem_items \(13\) exceeds forget_chunks \(12\)"),
        ({"knowmem_item": 3}, "unknown key world.muse.knowmem_item"),
        ({"folds": 5}, r"world.muse.folds must lie in 1..4 \(MUSE's sustainability folds\), got 5"),
    ],
)
def test_bad_muse_world_is_refused_before_anything_is_built(muse, message, tmp_path):
    raw = yaml.safe_load(MUSE_QUICK.read_text())
    raw["world"]["muse"] = {**raw["world"]["muse"], **muse}
    with pytest.raises(StudyError, match=message):
        plan_study(parse_study(raw, "muse.yaml"), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_rows_get_their_worlds_verbmem_distance_and_the_rule_ranks_by_it():
    rows = [{"world": "base", "step": 0, "verbmem_f": 74.0}, {"world": "base", "step": 4, "verbmem_f": 4.0}]
    out = with_distance(rows, {"base": {"verbmem_f": 10.0}})
    assert [r[MUSE_DISTANCE] for r in out] == [pytest.approx(0.64), pytest.approx(0.06)]  # over-forgetting counts
    assert rule_of(load_study(MUSE_QUICK)).distance_metric == MUSE_DISTANCE
    assert rule_of(load_study(CONFIG_DIR / "quick.yaml")).distance_metric == "forget_ks_statistic"


def test_health_of_a_muse_world():
    healthy = {"target_metrics": {"verbmem_f": 74.0}, "reference_metrics": {"verbmem_f": 10.0}}
    assert world_health(healthy).healthy
    unlearned = {"target_metrics": {"verbmem_f": 12.0}, "reference_metrics": {"verbmem_f": 10.0}}
    reasons = world_health(unlearned).reasons
    assert any("did not learn its forget texts (VerbMem 12 < 30)" in r for r in reasons)
    assert any("continue the forget texts alike" in r for r in reasons)


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # about 1.5 minutes on the shared 2-core machine, one thread (the world is half of it)
def test_muse_quick_study_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "muse"
    assert main(["study", str(MUSE_QUICK), "--output-dir", str(out), "--no-progress"]) == 0
    world = json.loads((out / "world" / "world.json").read_text())
    target, retain = world["target_metrics"], world["reference_metrics"]
    # the target recites its forget chunks and answers its forget questions; the retain model does neither,
    # and both answer the retain questions; the target's forget texts are members by Min-K%, the retain
    # model's PrivLeak is 0 by definition
    assert world["health"] == {"healthy": True, "reasons": []}
    assert target["verbmem_f"] >= 50 and retain["verbmem_f"] <= 25
    assert target["knowmem_f"] >= 80 and retain["knowmem_f"] <= 20
    assert target["knowmem_r"] >= 80 and retain["knowmem_r"] >= 80
    assert target["privleak"] < -50 and retain["privleak"] == 0.0
    assert target["privleak_auc"] < retain["privleak_auc"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert methods == {"ga", "gdiff", "npo", "ngdiff+autolr"}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        assert [r["step"] for r in mine] == [0, 4, 8, 12]
        for r in mine:
            assert 0 <= r["verbmem_f"] <= 100 and 0 <= r["knowmem_f"] <= 100 and 0 <= r["knowmem_r"] <= 100
            assert r[MUSE_DISTANCE] == pytest.approx(abs(r["verbmem_f"] - retain["verbmem_f"]) / 100)
            reference_auc = retain["privleak_auc"]
            assert r["privleak"] == pytest.approx((r["privleak_auc"] - reference_auc) / reference_auc * 100)
        assert mine[-1]["verbmem_f"] < mine[0]["verbmem_f"]  # every method unlearned some of the forget texts
    summary = (out / "summary.md").read_text()
    assert "World unhealthy" not in summary and "D = |VerbMem on the forget set - the retain model's| / 100" in summary
    assert f"Target (world `base`): D = {target[MUSE_DISTANCE]:.4g}, utility = {target['knowmem_r']:.4g}" in summary
    for method in methods:
        assert sum(line.startswith(f"| {method} | ") and " ✓ |" in line for line in summary.splitlines()) == 1
    for name in ("pareto.png", "pareto_all.png", "lr.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # every run keeps its selected point's weights by the same rule (smallest D above the floor), or names
    # the target when no evaluation beat it
    best_step = {e.method: e.best_step for e in endpoints(rows, rule_of(load_study(MUSE_QUICK)))}
    for done in sorted((out / "runs").glob("*/done.json")):
        point = json.loads((done.parent / "weights" / "selected" / "point.json").read_text())
        assert point["step"] == best_step[json.loads(done.read_text())["method"]]
        assert (done.parent / "weights" / "selected" / "config.json").is_file() == (point["step"] > 0)
    assert any(step > 0 for step in best_step.values())  # some method's selected point is an unlearned model
    # the rows alone (with the config) give the same summary
    rebuilt = tmp_path / "rebuilt"
    assert main(["study", "report", "--results", str(out / "results.jsonl"), "--config", str(MUSE_QUICK),
                 "--out", str(rebuilt)]) == 0  # fmt: skip
    assert (rebuilt / "summary.md").read_text() == summary
    capsys.readouterr()
    # again: nothing is redone
    assert main(["study", str(MUSE_QUICK), "--output-dir", str(out), "--no-progress"]) == 0
    assert "4 already finished" in capsys.readouterr().out
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == rows
    assert main(["study", "attack", str(out), "--no-progress"]) == 2
    assert "study attack scores TOFU worlds" in capsys.readouterr().err


def test_a_staged_muse_study_selects_each_lr_by_the_verbmem_distance_the_summary_ranks_by(tmp_path):
    from ngdiff.study.runner import SELECTION_FILE, replan, study_rows, world_dir
    from ngdiff.study.summary import analyse

    raw = yaml.safe_load(MUSE_QUICK.read_text())
    raw["methods"] = {"gdiff": raw["methods"]["gdiff"], "npo": raw["methods"]["npo"]}
    raw.update(lrs=[1e-4, 1e-3], stages={"selection": {"seeds": [0]}, "confirmation": {"seeds": [1]}})
    spec = parse_study(raw, "muse.yaml")
    study = tmp_path / "study"
    plan = plan_study(spec, study)
    folder = world_dir(spec, "base", study)
    folder.mkdir(parents=True)
    # the world's two models as its build records them, D included
    target = {"verbmem_f": 70.0, "knowmem_f": 100.0, "knowmem_r": 99.0, MUSE_DISTANCE: 0.6}
    retain = {"verbmem_f": 10.0, "knowmem_f": 5.0, "knowmem_r": 99.0, MUSE_DISTANCE: 0.0}
    (folder / "world.json").write_text(json.dumps({"target_metrics": target, "reference_metrics": retain}))
    # a run's metrics carry MUSE's numbers only, never D: VerbMem after 4 steps, by method and lr
    verbmem = {("gdiff", 1e-4): 60.0, ("gdiff", 1e-3): 20.0, ("npo", 1e-4): 12.0, ("npo", 1e-3): 0.0}
    for r in plan.runs:
        run = plan.run_dir(r)
        run.mkdir(parents=True)
        point = {"step": 4, "verbmem_f": verbmem[r.method, r.lr], "knowmem_f": 50.0, "knowmem_r": 99.0}
        (run / "metrics.jsonl").write_text(json.dumps({**point, "eval_seconds": 1.0}) + "\n")
        done = {"method": r.method, "lr": r.lr, "seed": r.seed, "stage": r.stage, "world": r.world, "steps": 4}
        (run / "done.json").write_text(json.dumps(done))
    # D: gdiff 0.5 at 1e-4, 0.1 at 1e-3; npo 0.02 at 1e-4, 0.1 at 1e-3 (over-forgetting counts). Read
    # without D, every run ties with the target and each method would run its smallest lr
    confirmed = {(r.method, r.lr) for r in replan(plan).runs if r.stage == "confirmation"}
    assert confirmed == {("gdiff", 1e-3), ("npo", 1e-4)}
    assert json.loads((study / SELECTION_FILE).read_text())["lrs"] == {"gdiff": 1e-3, "npo": 1e-4}
    # the summary ticks the same lrs, from the same rows (each with its D)
    rows = study_rows(spec, study)
    assert sorted({round(r[MUSE_DISTANCE], 9) for r in rows if r["step"] == 4}) == [0.02, 0.1, 0.5]
    assert analyse(rows, spec).selected == {"gdiff": 1e-3, "npo": 1e-4}
