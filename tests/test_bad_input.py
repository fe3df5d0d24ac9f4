"""Bad input, each through its real path (config load, data build, CLI): one error line naming what and where."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from launcher.cli import main
from ngdiff.config import ConfigError, DataConfig, load_config
from ngdiff.data import DataError, encode_task, load_lines
from ngdiff.modeling import load_tokenizer
from ngdiff.study.spec import StudyError, load_study
from tests.conftest import tofu_rows, write_jsonl


@pytest.fixture
def base(tofu_split, tiny_model_dir) -> list[str]:
    return [
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']}",
        f"data.retain={tofu_split['retain']}",
    ]


def train_cli(capsys, tiny_model_dir, forget, retain, out: Path, *extra: str) -> tuple[int, list[str]]:
    """`ngdiff train` on the tiny model; (exit code, the non-empty stderr lines)."""
    code = main(
        [
            "train",
            f"model.path={tiny_model_dir}",
            f"data.forget={forget}",
            f"data.retain={retain}",
            "train.forget_batch_size=4",
            "train.retain_batch_size=4",
            "train.max_steps=1",
            "logging.progress=false",
            f"output_dir={out}",
            *extra,
        ]
    )
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def one_error_line(lines: list[str]) -> str:
    errors = [line for line in lines if line.startswith("ngdiff: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    return errors[0]


# --------------------------------------------------------------------------- repeated YAML keys


def test_a_repeated_key_in_a_config_file_names_the_key_and_both_lines(base, tmp_path):
    lr_twice = tmp_path / "lr.yaml"
    lr_twice.write_text("optim:\n  lr: 0.05\n  name: sgd\n  lr: 3.0\n")
    with pytest.raises(ConfigError, match=r"lr.yaml: key 'lr' appears twice in one mapping, on line 2 and line 4"):
        load_config(lr_twice, base)
    section_twice = tmp_path / "train.yaml"
    section_twice.write_text("train:\n  max_steps: 3\noptim:\n  lr: 0.1\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one mapping, on line 1 and line 5"):
        load_config(section_twice, base)
    fine = tmp_path / "fine.yaml"  # the same key in two sections is no repetition
    fine.write_text("optim:\n  lr: 0.05\neval:\n  every: 2\ntrain:\n  max_steps: 3\n  log_every: 2\n")
    cfg = load_config(fine, base)
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.eval.every) == (0.05, 3, 2)


def test_a_repeated_key_in_an_override_or_a_study_file_is_refused(base, tmp_path):
    with pytest.raises(ConfigError, match=r"override 'model.lora.target_modules=.*key 'a' appears twice"):
        load_config(None, [*base, "model.lora.target_modules={a: 1, a: 2}"])
    study = tmp_path / "study.yaml"
    study.write_text("name: s\nname: t\n")
    with pytest.raises(StudyError, match=r"study.yaml: key 'name' appears twice in one mapping, on line 1 and line 2"):
        load_study(study)


def test_the_cli_reports_a_repeated_key_in_one_line(tiny_model_dir, tofu_split, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  path: {tiny_model_dir}\noptim:\n  lr: 0.05\n  lr: 3.0\n")
    code = main(["train", str(config), f"data.forget={tofu_split['forget']}", f"data.retain={tofu_split['retain']}"])
    line = one_error_line(capsys.readouterr().err.splitlines())
    assert code == 2 and "key 'lr' appears twice in one mapping, on line 4 and line 5" in line


# --------------------------------------------------------------------------- values out of range


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=inf", "optim.lr must be a finite number, got 'inf'"),
        ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr=1e39", r"optim.lr must be at most 3.403e\+38"),
        ("optim.weight_decay=.inf", "optim.weight_decay must be a finite number"),
        ("optim.betas=[0.9, inf]", "optim.betas must be a finite number"),
        ("optim.betas=[1.5, 0.999]", r"optim.betas must each lie in \[0, 1\), got \[1.5, 0.999\]"),
        ("optim.betas=[0.9, 1.0]", r"optim.betas must each lie in \[0, 1\)"),
        ("optim.momentum=nan", "optim.momentum must be a finite number"),
        ("optim.max_grad_norm=inf", "optim.max_grad_norm must be a finite number"),
        ("method.npo_beta=inf", "method.npo_beta must be a finite number"),
        ("method.simnpo_beta=-inf", "method.simnpo_beta must be a finite number"),
        ("method.task_weights=[1, inf]", "method.task_weights must be a finite number"),
        ("autolr.max_change=inf", "autolr.max_change must be a finite number"),
        ("autolr.probe_points=[-1, 0, inf]", "autolr.probe_points must be a finite number"),
        ("train.stop_forget_loss=inf", "train.stop_forget_loss must be a finite number"),
        ("train.stop_forget_loss=-1", "train.stop_forget_loss must not be negative"),
        ("train.seed=18446744073709551616", r"train.seed must lie in \[0, 2\*\*32 - 1\], got 18446744073709551616"),
        ("train.seed=-1", r"train.seed must lie in \[0, 2\*\*32 - 1\], got -1"),
        ("parallel.timeout_minutes=1e12", r"parallel.timeout_minutes must be at most 10080 \(one week\), got 1e\+12"),
        ("parallel.timeout_minutes=inf", "parallel.timeout_minutes must be a finite number"),
    ],
)
def test_values_that_make_no_sense_are_one_config_error(base, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, override])


def test_the_largest_seed_and_timeout_are_accepted(base):
    cfg = load_config(None, [*base, f"train.seed={2**32 - 1}", "parallel.timeout_minutes=10080"])
    assert (cfg.train.seed, cfg.parallel.timeout_minutes) == (2**32 - 1, 10080.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.betas=[1.5, 0.999]", r"optim.betas must each lie in [0, 1)"),
        ("train.seed=99999999999999999999", "train.seed must lie in [0, 2**32 - 1]"),
        ("parallel.timeout_minutes=1e300", "parallel.timeout_minutes must be at most 10080"),
    ],
)
def test_the_cli_names_the_key_before_any_work(tiny_model_dir, tofu_split, tmp_path, capsys, override, message):
    out = tmp_path / "o"
    code, lines = train_cli(capsys, tiny_model_dir, tofu_split["forget"], tofu_split["retain"], out, override)
    assert code == 2 and message in one_error_line(lines)
    assert not out.exists()


# --------------------------------------------------------------------------- data files


def test_a_data_file_that_is_not_utf8_names_the_line(tiny_model_dir, tofu_split, tmp_path, capsys):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl is not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8"):
        encode_task(DataConfig(), load_tokenizer(str(tiny_model_dir)), str(latin1), "data.forget")
    refusals = tmp_path / "idk.jsonl"
    refusals.write_bytes(b"I don't know.\nNo s\xe9\n")
    with pytest.raises(DataError, match=r"idk.jsonl is not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_lines(refusals)
    code, lines = train_cli(capsys, tiny_model_dir, latin1, tofu_split["retain"], tmp_path / "o")
    assert code == 2 and "data.forget: " in one_error_line(lines) and "on line 2" in one_error_line(lines)
    assert not (tmp_path / "o" / "final").exists()


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"question": "q2", "answer": 5}, r"line 2 of .*d.jsonl has field answer as a JSON number \(5\); it must be"),
        ({"question": "q2", "answer": ["a", "b"]}, r"line 2 of .*d.jsonl has field answer as a JSON array"),
        ({"question": 7, "answer": "a"}, r"line 2 of .*d.jsonl has field question as a JSON number \(7\)"),
        ({"question": "q2"}, r"line 2 of .*d.jsonl lacks field answer \(it has: question\)$"),
        ({"question": "q2", "answer": None}, r"line 2 of .*d.jsonl has field answer set to null; give it a string$"),
        ({"question": "q2", "answer": " "}, r"line 2 of .*d.jsonl has field answer empty$"),
        ("a string", r"line 2 of .*d.jsonl is a JSON string, not an object with fields question, answer$"),
    ],
)
def test_a_bad_record_is_named_by_its_line_and_what_is_wrong(tiny_model_dir, tmp_path, second, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q1", "answer": "a1"}) + "\n" + json.dumps(second) + "\n")
    with pytest.raises(DataError, match="data.retain: " + message):
        encode_task(DataConfig(), load_tokenizer(str(tiny_model_dir)), str(path), "data.retain")


def test_text_records_must_be_strings_and_json_arrays_count_records_from_one(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = tmp_path / "t.jsonl"
    texts.write_text('\n{"text": "hello"}\n\n{"text": 3}\n')  # blank lines: the error still names the file line
    with pytest.raises(DataError, match=r"line 4 of .*t.jsonl has field text as a JSON number \(3\)"):
        encode_task(DataConfig(format="text"), tokenizer, str(texts), "data.forget")
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"question": "q", "answer": "a"}, {"question": "q", "answer": {"x": 1}}], indent=2))
    with pytest.raises(DataError, match=r"record 2 of .*a.json has field answer as a JSON object"):
        encode_task(DataConfig(), tokenizer, str(array), "data.forget")
    columns = tmp_path / "c.json"  # the column layout `datasets` reads: still accepted
    columns.write_text(json.dumps({"question": ["q1", "q2"], "answer": ["a1", "a2"]}, indent=2))
    assert len(encode_task(DataConfig(), tokenizer, str(columns), "data.forget")) == 2


def test_the_cli_reports_an_int_answer_in_one_line(tiny_model_dir, tofu_split, tmp_path, capsys):
    rows = tofu_rows(24)[8:]
    rows[3] = {**rows[3], "answer": 1999}
    retain = write_jsonl(tmp_path / "r.jsonl", rows)
    code, lines = train_cli(capsys, tiny_model_dir, tofu_split["forget"], retain, tmp_path / "o")
    line = one_error_line(lines)
    assert code == 2 and "data.retain: line 4 of " in line and "has field answer as a JSON number (1999)" in line


# --------------------------------------------------------------------------- forget and retain overlap


def test_the_same_file_as_forget_and_retain_is_refused(base, tofu_split, tmp_path, monkeypatch):
    same = str(tofu_split["forget"])
    with pytest.raises(ConfigError, match=r"data.forget and data.retain both name .*forget.jsonl: the run would"):
        load_config(None, [*base, f"data.retain={same}"])
    monkeypatch.chdir(Path(same).parent)  # another spelling of the same file
    with pytest.raises(ConfigError, match=r"both name .*forget.jsonl \(as ./forget.jsonl\)"):
        load_config(None, [*base, "data.retain=./forget.jsonl"])


def test_records_in_both_sets_are_counted_in_a_warning(tmp_path, caplog):
    from ngdiff.data.overlap import warn_about_overlap

    rows = tofu_rows(30)
    forget = write_jsonl(tmp_path / "f.jsonl", rows[:10])
    other = write_jsonl(tmp_path / "o.jsonl", rows[20:30])
    # 3 of the forget records copied in; a fourth shares only its question (not the same record)
    retain = write_jsonl(tmp_path / "r.jsonl", [*rows[10:20], *rows[2:5], {**rows[7], "answer": "Other."}])
    with caplog.at_level(logging.WARNING, logger="ngdiff.data"):
        found = warn_about_overlap(DataConfig(forget=(str(forget),), retain=(str(retain), str(other))))
    assert found == {(str(forget), str(retain)): 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"3 of the 10 records of data.forget {forget} also appear in data.retain {retain} (same question and answer): "
        "the run both forgets and retains them"
    ]
    texts_forget = write_jsonl(tmp_path / "tf.jsonl", [{"text": r["answer"]} for r in rows[:10]])
    texts_retain = write_jsonl(tmp_path / "tr.jsonl", [{"text": r["answer"]} for r in rows[9:20]])
    text = DataConfig(format="text", forget=(str(texts_forget),), retain=(str(texts_retain),))
    assert warn_about_overlap(text) == {(str(texts_forget), str(texts_retain)): 1}  # text runs compare the text


def test_a_run_with_overlapping_sets_warns_once(tiny_model_dir, tmp_path, caplog):
    from ngdiff.pipeline import build_trainer
    from parallel.base import DistContext

    rows = tofu_rows(40)
    forget = write_jsonl(tmp_path / "f.jsonl", rows[:8])
    retain = write_jsonl(tmp_path / "r.jsonl", [*rows[20:36], *rows[:2]])
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.forget={forget}",
            f"data.retain={retain}",
            "train.forget_batch_size=4",
            "train.retain_batch_size=4",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="ngdiff.data"):
        build_trainer(cfg, DistContext())
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "ngdiff.data"]
    assert warning.startswith(f"2 of the 8 records of data.forget {forget} also appear in data.retain {retain} ")


# --------------------------------------------------------------------------- tokenizer files


def test_eval_of_a_folder_without_tokenizer_files_says_so(tiny_model_dir, tofu_split, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_model_dir / name).read_bytes())
    code = main(["eval", "--model", str(bare), "--forget", str(tofu_split["forget"])])
    line = one_error_line(capsys.readouterr().err.splitlines())
    assert code == 2
    assert line == (
        f"ngdiff: error: --model {bare}: the folder has no tokenizer files (looked for tokenizer.json, "
        "tokenizer.model, vocab.json, vocab.txt, spiece.model, *.tiktoken); save the tokenizer there "
        "(tokenizer.save_pretrained) or copy it from the model it came from"
    )
    assert "sentencepiece" not in line and not (bare / "eval_tofu").exists()
    code, lines = train_cli(capsys, bare, tofu_split["forget"], tofu_split["retain"], tmp_path / "o")
    assert code == 2 and f"model.path {bare}: the folder has no tokenizer files" in one_error_line(lines)
