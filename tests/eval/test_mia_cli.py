"""`ngdiff eval --json` with the membership-inference keys, `--format open-unlearning`, `ngdiff attack` input checks."""

from __future__ import annotations

import json

import pytest

from launcher.cli import main
from launcher.eval_cli import JSON_KEYS


def test_json_keys_and_open_unlearning_files(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--benchmark", "tofu", "--model", str(tiny_model_dir), "--max-items", "3", "--max-new-tokens", "2"]
    capsys.readouterr()
    extra = ["--output", str(out), "--json", "--reference-model", str(tiny_model_dir), "--format", "open-unlearning"]
    assert main([*args, *extra]) == 0
    result = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object
    assert all(result[k] is not None for k in JSON_KEYS), result
    # the model as its own reference: every Reference score is 0, so the attack cannot tell (AUC 0.5), and
    # PrivLeak against its own Min-K% AUC is 0
    assert result["mia_reference_auc"] == pytest.approx(0.5)
    assert result["privleak"] == pytest.approx(0.0, abs=1e-6)
    items = json.loads((out / "items.json").read_text())
    assert (len(items["mia_forget"]), len(items["mia_holdout"]), len(items["forget_para"])) == (3, 3, 3)
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    assert summary["mia_min_k"] == pytest.approx(result["mia_mink_auc"])


def test_attack_bad_input_is_one_error(tiny_model_dir, capsys):
    assert main(["attack", str(tiny_model_dir), "--forget", "forget01", "--attacks", "shift,melt"]) == 2
    assert "--attacks" in capsys.readouterr().err
