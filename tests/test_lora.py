"""LoRA on one process: only adapters train, the adapters-disabled reference, exports, checkpoints, config."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ngdiff.config import ConfigError
from ngdiff.pipeline import run_training
from parallel.base import DistContext
from tests.test_trainer_single import config as single_config

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]


def config(tiny_model_dir, tofu_split, out, *extra):
    """test_trainer_single's config (tiny model, TOFU split, batch 4) with LoRA, 3 SGD steps."""
    return single_config(
        tiny_model_dir, tofu_split, out, "train.max_steps=3", "optim.name=sgd", "optim.lr=0.5", *LORA, *extra
    )


def trained_state(outcome) -> dict[str, torch.Tensor]:
    return outcome.trainer.backend.full_state_dict()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_config_keys_and_refusals(tiny_model_dir, tofu_split, tmp_path):
    cfg = config(tiny_model_dir, tofu_split, tmp_path, "model.lora.target_modules=[q_proj,v_proj]")
    assert cfg.model.lora.r == 4 and cfg.model.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.export.lora == "merged"
    with pytest.raises(ConfigError, match=r"model\.lora\.r must be positive"):
        config(tiny_model_dir, tofu_split, tmp_path, "model.lora.r=0")
    with pytest.raises(ConfigError, match=r"export\.lora"):
        config(tiny_model_dir, tofu_split, tmp_path, "export.lora=both")


@pytest.fixture(scope="module")
def npo_runs(tiny_model_dir, tofu_split, tmp_path_factory):
    """NPO + NGDiff + AutoLR with LoRA: the reference from the same model with adapters disabled, and from an
    explicit frozen copy of the base model (model.reference_path)."""
    out = tmp_path_factory.mktemp("lora_npo")
    common = ["method.forget_objective=npo", "autolr.enabled=true", "autolr.every=2"]
    disabled = run_training(config(tiny_model_dir, tofu_split, out / "disabled", *common), DistContext())
    explicit = run_training(
        config(tiny_model_dir, tofu_split, out / "copy", *common, f"model.reference_path={tiny_model_dir}"),
        DistContext(),
    )
    return disabled, explicit


def test_only_adapters_train(npo_runs, tiny_model_dir):
    outcome, _ = npo_runs
    backend = outcome.trainer.backend
    names = {id(p): n for n, p in backend.module.named_parameters()}
    assert backend.params and all(".lora_" in names[id(p)] for p in backend.params)
    state = trained_state(outcome)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name, tensor in state.items():
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if ".lora_" not in name and plain in base:
            assert torch.equal(tensor, base[plain]), name
    lora_b = [t for n, t in state.items() if ".lora_B." in n]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # the adapters moved (B starts at zero)


def test_adapters_disabled_reference_equals_frozen_copy(npo_runs):
    disabled, explicit = npo_runs
    assert disabled.trainer.reference is not None and not isinstance(disabled.trainer.reference, torch.nn.Module)
    assert isinstance(explicit.trainer.reference, torch.nn.Module)
    assert max_diff(trained_state(disabled), trained_state(explicit)) <= 1e-6
    for a, b in zip(disabled.results, explicit.results, strict=True):
        assert a.metrics()["loss_forget"] == pytest.approx(b.metrics()["loss_forget"], rel=1e-6)
        assert a.metrics()["lr"] == pytest.approx(b.metrics()["lr"], rel=1e-6)
    # NPO's loss moves once the adapters differ from the base: a reference with adapters on would not
    assert disabled.results[-1].metrics()["loss_forget"] != pytest.approx(disabled.results[0].metrics()["loss_forget"])


def test_merged_export_equals_base_plus_adapter(npo_runs, tiny_model_dir, tmp_path):
    from peft import PeftModel

    outcome, _ = npo_runs
    backend = outcome.trainer.backend
    backend.export_pretrained(tmp_path / "adapter", lora="adapter")
    backend.export_pretrained(tmp_path / "merged", lora="merged")
    adapter_keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert adapter_keys and all(".lora_" in k for k in adapter_keys)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert merged.keys() == expected.keys()
    assert max_diff(merged, expected) <= 1e-6
    assert max_diff(merged, AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()) > 1e-4


def test_final_export_follows_export_lora(npo_runs):
    outcome, _ = npo_runs
    final = outcome.final_dir
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()


def test_resumed_lora_run_equals_uninterrupted(tiny_model_dir, tofu_split, tmp_path):
    extra = ["optim.name=adamw", "optim.lr=0.01", "autolr.enabled=true", "autolr.every=2", "train.max_steps=4"]
    uninterrupted = run_training(config(tiny_model_dir, tofu_split, tmp_path / "a", *extra), DistContext())

    class Crash(Exception):
        pass

    def crash_after_3(trainer):
        step = trainer.unlearning_step

        def maybe_crash():
            if trainer.step_index == 3:
                raise Crash
            return step()

        trainer.unlearning_step = maybe_crash

    resumable = [*extra, "train.save_every=2"]
    with pytest.raises(Crash):
        run_training(
            config(tiny_model_dir, tofu_split, tmp_path / "b", *resumable), DistContext(), on_trainer=crash_after_3
        )
    checkpoint = tmp_path / "b" / "checkpoints" / "step_00000002" / "engine" / "model_optimizer.pt"
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert saved and all(".lora_" in k for k in saved)  # adapters only, no base weights
    resumed = run_training(
        config(tiny_model_dir, tofu_split, tmp_path / "b", *resumable, "train.resume=auto"), DistContext()
    )
    assert len(resumed.results) == 2
    assert max_diff(trained_state(uninterrupted), trained_state(resumed)) <= 1e-6


def test_eval_accepts_an_adapter_folder(npo_runs, tmp_path):
    """`ngdiff eval --model` on the adapter folder scores what it scores on the merged export."""
    from tests.eval.test_eval_cli import run_eval

    backend = npo_runs[0].trainer.backend
    backend.export_pretrained(tmp_path / "adapter", npo_runs[0].trainer.tokenizer, lora="adapter")
    backend.export_pretrained(tmp_path / "merged", npo_runs[0].trainer.tokenizer, lora="merged")
    assert not (tmp_path / "adapter" / "config.json").exists()
    from_adapter = run_eval(tmp_path / "adapter", tmp_path / "eval_adapter")
    from_merged = run_eval(tmp_path / "merged", tmp_path / "eval_merged")
    assert leaves(from_adapter).keys() == leaves(from_merged).keys()
    for key, value in leaves(from_adapter).items():  # same texts; numbers up to the merge's fp32 rounding
        assert value == (pytest.approx(leaves(from_merged)[key], rel=1e-4) if isinstance(value, float) else value), key


def leaves(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in leaves(sub, f"{prefix}/{i}").items()}
    return {prefix: tree}


def test_memory_plan_counts_only_the_adapters():
    from ngdiff.memory_plan import PlanSettings, component_bytes, llama_config, model_shape

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    shape = model_shape(llama_config("llama2-7b"), targets, 8)
    h, inter = 4096, 11008  # per layer r x (in + out): 4 attention projections h x h, 3 MLP ones h x I
    assert shape.lora_params == 32 * 8 * (4 * 2 * h + 3 * (h + inter)) == 19_988_480
    settings = PlanSettings(optimizer="sgd", autolr=True, reference=True, reference_copy=False)
    device, _ = component_bytes(shape, settings)
    r = shape.lora_params
    assert (device["gradients"], device["stash"], device["autolr_copy"]) == (4 * r, 4 * r, 4 * r)
    assert device["reference_model"] == 0 and device["optimizer_state"] == 0
    assert device["parameters"] == 4 * shape.params + 4 * r
    full, _ = component_bytes(replace(shape, lora_params=0), replace(settings, reference_copy=True))
    assert full["gradients"] == full["reference_model"] == 4 * shape.params


def test_target_modules_that_match_nothing_name_the_key(tiny_model_dir, tofu_split, tmp_path):
    from ngdiff.lora import LoraTargetError

    cfg = config(tiny_model_dir, tofu_split, tmp_path, "model.lora.target_modules=[no_such_proj]")
    with pytest.raises(LoraTargetError, match=r"model\.lora\.target_modules=\['no_such_proj'\]"):
        run_training(cfg, DistContext())


FSDP_META_LOAD = """
import sys
from unittest.mock import patch

import torch

from ngdiff.config import LoraConfig, OptimConfig, ParallelConfig
from ngdiff.lora import WithAdapters
from ngdiff.modeling import ModelSource, model_factory
from parallel.base import DistContext
from parallel.distributed import init_single_process_group
from parallel.fsdp import FSDPBackend

builder = WithAdapters(model_factory(sys.argv[1]), LoraConfig(enabled=True, r=4, alpha=8), seed=1234)
whole = {k: v.clone() for k, v in builder().state_dict().items()}  # today's whole build, on one process

def forbidden(source):
    raise AssertionError("the base was loaded whole (from_pretrained)")

calls = []
build_empty = WithAdapters.build_empty
def counted(self):
    calls.append(1)
    return build_empty(self)

ctx = DistContext()
init_single_process_group(ctx)
backend = FSDPBackend(ctx, ParallelConfig(backend="fsdp"), OptimConfig(name="sgd"), "fp32")
with patch.object(ModelSource, "__call__", forbidden), patch.object(WithAdapters, "build_empty", counted):
    backend.prepare(builder)
assert calls == [1], calls
sharded = backend.full_state_dict()
assert sharded.keys() == whole.keys()
differ = [k for k in sharded if not torch.equal(sharded[k], whole[k])]
assert not differ, differ
trained = {n for n, p in backend.module.named_parameters() if p.requires_grad}
assert trained and all(".lora_" in n for n in trained)
lora_a = [v for k, v in sharded.items() if ".lora_A." in k]
assert lora_a and all(float(v.abs().max()) > 0 for v in lora_a)  # the random half of the initialisation
print("ok", len(sharded))
"""


def test_fsdp_builds_the_lora_model_on_meta_equal_to_the_whole_build(tiny_model_dir):
    """FSDP's LoRA model comes from `build_empty` (the base on `meta`, filled from the safetensors; the
    adapters drawn like peft's whole build) with `from_pretrained` forbidden, and equals the whole build
    bit for bit, random lora_A included. Run in its own process: it starts a 1-rank process group."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", FSDP_META_LOAD, str(tiny_model_dir)], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("ok"), done.stdout  # gloo may print before it
