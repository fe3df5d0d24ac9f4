"""The CPU world's pretraining base: built once and shared by the target and the retain model (and by
worlds that differ only in fine-tuning), rebuilt when its recipe changes; a world without `pretrain`
is built as before; the spec's pretrain keys are checked before anything is built."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

import ngdiff.finetune
from launcher.study_cli import CONFIG_DIR
from ngdiff.config import load_config
from ngdiff.study import pretrain
from ngdiff.study.spec import StudyError, parse_study
from ngdiff.study.world import check_world, cpu_world_data, load_or_build, placeholder_overrides, world_recipe

# a world small enough to build in seconds: 1 retain author, 1 forget author, 1 pretraining author
TINY_WORLD = {
    "kind": "cpu",
    "forget_split": "forget01",
    "forget_authors": [1],
    "retain_authors": 1,
    "knowledge": ["world_facts"],
    "knowledge_items": 3,
    "max_new_tokens": 3,
    "model": {"vocab_size": 300, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
    "finetune": {"epochs": 1, "lr": 1.0e-3, "batch_size": 16, "warmup_steps": 1},
    "pretrain": {"authors": 1, "epochs": 1, "warmup_steps": 1},
    "eval_items": {"forget": 4, "retain": 4, "real_authors": 4, "world_facts": 4},
}


def study(world: dict, tmp_path: Path | None = None):
    raw = yaml.safe_load((CONFIG_DIR / "quick.yaml").read_text())
    raw["world"] = copy.deepcopy(world)
    if tmp_path is not None:
        raw["world"].setdefault("pretrain", {})["cache_dir"] = str(tmp_path / "bases")
    spec = parse_study(raw, "study.yaml")
    data_cfg = load_config(None, [*placeholder_overrides(spec), *spec.common], check_sources=False).data
    return spec, data_cfg


def with_world(world: dict, **changes) -> dict:
    world = copy.deepcopy(world)
    for key, value in changes.items():
        world[key] = {**world[key], **value} if isinstance(value, dict) else value
    return world


@pytest.fixture
def recorded(monkeypatch):
    """Every fine-tuning (model folder it starts from -> folder it writes) and every base trained."""
    calls = {"finetune": [], "bases": 0}
    finetune, train_base = ngdiff.finetune.finetune, pretrain.train_base

    def recording_finetune(model_dir, tokenizer, examples, out_dir, cfg, progress=True):
        calls["finetune"].append((Path(model_dir), Path(out_dir)))
        return finetune(model_dir, tokenizer, examples, out_dir, cfg, progress=progress)

    def counting_train_base(*args, **kwargs):
        calls["bases"] += 1
        return train_base(*args, **kwargs)

    monkeypatch.setattr(ngdiff.finetune, "finetune", recording_finetune)
    monkeypatch.setattr(pretrain, "train_base", counting_train_base)
    return calls


def fine_tuned_from(calls, world_dir: Path) -> dict[str, Path]:
    return {out.name: start for start, out in calls["finetune"] if out.parent == world_dir}


@pytest.mark.slow  # three tiny worlds: about 20 s of CPU
def test_the_base_is_built_once_and_shared_by_both_models_and_by_worlds_that_differ_in_fine_tuning(tmp_path, recorded):
    spec, data_cfg = study(TINY_WORLD, tmp_path)
    load_or_build(spec, tmp_path / "s", data_cfg, progress=False)
    world = json.loads((tmp_path / "s" / "world" / "world.json").read_text())
    base = Path(world["info"]["pretrain"]["folder"])
    assert recorded["bases"] == 1 and base.parent == tmp_path / "bases" and world["info"]["pretrain"]["built_now"]
    assert world["info"]["pretrain"]["pairs"] == 20 + 3  # one author's 20 pairs and 3 world facts
    assert fine_tuned_from(recorded, tmp_path / "s" / "world") == {
        "target": base / "model",
        "retain_model": base / "model",
    }
    # the base never reads the world's forget or retain authors, nor its knowledge through the fine-tuning
    sets = cpu_world_data(spec.world)
    assert len(sets["target_train"]) == 20 + 20 and len(sets["reference_train"]) == 20
    assert world["calibration"]["unseen_token_share"] <= 0.05  # the BPE is the pretraining text's

    # a second world, another fine-tuning seed: the same base, not trained again
    spec2, _ = study(with_world(TINY_WORLD, finetune={"seed": 1}), tmp_path)
    load_or_build(spec2, tmp_path / "s2", data_cfg, progress=False)
    world2 = json.loads((tmp_path / "s2" / "world" / "world.json").read_text())
    assert recorded["bases"] == 1 and world2["info"]["pretrain"]["folder"] == str(base)
    assert not world2["info"]["pretrain"]["built_now"]
    assert fine_tuned_from(recorded, tmp_path / "s2" / "world")["target"] == base / "model"

    # a pretraining recipe change trains a new base, beside the first
    spec3, _ = study(with_world(TINY_WORLD, pretrain={"epochs": 2}), tmp_path)
    load_or_build(spec3, tmp_path / "s3", data_cfg, progress=False)
    world3 = json.loads((tmp_path / "s3" / "world" / "world.json").read_text())
    assert recorded["bases"] == 2 and Path(world3["info"]["pretrain"]["folder"]) != base
    assert sorted(p.name for p in (tmp_path / "bases").iterdir() if p.is_dir()) == sorted(
        [base.name, Path(world3["info"]["pretrain"]["folder"]).name]
    )
    # the cached world loads without building anything
    finetunes = len(recorded["finetune"])
    load_or_build(spec, tmp_path / "s", data_cfg, progress=False)
    assert recorded["bases"] == 2 and len(recorded["finetune"]) == finetunes


def test_a_world_without_pretrain_is_built_as_before(tmp_path, recorded):
    plain = {k: v for k, v in TINY_WORLD.items() if k != "pretrain"}
    spec, data_cfg = study(plain)
    sets = cpu_world_data(spec.world)  # the knowledge is fine-tuned into both models
    assert len(sets["target_train"]) == 20 + 20 + 3 and len(sets["reference_train"]) == 20 + 3
    load_or_build(spec, tmp_path / "s", data_cfg, progress=False)
    marker = tmp_path / "s" / "world" / "world.json"
    world = json.loads(marker.read_text())
    assert recorded["bases"] == 0 and "pretrain" not in world["info"]
    assert world["recipe"] == world_recipe(spec, data_cfg) and "pretrain" in world["recipe"]
    # a world cached before the pretrain and muse keys existed (its recipe lacks them) still loads, unbuilt
    builds = len(recorded["finetune"])
    old = {k: v for k, v in world["recipe"].items() if k not in ("pretrain", "muse")}
    marker.write_text(json.dumps({**world, "recipe": old}))
    load_or_build(spec, tmp_path / "s", data_cfg, progress=False)
    assert len(recorded["finetune"]) == builds
    # ...but not when the key it lacks now holds another value than its default
    with_base, _ = study({**plain, "pretrain": {"authors": 1, "epochs": 1}})
    with pytest.raises(StudyError, match="different recipe"):
        load_or_build(with_base, tmp_path / "s", data_cfg, progress=False)
    assert not (tmp_path / "s" / "pretrain").exists()
    start = tmp_path / "s" / "world" / "base"  # a random initialisation of the world's own
    assert fine_tuned_from(recorded, tmp_path / "s" / "world") == {"target": start, "retain_model": start}
    # where the bases are cached is no part of a world's recipe; the pretraining settings are
    spec_a, _ = study(TINY_WORLD, tmp_path / "a")
    spec_b, _ = study(TINY_WORLD, tmp_path / "b")
    assert world_recipe(spec_a, data_cfg) == world_recipe(spec_b, data_cfg) != world_recipe(spec, data_cfg)
    assert world_recipe(spec_a, data_cfg)["pretrain"]["authors"] == 1


def test_replayed_knowledge_is_fine_tuned_into_both_models_but_leaves_the_base_alone(tmp_path):
    spec, data_cfg = study(TINY_WORLD)
    replay, _ = study(with_world(TINY_WORLD, pretrain={"replay_knowledge": True}))
    sets, replayed = cpu_world_data(spec.world), cpu_world_data(replay.world)
    assert replayed["target_train"] == [*sets["target_train"], *sets["knowledge"]]
    assert replayed["reference_train"] == [*sets["reference_train"], *sets["knowledge"]]
    assert len(sets["knowledge"]) == 3
    assert world_recipe(replay, data_cfg) != world_recipe(spec, data_cfg)  # another world...
    knowledge = sets["knowledge"]  # ...from the same base
    assert pretrain.pretrain_recipe(replay.world, knowledge, "") == pretrain.pretrain_recipe(spec.world, knowledge, "")


@pytest.mark.parametrize(
    ("pretrain_keys", "message"),
    [
        ({"authors": 179}, r"world\.pretrain\.authors=179: .*authors 20\.\.198, .*start at 198; use at most 178"),
        ({"authors": -1}, r"world\.pretrain\.authors must be a number of TOFU authors >= 0, got -1"),
        ({"authors": 0, "epochs": 3}, r"world\.pretrain\.epochs is set but world\.pretrain\.authors is 0"),
        ({"authors": 2, "lr": 0}, r"world\.pretrain\.lr must be positive, got 0"),
        ({"authors": 2, "epochs": 0}, r"world\.pretrain\.epochs must be at least 1, got 0"),
        ({"authors": 2, "warmup_steps": -1}, r"world\.pretrain\.warmup_steps must not be negative, got -1"),
        ({"authors": 2, "replay_knowledge": "yes"}, r"world\.pretrain\.replay_knowledge must be true or false"),
        ({"authors": 0, "replay_knowledge": True}, r"world\.pretrain\.replay_knowledge is set but .*authors is 0"),
    ],
)
def test_bad_pretrain_keys_are_named(pretrain_keys, message):
    spec, _ = study({**TINY_WORLD, "pretrain": pretrain_keys})
    with pytest.raises(StudyError, match=message):
        check_world(spec.world)


def test_a_misspelt_pretrain_key_is_named():
    with pytest.raises(StudyError, match=r"unknown key world\.pretrain\.epoch \(did you mean world\.pretrain\.epochs"):
        study(with_world(TINY_WORLD, pretrain={"epoch": 3}))
