"""Config: YAML + dotted overrides into typed objects; one clear error per mistake, before heavy work."""

from __future__ import annotations

import pytest
import yaml

from ngdiff.config import ConfigError, load_config
from ngdiff.outputs import check_output_dir, write_output_dir


@pytest.fixture
def base(tofu_split, tiny_model_dir) -> list[str]:
    return [
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']}",
        f"data.retain={tofu_split['retain']}",
    ]


def test_overrides_alone_make_a_typed_config(base, tmp_path):
    cfg = load_config(
        None,
        [
            *base,
            "optim.lr=1e-5",
            "optim.name=sgd",
            "train.max_steps=3",
            "autolr.enabled=true",
            "parallel.backend=single",
            "autolr.probe_points=[0, 1, 2]",
            f"output_dir={tmp_path}",
        ],
    )
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.name == "sgd" and cfg.train.max_steps == 3 and cfg.autolr.enabled is True
    assert cfg.autolr.probe_points == (0.0, 1.0, 2.0)
    assert cfg.output_dir == str(tmp_path)


def test_yaml_then_overrides_win(base, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.01, "name": "adamw"}, "method": {"combiner": "gdiff"}}))
    cfg = load_config(path, [*base, "optim.lr=0.02"])
    assert cfg.optim.lr == 0.02 and cfg.method.combiner == "gdiff" and cfg.optim.name == "adamw"


def test_shipped_configs_validate(base):
    from pathlib import Path

    from ngdiff.study.runner import plan_study
    from ngdiff.study.spec import load_study

    shipped = sorted(Path(__file__).parents[1].glob("configs/**/*.yaml"))
    assert shipped, "configs/*.yaml missing"
    for path in shipped:
        if path.parent.name == "study":  # a study config: every run's config is checked by plan_study
            plan_study(load_study(path), Path("/nonexistent/study"))
        else:
            load_config(path, base)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown config key optim.lrr \(did you mean optim.lr\?\)"),
        ("optimizer.lr=1", r"unknown config key optimizer \(did you mean optim\?\)"),
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("train.max_steps=2.5", "train.max_steps must be an integer, got 2.5"),
        ("autolr.enabled=maybe", "autolr.enabled must be true or false"),
        ("optim.name=adam", r"optim.name must be one of 'sgd', 'adamw', got 'adam'"),
        ("method.combiner=ngdif", r"unknown method.combiner 'ngdif' \(did you mean ngdiff\?\)"),
        ("method.forget_objective=npp", r"unknown method.forget_objective 'npp' \(did you mean npo\?\)"),
        ("parallel.backend=fsdp3", r"unknown parallel.backend 'fsdp3'"),
        ("optim.lr=0", "optim.lr must be positive, got 0"),
        ("optim.lr=-1e-5", "optim.lr must be positive"),
        ("train.forget_batch_size=0", "train.forget_batch_size must be positive, got 0"),
        ("train.retain_batch_size=-2", "train.retain_batch_size must be positive"),
        ("data.max_length=0", "data.max_length must be positive"),
        ("data.forget=/nonexistent/forget.jsonl", "data.forget: data file not found: /nonexistent/forget.jsonl"),
        ("autolr.probe_points=[1, 2, 3]", "autolr.probe_points needs at least three distinct points including 0"),
        ("autolr.max_change=1", "autolr.max_change must be greater than 1, got 1"),
        ("autolr.on_reject=double", r"autolr.on_reject must be one of 'keep', 'halve', got 'double'"),
        ("autolr.probe_batch=new", r"autolr.probe_batch must be one of 'fresh', 'step', got 'new'"),
        ("method.retain_objective=none", "method.retain_objective=none leaves no retain gradient"),
        ("method.gdiff_coefficient=1.5", r"method.gdiff_coefficient must lie in \[0, 1\]"),
        ("optim=3", "optim must be a mapping"),
        ("noequals", "must look like key.sub=value"),
    ],
)
def test_bad_values_get_one_clear_error(base, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, override])


def test_bad_files(tmp_path, base):
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"top level must be a mapping"):
        load_config(listing, base)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epocs: 2\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key train.epocs \(did you mean train.epochs\?\)"):
        load_config(typo, base)


def test_model_path_is_required(tofu_split):
    with pytest.raises(ConfigError, match=r"model.path is required"):
        load_config(None, [f"data.forget={tofu_split['forget']}", f"data.retain={tofu_split['retain']}"])


def test_output_dir_guard(base, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, [*base, f"output_dir={out}"])
    check_output_dir(cfg, overwrite=False)
    write_output_dir(cfg, overwrite=False)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"already holds this run; pass train.resume=auto"):
        check_output_dir(cfg, overwrite=False)
    check_output_dir(load_config(None, [*base, f"output_dir={out}", "train.resume=auto"]), overwrite=False)
    other = load_config(None, [*base, f"output_dir={out}", "optim.lr=0.5"])
    with pytest.raises(ConfigError, match="holds a different run"):
        check_output_dir(other, overwrite=False)
    check_output_dir(other, overwrite=True)
    write_output_dir(other, overwrite=True)
    assert not (out / "metrics.jsonl").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.5
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match=r"holds no ngdiff run"):
        check_output_dir(load_config(None, [*base, f"output_dir={stranger}"]), overwrite=True)
    assert (stranger / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/no/such/model", r"model.path: no such model directory: /no/such/model"),
        ("./outputs/missing", r"model.path: no such model directory"),
        ("runs/a/final", r"model.path: no such model directory: runs/a/final"),
        ("org/bad name", r"model.path: 'org/bad name' is neither an existing directory nor a valid hub repo id"),
        ("org/model--x", r"neither an existing directory nor a valid hub repo id"),
    ],
)
def test_model_path_that_cannot_name_a_model_is_one_config_error(tofu_split, tiny_model_dir, value, message):
    data = [f"data.forget={tofu_split['forget']}", f"data.retain={tofu_split['retain']}"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.path={value}", *data])
    with pytest.raises(ConfigError, match=message.replace("model.path", "model.reference_path")):
        load_config(None, [f"model.path={tiny_model_dir}", f"model.reference_path={value}", *data])


def test_model_path_must_be_a_model_folder(tofu_split, tmp_path):
    data = [f"data.forget={tofu_split['forget']}", f"data.retain={tofu_split['retain']}"]
    with pytest.raises(ConfigError, match=r"model.path: .*forget.jsonl is a file; give the model folder"):
        load_config(None, [f"model.path={tofu_split['forget']}", *data])
    with pytest.raises(ConfigError, match=r"model.path: .* is not a Hugging Face model folder \(no config.json"):
        load_config(None, [f"model.path={tmp_path}", *data])
    load_config(None, ["model.path=meta-llama/Llama-2-7b-hf", *data])  # a well-formed hub name passes


def test_a_hub_name_that_fails_to_load_names_the_key_and_what_was_tried(monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ngdiff.model_source import ModelSourceError
    from ngdiff.modeling import model_factory

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore detail")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", unreachable)
    monkeypatch.setattr(AutoConfig, "from_pretrained", unreachable)
    source = model_factory("org/model", key="model.reference_path")
    for load in (source, source.build_empty):  # whole, or empty on meta for a sharding backend
        with pytest.raises(ModelSourceError) as caught:
            load()
        assert str(caught.value) == (
            "model.reference_path: cannot load a model from 'org/model': 'org/model' is not a local directory, so "
            "it was tried as a Hugging Face hub repo id, which failed: We couldn't connect to "
            "'https://huggingface.co' to load the files."
        )
