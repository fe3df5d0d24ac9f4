"""TOFU's evaluation protocol (eval_everything.yaml): 300 items, 200 new tokens, the trained forget split."""

from __future__ import annotations

import pytest

from ngdiff.config import ConfigError, EvalConfig, load_config
from ngdiff.eval.tofu import DS_SIZE, MAX_NEW_TOKENS, load_rows, tofu_sets, tofu_split_of
from tests.conftest import write_jsonl


def test_defaults_are_tofus():
    assert (DS_SIZE, MAX_NEW_TOKENS) == (300, 200)  # ds_size: 300, generation.max_length: 200
    assert (EvalConfig().max_items, EvalConfig().max_new_tokens) == (DS_SIZE, MAX_NEW_TOKENS)


@pytest.mark.parametrize(
    ("source", "split"),
    [
        ("data/forget10.jsonl", "forget10"),
        ("/x/forget05.json", "forget05"),
        ("locuslab/TOFU:forget01", "forget01"),
        ("locuslab/TOFU:forget10:train", "forget10"),
        ("locuslab/TOFU:retain90", None),
        ("my_forget.jsonl", None),
    ],
)
def test_split_named_by_the_training_source(source, split):
    assert tofu_split_of(source) == split


def cfg(tmp_path, forget: str, *extra):
    retain = write_jsonl(tmp_path / "retain90.jsonl", [{"question": "q", "answer": "a"}])
    return load_config(None, ["model.path=m", f"data.forget={forget}", f"data.retain={retain}", *extra])


def test_eval_split_follows_the_trained_split(tmp_path):
    forget10 = str(write_jsonl(tmp_path / "forget10.jsonl", [{"question": "q", "answer": "a"}]))
    assert cfg(tmp_path, forget10, "eval.benchmark=tofu").eval.split == "forget10"
    assert cfg(tmp_path, "locuslab/TOFU:forget05", "eval.benchmark=tofu").eval.split == "forget05"
    assert cfg(tmp_path, forget10, "eval.split=forget10").eval.split == "forget10"
    with pytest.raises(ConfigError, match=r"eval\.split=forget01 contradicts data\.forget"):
        cfg(tmp_path, forget10, "eval.benchmark=tofu", "eval.split=forget01")
    other = str(write_jsonl(tmp_path / "mine.jsonl", [{"question": "q", "answer": "a"}]))
    assert cfg(tmp_path, other).eval.split == "forget01"  # nothing to follow: the old default
    assert cfg(tmp_path, other, "eval.split=forget05").eval.split == "forget05"


@pytest.mark.parametrize(("split", "rows"), [("forget01", 40), ("forget05", 200), ("forget10", 400)])
def test_every_forget_split_is_bundled(split, rows):
    forget = tofu_sets(split)[0]
    assert len(load_rows(forget)) == rows
    assert len(load_rows(forget, max_items=DS_SIZE)) == min(rows, DS_SIZE)
