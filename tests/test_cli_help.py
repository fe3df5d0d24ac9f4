"""What a new user reads: `ngdiff train --help`, `--version`, `ngdiff plan`'s table, and the errors that
name the fix (the other data format, `--model-config` when the hub cannot be asked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.cli import main
from ngdiff import __version__
from ngdiff.config import ExperimentConfig, load_config
from ngdiff.data import encode_task
from ngdiff.data.records import DataError

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"ngdiff {__version__}\n"


def test_train_help_lists_the_main_keys_with_their_defaults_examples_and_the_key_table(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("  ") and "." in line}
    defaults = ExperimentConfig()
    assert rows["optim.name"] == defaults.optim.name == "sgd"
    assert rows["optim.lr"] == str(defaults.optim.lr) == "0.05"
    assert rows["autolr.enabled"] == "true" and defaults.autolr.enabled is True
    assert rows["method.combiner"] == "ngdiff" and rows["train.save_every"] == str(defaults.train.save_every)
    assert "  ngdiff train configs/tofu_ngdiff.yaml parallel.backend=single" in text
    assert 'README.md, section "The config keys"' in text
    assert "## The config keys" in (REPO / "README.md").read_text()  # the pointer leads somewhere


def test_defaults_run_ngdiff_with_sgd_and_autolr_and_checkpoint(tiny_model_dir, tofu_split):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.forget={tofu_split['forget']}",
                             f"data.retain={tofu_split['retain']}"])  # fmt: skip
    assert (cfg.method.combiner, cfg.method.forget_objective, cfg.method.retain_objective) == ("ngdiff", "nll", "nll")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.autolr.enabled) == ("sgd", 0.05, 0.0, True)
    assert cfg.train.epochs == 5 and cfg.train.max_steps == 0 and cfg.train.save_every == 50


def test_few_steps_from_epochs_are_named_with_the_fix(tiny_model_dir, tofu_split):
    from types import SimpleNamespace

    from ngdiff.pipeline import few_steps_warning

    def cfg(*extra):
        return load_config(None, [f"model.path={tiny_model_dir}", f"data.forget={tofu_split['forget']}",
                                  f"data.retain={tofu_split['retain']}", *extra])  # fmt: skip

    forget = SimpleNamespace(role="forget", stream=SimpleNamespace(examples=[None] * 16))
    # 16 records at batch 8: 2 steps an epoch, 10 in the default 5 epochs
    assert few_steps_warning(cfg(), [forget], 10) == (
        "only 10 unlearning steps: train.epochs=5 over 16 forget records at train.forget_batch_size=8; "
        "for a longer run set train.max_steps (e.g. train.max_steps=40), more train.epochs or a smaller "
        "train.forget_batch_size"
    )
    assert few_steps_warning(cfg(), [forget], 20) == ""
    assert few_steps_warning(cfg("train.max_steps=3"), [forget], 3) == ""  # asked for: no warning


@pytest.mark.parametrize(
    ("fmt", "rows", "suggested"),
    [
        ("text", [{"question": "Who?", "answer": "Me."}], "its records hold the fields of data.format=tofu "
         "(question, answer): set data.format=tofu"),
        ("tofu", [{"text": "A sentence."}], "its records hold the fields of data.format=text (text): "
         "set data.format=text"),
    ],
)  # fmt: skip
def test_the_format_error_suggests_the_format_the_records_fit(tmp_path, fmt, rows, suggested):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ExperimentConfig().data
    data.format = fmt
    with pytest.raises(DataError) as err:
        encode_task(data, None, str(path), "forget set")
    missing = "text" if fmt == "text" else "question"
    assert str(err.value).startswith(f"forget set: line 1 of {path} lacks field {missing}")
    assert str(err.value).endswith(suggested)
    path.write_text(json.dumps({"other": "x"}) + "\n")  # fits neither: no suggestion
    with pytest.raises(DataError) as err:
        encode_task(data, None, str(path), "forget set")
    assert "data.format=" not in str(err.value)


def plannable_configs() -> list[Path]:
    """Every config under configs/ that `ngdiff plan` accepts (a study YAML is no run config)."""
    accepted = []
    for path in sorted((REPO / "configs").glob("**/*.yaml")):
        try:
            load_config(path, check_sources=False)
        except Exception:
            continue
        accepted.append(path)
    return accepted


def test_plan_runs_on_every_shipped_config(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name their DeepSpeed JSON relative to the repository
    configs = plannable_configs()
    assert any("zero3" in p.name for p in configs)  # DeepSpeed's "auto" sizes are read, not float()ed
    for path in configs:
        backend = load_config(path, check_sources=False).parallel.backend
        world = "1" if backend == "single" else "8"
        assert main(["plan", str(path), "--model-config", "llama2-7b", "--world-size", world]) == 0, path
        assert "fits" in capsys.readouterr().out, path


def test_plan_explains_its_lines_and_its_capacity(capsys):
    config = str(REPO / "configs/tofu_ngdiff.yaml")
    args = ["plan", config, "parallel.backend=fsdp", "model.gradient_checkpointing=true", "train.precision=bf16",
            "--model-config", "llama2-7b", "--world-size", "8"]  # fmt: skip
    assert main(args) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["activations"].split()[1:3] == ["0.0", "MiB"]
    assert (
        "1024 tokens/micro-batch, block inputs + one recomputed block (gradient checkpointing)" in lines["activations"]
    )
    assert "freed while the backward makes the gradients: none above them" in lines["activations"]
    assert lines["total"].endswith("of 80.00 GiB (the default; set yours with --gpu-memory, e.g. --gpu-memory 40GiB)")
    assert lines["optimizer_state"].endswith("none: plain SGD keeps no state")  # the config's SGD + AutoLR
    assert "step time: not estimated" in lines["not"]
    assert main([*args, "--gpu-memory", "40GiB"]) == 0
    assert "of 40.00 GiB\n" in capsys.readouterr().out


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_plan_of_a_hub_model_fails_fast_when_the_hub_cannot_be_asked(env, tmp_path):
    environ = {**os.environ, **env, "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "launcher", "plan", "configs/tofu_ngdiff.yaml"], cwd=REPO,
                          env=environ, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("ngdiff: config error: model.path=locuslab/tofu_ft_llama2-7b: its config.json is not cached")
    assert line.endswith("plan from a shape instead: --model-config llama2-7b | llama2-13b | llama2-70b | "
                         "path/to/config.json")  # fmt: skip
    print(f"\n{env}: refused after {time.monotonic() - started:.1f} s (process start included)")
