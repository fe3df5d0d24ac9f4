"""The demo's whole path (tiny model, fine-tuning, unlearning, scoring) in its quick form."""

from __future__ import annotations

import json

from launcher.cli import main
from ngdiff.demo import format_table, verdict


def test_quick_demo_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    keys = {"forget_rougeL_recall", "retain_rougeL_recall", "forget_loss", "retain_loss"}
    assert set(report["before"]) == keys and set(report["after"]) == keys
    for side in ("before", "after"):
        assert 0.0 <= report[side]["forget_rougeL_recall"] <= 1.0
        assert report[side]["forget_loss"] > 0 and report[side]["retain_loss"] > 0
    assert report["after"]["forget_loss"] > report["before"]["forget_loss"]  # NGDiff pushed the forget loss up
    assert report["steps"] == 4
    assert (out / "final" / "model.safetensors").is_file()
    captured = capsys.readouterr()
    printed = captured.out
    assert "quick: a smoke test of the demo's path" in printed and "they need not fall" in printed
    assert "forget_rougeL_recall" in printed and "before" in printed
    # the last lines: where the model is, and the commands that come next, for this very output folder
    data = out / "data"
    eval_command = (
        f"ngdiff eval --model {out / 'final'} --forget {data / 'forget.jsonl'} --retain {data / 'retain.jsonl'}"
    )
    before, after = report["before"], report["after"]
    smoke = (
        f"demo --quick: SMOKE TEST done, forget ROUGE-L {before['forget_rougeL_recall']:.3f} -> "
        f"{after['forget_rougeL_recall']:.3f} (target <= {0.5 * before['forget_rougeL_recall']:.3f}), retain "
        f"{before['retain_rougeL_recall']:.3f} -> {after['retain_rougeL_recall']:.3f} "
        f"(target >= {0.8 * before['retain_rougeL_recall']:.3f}); targets not expected (run `ngdiff demo` to test them)"
    )
    assert report["verdict"] == "SMOKE" and report["quick"] is True
    assert printed.rstrip().splitlines()[-4:] == [
        "next, evaluate it on the demo's own splits (truth ratio included) and plot the run:",
        f"  {eval_command}",
        f"  ngdiff plot {out}",
        smoke,
    ]
    assert "smoke test of NGDiff + AutoLR unlearning" in printed and " ratio\n" not in printed
    assert "metric                      before     after      target" in printed
    assert f"final model: {out / 'final'}" in printed
    # the splits it unlearned, and their TOFU companions (paraphrased + perturbed answers, same questions)
    forget = [json.loads(line) for line in (data / "forget.jsonl").read_text().splitlines()]
    companions = [json.loads(line) for line in (data / "forget_perturbed.jsonl").read_text().splitlines()]
    assert len(forget) == 40 and [r["question"] for r in companions] == [r["question"] for r in forget]
    assert all(len(r["perturbed_answer"]) == 5 and r["paraphrased_answer"] for r in companions)
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2  # an earlier demo is not overwritten silently
    assert f"run `ngdiff demo --output-dir {out} --overwrite` to redo it" in capsys.readouterr().err


def test_the_verdict_names_each_score_against_its_target():
    before = {"forget_rougeL_recall": 1.0, "retain_rougeL_recall": 0.988, "forget_loss": 0.01, "retain_loss": 0.01}
    after = {"forget_rougeL_recall": 0.152, "retain_rougeL_recall": 0.970, "forget_loss": 3.4, "retain_loss": 0.1}
    assert verdict(before, after) == (
        "PASS",
        "demo: PASS forget ROUGE-L 1.000 -> 0.152 (target <= 0.500), retain 0.988 -> 0.970 (target >= 0.790)",
    )
    eroded = {**after, "retain_rougeL_recall": 0.711}  # below 80% of 0.988
    assert verdict(before, eroded)[0] == "FAIL"
    assert verdict(before, {**after, "forget_rougeL_recall": 0.501})[0] == "FAIL"  # more than half recalled
    assert verdict(before, {**after, "forget_rougeL_recall": 0.5, "retain_rougeL_recall": 0.7904})[0] == "PASS"
    table = format_table(before, after).splitlines()
    assert table[0].split() == ["metric", "before", "after", "target"]
    assert table[1].split() == ["forget_rougeL_recall", "1.000", "0.152", "<=", "0.500"]
    assert table[3].split() == ["forget_loss", "0.010", "3.400"]  # losses have no target
