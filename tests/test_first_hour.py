"""What a new user sees: quiet logs, DeepSpeed left unimported, and the run's picture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from ngdiff.plots import evaluation_keys, plot_run

REPO = Path(__file__).resolve().parents[1]
TRAIN_AND_REPORT = """
import sys
from launcher.cli import main
code = main(sys.argv[1:])
print("DEEPSPEED_IMPORTED" if "deepspeed" in sys.modules else "DEEPSPEED_NOT_IMPORTED")
sys.exit(code)
"""


def train_in_subprocess(tiny_model_dir, tofu_split, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "train",
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']}",
        f"data.retain={tofu_split['retain']}",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "train.max_steps=2",
        "logging.progress=false",
        f"output_dir={out}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # what a user's shell has: nothing set
    cmd = [sys.executable, "-c", TRAIN_AND_REPORT, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# quiet and --verbose on single, where transformers loads the model (its bar unless quiet); fsdp loads
# shard by shard itself, so it shows no transformers bar either way
@pytest.mark.parametrize(("backend", "verbose"), [("single", False), ("single", True), ("fsdp", False)])
def test_training_leaves_deepspeed_unimported_and_libraries_quiet(
    tiny_model_dir, tofu_split, tmp_path, backend, verbose
):
    extra = [f"parallel.backend={backend}", *(["--verbose"] if verbose else [])]
    proc = train_in_subprocess(tiny_model_dir, tofu_split, tmp_path / "run", *extra)
    assert "DEEPSPEED_NOT_IMPORTED" in proc.stdout  # the run saved final/ through transformers, without DeepSpeed
    assert "Setting accelerator" not in proc.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "final model written to" in proc.stderr  # ngdiff's own phase messages stay
    own = f"--forget {tofu_split['forget']} --retain {tofu_split['retain']}"
    assert (
        f"next: ngdiff eval --model {tmp_path / 'run' / 'final'} {own}; ngdiff plot {tmp_path / 'run'}" in proc.stderr
    )
    assert ("Loading weights" in proc.stderr) == (verbose and backend == "single")
    assert "Writing model shards" not in proc.stderr  # final/ is written by ngdiff's streaming exporter


def write_metrics(run: Path) -> None:
    rows = []
    for step in range(1, 9):
        row = {
            "step": step,
            "loss_retain": 1.0 / step,
            "loss_forget": 0.5 * step,
            "grad_norm_retain": 2.0,
            "grad_norm_forget": 3.0 + step,
            "cos_retain_forget": 0.1,
            "w_retain": 0.5,
            "w_forget": -0.3,
            "lr": 1e-3,
            "step_seconds": 0.2,
            "tokens_per_second": 1000.0 + step,
            "peak_memory_mb": 600.0,
        }
        if step % 4 == 1:
            row.update({"autolr/accepted": float(step == 1), "autolr/lr_fitted": 2e-3, "autolr/r2": 0.9})
        rows.append(row)
    rows.append({"step": 8, "forget_rougeL_recall": 0.2, "retain_rougeL_recall": 0.9, "eval_seconds": 3.0})
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_draws_every_panel_of_a_run(tmp_path, capsys):
    import matplotlib.image

    run = tmp_path / "run"
    write_metrics(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert evaluation_keys(rows) == ["forget_rougeL_recall", "retain_rougeL_recall"]
    path = plot_run(run)
    assert path == run / "metrics.png"
    # 7 step panels + evaluation = 8 panels, 2 columns x 4 rows of 11 x 3 inches at 100 dpi
    assert matplotlib.image.imread(path).shape[:2] == (1200, 1100)

    assert main(["plot", str(run), "--output", str(tmp_path / "p" / "x.png")]) == 0
    assert f"plot written to {tmp_path / 'p' / 'x.png'}" in capsys.readouterr().out
    assert (tmp_path / "p" / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_folder_without_metrics_is_one_clear_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_eval_of_a_run_on_tofu_names_the_run_s_own_splits(tmp_path):
    from launcher.eval_cli import own_splits_hint

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    forget, retain = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    forget.write_text("{}\n")
    retain.write_text("{}\n")
    (run / "config.yaml").write_text(f"data:\n  forget: {forget}\n  retain: {retain}\n")
    hint = own_splits_hint(run / "final", "forget01")
    assert hint.endswith(f"ngdiff eval --model {run / 'final'} --forget {forget} --retain {retain}")
    assert "scores TOFU's forget01 authors instead" in hint
    (run / "config.yaml").write_text("data:\n  forget: locuslab/TOFU:forget10\n")
    assert own_splits_hint(run / "final", "forget10") is None  # trained on a hub split: nothing to suggest
    assert own_splits_hint(run, "forget01") is None  # not a run's final/


def test_plot_legends_are_words_and_the_run_s_stop_threshold_and_starting_lr_are_read(tmp_path):
    from ngdiff.plots import run_settings, words

    assert words("loss_forget") == "forget loss" and words("grad_norm_retain") == "retain gradient norm"
    assert words("cos_retain_forget") == "cosine of the retain and forget gradients"
    assert words("w_forget_b") == "weight of forget b" and words("lr") == "learning rate"
    assert run_settings(tmp_path) == (0.0, None)  # no config.yaml: nothing drawn
    (tmp_path / "config.yaml").write_text("train:\n  stop_forget_loss: 2.5\noptim:\n  lr: 0.05\n")
    assert run_settings(tmp_path) == (2.5, 0.05)
