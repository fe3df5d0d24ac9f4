"""The demo's whole path (tiny model, fine-tuning, unlearning, scoring) in its quick form."""

from __future__ import annotations

import json

from launcher.cli import main


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
    printed = capsys.readouterr().out
    assert "forget_rougeL_recall" in printed and "before" in printed
    # the last lines: where the model is, and the commands that come next, for this very output folder
    data = out / "data"
    eval_command = (
        f"ngdiff eval --model {out / 'final'} --forget {data / 'forget.jsonl'} --retain {data / 'retain.jsonl'}"
    )
    assert printed.rstrip().splitlines()[-3:] == [
        "next, evaluate it on the demo's own splits (truth ratio included) and plot the run:",
        f"  {eval_command}",
        f"  ngdiff plot {out}",
    ]
    assert f"final model: {out / 'final'}" in printed
    # the splits it unlearned, and their TOFU companions (paraphrased + perturbed answers, same questions)
    forget = [json.loads(line) for line in (data / "forget.jsonl").read_text().splitlines()]
    companions = [json.loads(line) for line in (data / "forget_perturbed.jsonl").read_text().splitlines()]
    assert len(forget) == 40 and [r["question"] for r in companions] == [r["question"] for r in forget]
    assert all(len(r["perturbed_answer"]) == 5 and r["paraphrased_answer"] for r in companions)
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2  # an earlier demo is not overwritten silently
    assert f"run `ngdiff demo --output-dir {out} --overwrite` to redo it" in capsys.readouterr().err
