"""The output folder: --overwrite deletes only what ngdiff wrote and never an input, the same run is known
under any spelling, a resume on changed data is refused, a run that never took a step does not block, and
token-shaped secrets never reach config.yaml or the W&B run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from ngdiff.config import ConfigError, load_config
from ngdiff.outputs import MARKER_NAME, check_output_dir, write_output_dir
from tests.conftest import tiny_run_overrides

HF_TOKEN = "hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z"
GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"


@pytest.fixture
def base(tofu_split, tiny_model_dir) -> list[str]:
    return tiny_run_overrides(tiny_model_dir, tofu_split, "train.max_steps=1")


def started(cfg, steps: int = 1, checkpoint: bool = False) -> Path:
    """Claim `cfg.output_dir` as train does, then leave what a run that took `steps` steps leaves."""
    check_output_dir(cfg, overwrite=False)
    out = write_output_dir(cfg, overwrite=False)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s + 1}) + "\n" for s in range(steps)))
    if checkpoint:
        (out / "checkpoints" / f"step_{steps:08d}").mkdir(parents=True)
        (out / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").write_text(str(steps))
    return out


# --------------------------------------------------------------------------- --overwrite deletes only ngdiff's


def test_overwrite_refuses_a_folder_whose_config_yaml_is_not_an_ngdiff_run(base, tmp_path, capsys):
    folder = tmp_path / "d"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.py").write_text("print(1)")
    (folder / "config.yaml").write_text("name: other\n")
    (folder / "thesis.tex").write_text("precious")
    assert main(["train", *base, f"output_dir={folder}", "--overwrite"]) == 2
    assert "holds no ngdiff run" in capsys.readouterr().err
    assert (folder / "thesis.tex").read_text() == "precious" and (folder / "src" / "main.py").is_file()
    assert (folder / "config.yaml").read_text() == "name: other\n"


def test_overwrite_removes_what_ngdiff_wrote_and_keeps_the_users_files(base, tmp_path):
    out = started(load_config(None, [*base, f"output_dir={tmp_path / 'run'}"]), checkpoint=True)
    (out / "final").mkdir()
    (out / "final" / "model.safetensors").write_text("weights")
    (out / "metrics.png").write_text("png")
    (out / "notes.txt").write_text("mine")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.py").write_text("mine too")
    other = load_config(None, [*base, f"output_dir={out}", "optim.lr=0.5"])
    check_output_dir(other, overwrite=True)
    write_output_dir(other, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["analysis", "config.yaml", MARKER_NAME, "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "analysis" / "plot.py").read_text() == "mine too"
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.5


def test_a_run_of_an_earlier_version_is_resumed_but_never_overwritten(base, tmp_path):
    out = tmp_path / "old"
    cfg = load_config(None, [*base, f"output_dir={out}", "train.resume=auto"])
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # no marker: older ngdiff
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"earlier ngdiff version .* --overwrite removes nothing there"):
        check_output_dir(cfg, overwrite=True)
    check_output_dir(cfg, overwrite=False)  # the same run resumes; the marker is written from now on
    write_output_dir(cfg, overwrite=False)
    assert json.loads((out / MARKER_NAME).read_text())["ngdiff_run"] == 1
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


# --------------------------------------------------------------------------- --overwrite never deletes an input


@pytest.mark.parametrize("key", ["model.path", "model.reference_path", "data.retain"])
def test_overwrite_refuses_to_delete_what_the_new_run_reads(base, tiny_model_dir, tofu_split, tmp_path, capsys, key):
    out = started(load_config(None, [*base, f"output_dir={tmp_path / 'run'}"]))
    shutil.copytree(tiny_model_dir, out / "final")
    (out / "eval").mkdir()
    shutil.copy(tofu_split["retain"], out / "eval" / "retain.jsonl")
    inside = {
        "model.path": out / "final",
        "model.reference_path": out / "final",
        "data.retain": out / "eval/retain.jsonl",
    }
    extra = ["method.forget_objective=npo"] if key == "model.reference_path" else []
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code = main(["train", *base, *extra, f"{key}={inside[key]}", f"output_dir={out}", "--overwrite"])
    err = capsys.readouterr().err
    assert (
        code == 2 and f"--overwrite would delete {inside[key].parent if key == 'data.retain' else inside[key]}" in err
    )
    assert key in err and "Traceback" not in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing was deleted


def test_the_demo_may_overwrite_the_model_and_data_it_makes_itself(base, tiny_model_dir, tmp_path):
    from ngdiff.demo import DEMO_ENTRIES

    out = tmp_path / "demo"
    made = [f"model.path={out / 'finetuned'}", f"output_dir={out}", "train.resume=auto"]
    cfg = load_config(None, [*[b for b in base if not b.startswith("model.path=")], *made], check_sources=False)
    check_output_dir(cfg, overwrite=False, own=DEMO_ENTRIES)
    write_output_dir(cfg, overwrite=False, own=DEMO_ENTRIES)
    shutil.copytree(tiny_model_dir, out / "finetuned")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="--overwrite would delete"):  # train into a demo's folder: its model
        check_output_dir(cfg, overwrite=True)
    check_output_dir(cfg, overwrite=True, own=DEMO_ENTRIES)  # the demo itself makes finetuned/ again
    write_output_dir(cfg, overwrite=True, own=DEMO_ENTRIES)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", MARKER_NAME]


# --------------------------------------------------------------------------- the same run under any spelling


def test_the_same_run_resumes_by_absolute_path_from_another_folder_and_after_a_move(
    base, tofu_split, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    shutil.copy(tofu_split["forget"], tmp_path / "forget.jsonl")
    relative = [b for b in base if not b.startswith("data.forget=")] + ["data.forget=forget.jsonl"]
    started(load_config(None, [*relative, "output_dir=runs/a"]), checkpoint=True)
    absolute = [b for b in base if not b.startswith("data.forget=")] + [f"data.forget={tmp_path / 'forget.jsonl'}"]
    check_output_dir(load_config(None, [*absolute, f"output_dir={tmp_path / 'runs/a'}", "train.resume=auto"]), False)
    monkeypatch.chdir(tmp_path / "runs")
    check_output_dir(load_config(None, [*absolute, "output_dir=./a/", "train.resume=auto"]), False)
    (tmp_path / "runs" / "a").rename(tmp_path / "moved")
    check_output_dir(load_config(None, [*absolute, f"output_dir={tmp_path / 'moved'}", "train.resume=auto"]), False)


def test_a_different_run_names_what_differs_and_never_offers_overwrite_over_checkpoints(base, tmp_path):
    out = started(load_config(None, [*base, f"output_dir={tmp_path / 'run'}", "optim.lr=0.001"]), checkpoint=True)
    other = load_config(None, [*base, f"output_dir={out}", "optim.lr=0.002", "train.seed=7", "train.resume=auto"])
    with pytest.raises(ConfigError) as refused:
        check_output_dir(other, overwrite=False)
    message = str(refused.value)
    assert "holds a different run" in message and "optim.lr: 0.001 -> 0.002" in message
    assert "train.seed: 42 -> 7" in message and "--overwrite" not in message
    shutil.rmtree(out / "checkpoints")  # a run without checkpoints may be replaced: then the flag is named
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.002.*pass --overwrite"):
        check_output_dir(other, overwrite=False)


# --------------------------------------------------------------------------- changed data on resume


def test_resume_refuses_a_data_file_whose_rows_changed_unless_asked(base, tofu_split, tmp_path):
    forget = tmp_path / "forget.jsonl"
    shutil.copy(tofu_split["forget"], forget)
    args = [
        *[b for b in base if not b.startswith("data.forget=")],
        f"data.forget={forget}",
        f"output_dir={tmp_path / 'r'}",
    ]
    out = started(load_config(None, [*args, "data.retain=locuslab/TOFU:retain90"]), checkpoint=True)
    resume = load_config(None, [*args, "data.retain=locuslab/TOFU:retain90", "train.resume=auto"])
    check_output_dir(resume, overwrite=False)
    forget.write_text(forget.read_text().replace("a", "e", 1))  # same path, one row edited
    with pytest.raises(ConfigError, match=rf"data.forget \({forget}\) sha256 .* train.resume_changed_data=true"):
        check_output_dir(resume, overwrite=False)
    accept = load_config(
        None, [*args, "data.retain=locuslab/TOFU:retain90", "train.resume=auto", "train.resume_changed_data=true"]
    )
    check_output_dir(accept, overwrite=False)
    write_output_dir(accept, overwrite=False)  # the run now continues on the new rows: they are recorded
    check_output_dir(resume, overwrite=False)
    recorded = json.loads((out / MARKER_NAME).read_text())["data"]
    assert (
        recorded["data.retain"]["hub"] == "locuslab/TOFU:retain90" and "not hashed" in recorded["data.retain"]["note"]
    )
    assert len(recorded["data.forget"]["sha256"]) == 64


# --------------------------------------------------------------------------- a run that never took a step


def test_a_run_that_failed_before_its_first_step_does_not_block_the_same_command(
    base, tiny_model_dir, tmp_path, capsys
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").rename(tmp_path / "weights")  # a model folder whose weights cannot be loaded
    out = tmp_path / "run"
    command = [
        "train",
        *[b for b in base if not b.startswith("model.path=")],
        f"model.path={model}",
        f"output_dir={out}",
    ]
    assert main(command) == 2
    assert "cannot load a model" in capsys.readouterr().err
    assert (out / "config.yaml").is_file() and not (out / "metrics.jsonl").exists()
    (tmp_path / "weights").rename(model / "model.safetensors")  # repaired; the very same command now runs
    assert main(command) == 0
    assert (out / "final").is_dir() and json.loads((out / "summary.json").read_text())["steps"] == 1


# --------------------------------------------------------------------------- tokens in config values


def test_token_shaped_config_values_are_masked_in_config_yaml_and_the_run_still_resumes(base, tmp_path):
    secret = [f"logging.tags=[tofu,{HF_TOKEN}]", f"logging.group=team-{GITHUB_TOKEN}"]
    cfg = load_config(None, [*base, *secret, f"output_dir={tmp_path / 'run'}"])
    out = started(cfg, checkpoint=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["logging"]["tags"] == ["tofu", "***"]
    written = (out / "config.yaml").read_text() + (out / MARKER_NAME).read_text()
    assert HF_TOKEN not in written and GITHUB_TOKEN not in written
    check_output_dir(load_config(None, [*base, *secret, f"output_dir={out}", "train.resume=auto"]), False)
    # a Slurm job resumes from the written (masked) config.yaml itself
    check_output_dir(load_config(out / "config.yaml", ["train.resume=auto"]), False)


def test_a_wandb_run_records_no_token_from_config_or_command_line(base, tmp_path, monkeypatch):
    from launcher.wandb_sink import WandbSink
    from tests.wandb_records import read_finished_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [*base, f"logging.tags=[tofu,{HF_TOKEN}]", f"logging.run_name=run-{GITHUB_TOKEN}", "logging.wandb=true"]
    cfg = load_config(None, [*args, f"output_dir={tmp_path / 'run'}"])
    monkeypatch.setattr("sys.argv", ["ngdiff", "train", *args])
    sink = WandbSink(cfg)
    assert sink.run is not None
    sink.finish()
    run = read_finished_run(tmp_path / "run")
    assert run.tags == ["tofu", "***"] and run.name == "run-***"
    assert run.config["logging"]["tags"] == ["tofu", "***"]
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert HF_TOKEN.encode() not in data and GITHUB_TOKEN.encode() not in data, path


# --------------------------------------------------------------------------- an output_dir that cannot be made


def test_an_output_dir_under_a_file_is_one_line_before_the_model_loads(base, tmp_path, capsys, monkeypatch):
    import ngdiff.pipeline

    monkeypatch.setattr(ngdiff.pipeline, "build_trainer", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file.txt").write_text("x")
    assert main(["train", *base, f"output_dir={tmp_path / 'file.txt' / 'run'}"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("ngdiff:")]
    assert "Traceback" not in err and err.splitlines()[-1] == line
    assert f"output_dir {tmp_path / 'file.txt' / 'run'} lies under {tmp_path / 'file.txt'}, which is a file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_output_dir_is_one_line(base, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["train", *base, f"output_dir={locked / 'run'}"]) == 2
    finally:
        locked.chmod(0o755)
    assert f"cannot write in {locked} (permission denied)" in capsys.readouterr().err
