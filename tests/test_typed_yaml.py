"""The one YAML-to-dataclass reader of run and study configs (ngdiff/typed_yaml.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pytest

from ngdiff.typed_yaml import TypedYaml, checked_later


class ShapeError(Exception):
    pass


@dataclass(frozen=True)
class Inner:
    depth: int = 2
    rate: float = 0.5
    gap: float | None = None


@dataclass(frozen=True)
class Outer:
    name: str = ""
    on: bool = False
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = ()
    pair: tuple[float, float] = (0.9, 0.99)
    files: tuple[str, ...] = ()
    inner: Inner = field(default_factory=Inner)
    later: bool = field(default=False, metadata=checked_later())


READER = TypedYaml("cfg.yaml", ShapeError, "config key")


def read(raw):
    return READER.section(Outer, raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, Outer()),
        (None, Outer()),  # an empty YAML section: the defaults
        ({"inner": None}, Outer()),
        ({"name": 3}, Outer(name="3")),
        ({"name": None}, Outer(name="")),
        ({"on": True, "mode": "b"}, Outer(on=True, mode="b")),
        ({"sizes": [1, 2.0, "3"]}, Outer(sizes=(1, 2, 3))),  # whole numbers, however written
        ({"sizes": "4, 5"}, Outer(sizes=(4, 5))),  # a comma-separated override
        ({"files": "a.jsonl,b.jsonl"}, Outer(files=("a.jsonl", "b.jsonl"))),
        ({"pair": [0, "1e-3"]}, Outer(pair=(0.0, 1e-3))),  # YAML 1.1 reads 1e-3 as a string
        ({"inner": {"depth": "1e3", "rate": 1}}, Outer(inner=Inner(depth=1000, rate=1.0))),
        ({"inner": {"gap": 2}}, Outer(inner=Inner(gap=2.0))),
        ({"inner": {"gap": None}}, Outer()),
        ({"later": "yes"}, Outer(later="yes")),  # kept as written: the caller's validation names it
    ],
)
def test_values_are_coerced_by_annotation(raw, expected):
    got = read(raw)
    assert got == expected
    assert [type(v) for v in (got.inner.depth, got.inner.rate)] == [int, float]


def test_a_huge_whole_number_stays_exact():
    assert READER.value(str(2**70 + 1), int, "seed") == 2**70 + 1
    assert READER.value(2**70 + 1, int, "seed") == 2**70 + 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"on": "maybe"}, "cfg.yaml: on must be true or false, got 'maybe'"),
        ({"on": 1}, "cfg.yaml: on must be true or false, got 1"),
        ({"mode": "c"}, "cfg.yaml: mode must be one of 'a', 'b', got 'c'"),
        ({"name": [1]}, "cfg.yaml: name must be a string, got [1]"),
        ({"sizes": 3}, "cfg.yaml: sizes must be a list, got 3"),
        ({"sizes": [1, 2.5]}, "cfg.yaml: sizes must be an integer, got 2.5"),
        ({"sizes": [True]}, "cfg.yaml: sizes must be an integer, got True"),
        ({"pair": [1, 2, 3]}, "cfg.yaml: pair must have 2 items, got 3"),
        ({"pair": [1, "x"]}, "cfg.yaml: pair must be a number, got 'x'"),
        ({"inner": 3}, "cfg.yaml: inner must be a mapping, got 3"),
        ({"inner": {"depth": "deep"}}, "cfg.yaml: inner.depth must be an integer, got 'deep'"),
        ({"inner": {"depth": float("inf")}}, "cfg.yaml: inner.depth must be an integer, got inf"),
        ({"inner": {"rate": False}}, "cfg.yaml: inner.rate must be a number, got False"),
        ({"inner": {"gap": "small"}}, "cfg.yaml: inner.gap must be a number, got 'small'"),
    ],
)
def test_a_bad_value_names_the_file_the_dotted_key_and_what_it_got(raw, message):
    with pytest.raises(ShapeError) as err:
        read(raw)
    assert str(err.value) == message


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", ".nan", "-Infinity", 10**400])
def test_a_non_finite_float_is_refused(value):
    with pytest.raises(ShapeError, match=r"^cfg\.yaml: inner\.rate must be a (finite )?number, got "):
        read({"inner": {"rate": value}})


def test_finite_floats_pass_through_exactly():
    assert READER.value("1e-300", float, "x") == 1e-300
    assert not math.isnan(READER.value(0, float, "x"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"nmae": "x"},
            "cfg.yaml: unknown config key nmae (did you mean name?); "
            "known keys at the top level: name, on, mode, sizes, pair, files, inner, later",
        ),
        (
            {"inner": {"dpeth": 1}},
            "cfg.yaml: unknown config key inner.dpeth (did you mean inner.depth?); "
            "known keys of inner: depth, rate, gap",
        ),
        ({"inner": {"zzz": 1}}, "cfg.yaml: unknown config key inner.zzz; known keys of inner: depth, rate, gap"),
    ],
)
def test_an_unknown_key_names_its_section_its_closest_key_and_every_known_one(raw, message):
    with pytest.raises(ShapeError) as err:
        read(raw)
    assert str(err.value) == message


def test_the_top_level_must_be_a_mapping():
    with pytest.raises(ShapeError, match=r"^cfg\.yaml: the top level must be a mapping, got \[1\]$"):
        read([1])


def test_an_unsupported_annotation_is_a_programming_error_not_a_user_error():
    with pytest.raises(TypeError, match="unsupported annotation"):
        READER.value(1, int | str, "x")
    with pytest.raises(TypeError, match="unsupported annotation"):
        READER.value(1, dict, "x")


def test_run_and_study_configs_read_through_it():
    from ngdiff.config import ConfigError, load_config
    from ngdiff.study.spec import StudyError, parse_study

    typo = r"^command line: unknown config key optim\.lrr \(did you mean optim\.lr\?\); known keys of optim: name, lr,"
    with pytest.raises(ConfigError, match=typo):
        load_config(None, ["optim.lrr=1"], check_sources=False)
    with pytest.raises(StudyError, match=r"^s\.yaml: unknown key world\.pretrain\.epoch \(did you mean .*keys of"):
        parse_study({"world": {"pretrain": {"epoch": 3}}}, "s.yaml")
    # a study's numbers follow the run config's rules now: no infinite lr, no string for a list of authors
    with pytest.raises(StudyError, match=r"^s\.yaml: lrs must be a finite number, got inf$"):
        parse_study({"lrs": [1e-3, float("inf")]}, "s.yaml")
    with pytest.raises(StudyError, match=r"^s\.yaml: world\.forget_authors must be an integer, got 'two'$"):
        parse_study({"world": {"forget_authors": ["two"]}}, "s.yaml")
