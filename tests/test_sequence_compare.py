"""ngdiff.sequence.compare on hand-made sequence.json files (no model is trained)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ngdiff.errors import UserError
from ngdiff.sequence.compare import compare, family, find_runs, load_endpoints, report, sequence_endpoint, table

SETS = ["a.jsonl", "b.jsonl", "c.jsonl"]


def write(path: Path, matrix: list[list[float | None]], retain: float, sets: list[str] = SETS, **extra) -> Path:
    t = len(matrix)
    record = {
        "mode": "chain",
        "sets": sets,
        "requests": [{"index": i + 1, "evaluated": True} for i in range(t)],
        "matrix": {"forget_rougeL_recall": matrix, "forget_answer_loss": matrix},
        "utility": [{"retain_rougeL_recall": retain, "retain_answer_loss": 0.1} for _ in range(t)],
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def last_row(path: Path, row: list[float], retain: float, first: float = 0.2) -> Path:
    """A three-request sequence whose set 1 scored `first` after request 1 and `row` after request 3."""
    return write(path, [[first, 0.8, 0.8], [0.3, 0.3, 0.8], row], retain)


def test_end_points_after_the_last_request(tmp_path):
    point = sequence_endpoint("x", 1, last_row(tmp_path / "x_seed1.json", [0.25, 0.1, 0.4], 0.7, first=0.2))
    assert point.value("forget_mean") == pytest.approx(0.25)
    assert point.value("forget_worst") == pytest.approx(0.4)
    assert point.value("relapse") == pytest.approx(0.05)  # set 1: 0.2 after request 1, 0.25 after request 3
    assert point.value("retain") == pytest.approx(0.7)
    assert point.pair_key == (None, 1)
    with pytest.raises(UserError, match="unknown sequence end point 'nope'"):
        point.value("nope")


def runs_of(tmp_path: Path, offsets: dict[str, float], seeds=(1, 2, 3, 4), retain_cost: dict[str, float] | None = None):
    """Each arm's forget ROUGE-L = a large seed effect + the arm's offset (+ a small per-run wobble)."""
    runs = {}
    for arm, offset in offsets.items():
        for seed in seeds:
            base = 0.1 * seed + offset + 0.002 * ((seed * 7 + len(arm)) % 3)
            path = last_row(
                tmp_path / f"{arm}_seed{seed}" / "sequence.json", [base] * 3, 0.7 - (retain_cost or {}).get(arm, 0)
            )
            runs[(arm, seed)] = path
    return runs


def test_known_differences_give_the_right_verdicts(tmp_path):
    runs = runs_of(tmp_path, {"ref": 0.3, "better": 0.1, "same": 0.3}, retain_cost={"better": 0.05})
    points = load_endpoints(runs)
    result = compare(points, family([("better", "ref"), ("same", "ref")], ["forget_mean", "retain"]), n_boot=2000)
    by = {(v.comparison.method, v.comparison.field): v for v in result.verdicts}
    forget = by[("better", "forget_mean")]
    assert forget.estimate == pytest.approx(-0.2, abs=0.005)  # 0.2 lower, paired by seed despite the seed effect
    assert forget.ci_high < 0 and forget.verdict == "supported"  # lower forget ROUGE-L is the better side
    assert by[("better", "retain")].verdict == "contradicted"  # it kept less: the claim's other side
    assert by[("same", "forget_mean")].verdict == "inconclusive"
    assert "better vs ref on mean forget ROUGE-L: -0.2" in forget.sentence()
    assert "1 world x 4 seeds: supported" in forget.sentence()


def test_pairs_by_seed_and_lists_runs_without_a_partner(tmp_path):
    runs = runs_of(tmp_path, {"ref": 0.3, "arm": 0.2})
    runs.update(runs_of(tmp_path, {"arm": 0.2}, seeds=(9,)))  # seed 9 ran for one arm only
    result = compare(load_endpoints(runs), family([("arm", "ref")], ["forget_mean"]), n_boot=500)
    verdict = result.verdicts[0]
    assert verdict.n_pairs == 4 and verdict.estimate == pytest.approx(-0.1, abs=0.005)
    assert result.unpaired == [("arm", None, 9)]
    assert "Left out (no partner run of the same seed): arm seed 9" in report(result, ["forget_mean"])


def test_below_four_seeds_is_inconclusive_with_a_note(tmp_path):
    runs = runs_of(tmp_path, {"ref": 0.3, "arm": 0.1}, seeds=(1, 2, 3))
    verdict = compare(load_endpoints(runs), family([("arm", "ref")], ["forget_mean"]), n_boot=500).verdicts[0]
    assert verdict.ci_high < 0 and verdict.verdict == "inconclusive"
    assert "below the design minimum of 1 world x 4 seeds" in verdict.sentence()


def test_table_shows_every_seed(tmp_path):
    runs = runs_of(tmp_path, {"ref": 0.3}, seeds=(1, 2))
    lines = table(load_endpoints(runs), ["retain", "relapse"]).splitlines()
    assert lines[0] == "| end point | arm | seed 1 | seed 2 | mean |"
    assert lines[2] == "| retain ROUGE-L | ref | 0.700 | 0.700 | 0.700 |"
    assert lines[3].startswith("| set 1 relapse (ROUGE-L) | ref | 0.202 | 0.304 |")


def test_find_runs_reads_both_layouts(tmp_path):
    last_row(tmp_path / "ngdiff-chain_seed2" / "sequence.json", [0.1] * 3, 0.7)
    last_row(tmp_path / "npo-chain_seed10.json", [0.1] * 3, 0.7)
    (tmp_path / "notes.json").write_text("{}")
    assert set(find_runs(tmp_path)) == {("ngdiff-chain", 2), ("npo-chain", 10)}
    with pytest.raises(UserError, match="no <arm>_seed<k>"):
        find_runs(tmp_path / "notes.json")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("{not json"), "not a readable sequence.json"),
        (lambda p: p.write_text("[1, 2]"), "not a sequence.json"),
        (lambda p: write(p, [[0.1, 0.2], [0.1, None]], 0.7), "missing or non-finite cell in the last row"),
        (lambda p: write(p, [[0.1, 0.2]], 0.7), "two or more requests"),
        (lambda p: write(p, [[0.1, 0.2], [0.1]], 0.7), "must be a 2 x 2 list"),
        (lambda p: write(p, [[0.1, 0.2], [0.1, 0.2]], 0.7, utility=[None, None]), "utility\\[1\\] has no finite"),
        (
            lambda p: write(p, [[0.1, 0.2], [0.1, 0.2]], 0.7, requests=[{"index": 1, "evaluated": True}, {"index": 2}]),
            "request\\(s\\) \\[2\\] not evaluated",
        ),
    ],
)
def test_a_missing_or_malformed_file_is_named(tmp_path, make, message):
    path = tmp_path / "arm_seed1.json"
    make(path)
    with pytest.raises(UserError, match=message) as err:
        sequence_endpoint("arm", 1, path)
    assert str(path) in str(err.value)


def test_runs_of_different_requests_are_refused(tmp_path):
    runs = {
        ("a", 1): last_row(tmp_path / "a_seed1.json", [0.1] * 3, 0.7),
        ("b", 1): write(tmp_path / "b_seed1.json", [[0.1] * 3] * 3, 0.7, sets=["x", "y", "z"]),
    }
    with pytest.raises(UserError, match="compare sequences of the same requests"):
        load_endpoints(runs)


def test_family_directs_each_end_point_to_its_better_side():
    directions = {c.field: c.direction for c in family([("a", "b")])}
    assert directions == {"forget_mean": "less", "forget_worst": "less", "relapse": "less", "retain": "greater"}
    with pytest.raises(UserError, match="unknown sequence end point"):
        family([("a", "b")], ["forget_quality"])


def test_plot_of_the_end_points_is_written(tmp_path):
    from ngdiff.sequence.compare_plot import plot_endpoints

    points = load_endpoints(runs_of(tmp_path, {"ref": 0.3, "arm": 0.1}))
    path = plot_endpoints(points, tmp_path / "endpoints.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.glob("*.png")] == ["endpoints.png"]  # no partial file left behind
