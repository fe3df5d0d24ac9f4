"""`ngdiff plan` on every shipped run config, and its ZeRO-3 buffer sizes against the ones the zero3 backend
configures for the same config (one source: parallel/deepspeed_sizing.py)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from ngdiff.config import ExperimentConfig, load_config
from ngdiff.memory_plan import llama_config, model_shape
from parallel import DistContext
from parallel.deepspeed_sizing import DEEPSPEED_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ZERO3_YAML = CONFIGS / "deepspeed" / "tofu_ngdiff_zero3.yaml"
SECTIONS = {f.name for f in dataclasses.fields(ExperimentConfig)}


def run_configs() -> list[Path]:
    """Every YAML under configs/ whose top level names a run config section (model, data, train, ...).
    Other YAML files there (study designs) share no section with a run config, so a run config with a
    misspelt key is still picked up (and then fails to load)."""
    found = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
    return [p for p in found if set(yaml.safe_load(p.read_text()) or {}) & SECTIONS]


def test_the_rule_finds_the_shipped_run_configs():
    names = {p.relative_to(CONFIGS).as_posix() for p in run_configs()}
    assert {"tofu_ngdiff.yaml", "deepspeed/tofu_ngdiff_zero3.yaml", "fsdp/tofu_ngdiff_fsdp.yaml"} <= names
    assert {"baselines/npo.yaml", "muse_news_ngdiff.yaml", "tofu_ngdiff_ddp.yaml"} <= names
    assert not any(name.startswith("study/") for name in names)


@pytest.mark.parametrize("path", run_configs(), ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_plan_predicts_every_shipped_run_config(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name their DeepSpeed JSON relative to the repository
    code = main(["plan", str(path), "--model-config", "llama2-7b", "--world-size", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "llama2-7b: 6.738B parameters" in out
    assert " on 8 rank(s)" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert "GiB" in total
    assert any(line == "fits" or line.startswith("does NOT fit; cheapest change") for line in out.splitlines())
    if load_config(path, check_sources=False).parallel.backend == "single":
        assert "note: parallel.backend=single runs one process; planned for 8 ranks as parallel.backend=fsdp" in out


class ModelSource:
    """What the backend reads its model's size from (`parallel.zero3.model_hidden_size`): a config folder."""

    def __init__(self, path: Path):
        self.path = path


def backend_zero_section(cfg, world_size: int, model_dir: Path | None) -> dict:
    """The zero_optimization section the zero3 backend builds for `cfg` (no engine, no process group)."""
    from parallel.zero3 import Zero3Backend

    backend = Zero3Backend(DistContext(world_size=world_size), cfg.parallel, cfg.optim, cfg.train.precision)
    backend.set_batch_layout(2, 2)
    build_model = ModelSource(model_dir) if model_dir is not None else (lambda: None)
    return backend._config(build_model)["zero_optimization"]


USER_JSONS = {
    "shipped": None,  # configs/deepspeed/zero3.json: every size "auto"
    "none": "",  # no DeepSpeed JSON: the backend sizes absent keys like "auto"
    "explicit": {"zero_optimization": {"reduce_bucket_size": 5e8, "stage3_max_live_parameters": 123456789}},
    "mixed": {"zero_optimization": {"reduce_bucket_size": "auto", "stage3_max_live_parameters": 2000000}},
}


@pytest.mark.parametrize("variant", USER_JSONS)
def test_plan_uses_the_buffer_sizes_the_zero3_backend_configures(variant, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    user = USER_JSONS[variant]
    overrides = []
    if user is not None:
        json_path = ""
        if user:
            json_path = str(tmp_path / "ds.json")
            Path(json_path).write_text(json.dumps(user))
        overrides = [f"parallel.deepspeed_config={json_path}"]
    model_dir = tmp_path / "llama2-7b"
    llama_config("llama2-7b").save_pretrained(model_dir)  # config.json only
    cfg = load_config(ZERO3_YAML, overrides, check_sources=False)
    zero = backend_zero_section(cfg, 8, model_dir)
    bucket, max_live = zero["reduce_bucket_size"], zero["stage3_max_live_parameters"]
    if variant in ("shipped", "none"):
        assert bucket == 4096**2 and max_live == 10 * 4096**2  # sized to the model, not DeepSpeed's 5e8 / 1e9
    if variant == "explicit":
        assert (bucket, max_live) == (500_000_000, 123456789)

    # the plan of the same config and model prints the bytes those sizes make
    assert main(["plan", str(ZERO3_YAML), *overrides, "--model-config", str(model_dir / "config.json"),
                 "--world-size", "8", "--json"]) == 0  # fmt: skip
    planned = json.loads(capsys.readouterr().out)["per_rank_bytes"]
    shape = model_shape(llama_config("llama2-7b"))
    p, local, c = shape.params, math.ceil(shape.params / 8), 2  # bf16 compute
    assert planned["gradients"] == 4 * local + 2 * c * min(bucket, p)
    gathered = max(c * (2 * shape.block_params + shape.outside_params), c * min(p, max_live))
    assert planned["parameters"] == c * local + 4 * local + gathered


def test_without_a_model_size_both_take_deepspeeds_defaults(monkeypatch):
    """A model that is not a config folder: the backend leaves the sizes to DeepSpeed, the plan assumes
    DeepSpeed's defaults, and those are the installed DeepSpeed's."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from ngdiff.memory_plan import settings_from_config

    monkeypatch.chdir(REPO)
    cfg = load_config(ZERO3_YAML, check_sources=False)
    zero = DeepSpeedZeroConfig(**backend_zero_section(cfg, 8, None))  # as DeepSpeed reads what we hand it
    settings = settings_from_config(cfg, 8, hidden_size=None)
    assert settings.reduce_bucket == zero.reduce_bucket_size
    assert settings.max_live == zero.max_live_parameters
    defaults = DeepSpeedZeroConfig()
    assert {
        "reduce_bucket_size": defaults.reduce_bucket_size,
        "stage3_prefetch_bucket_size": defaults.prefetch_bucket_size,
        "stage3_param_persistence_threshold": defaults.param_persistence_threshold,
        "stage3_max_live_parameters": defaults.max_live_parameters,
        "stage3_max_reuse_distance": defaults.max_reuse_distance,
    } == DEEPSPEED_DEFAULTS


@pytest.mark.parametrize("value", ["big", -1, 1.5, True])
def test_a_bad_size_is_one_clear_error_in_plan_and_backend(value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": value}}))
    override = f"parallel.deepspeed_config={path}"
    assert main(["plan", str(ZERO3_YAML), override, "--model-config", "llama2-7b", "--world-size", "8"]) == 2
    needle = f"{path}: zero_optimization.reduce_bucket_size={value!r}: give a whole number of elements"
    assert needle in capsys.readouterr().err
    from parallel.zero3 import DeepSpeedConfigError

    with pytest.raises(DeepSpeedConfigError, match="reduce_bucket_size"):
        backend_zero_section(load_config(ZERO3_YAML, [override], check_sources=False), 8, None)


def test_a_zero_section_that_is_not_an_object_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": 3}))
    override = f"parallel.deepspeed_config={path}"
    assert main(["plan", str(ZERO3_YAML), override, "--model-config", "llama2-7b", "--world-size", "8"]) == 2
    assert f"{path}: zero_optimization must be a JSON object, got 3" in capsys.readouterr().err
