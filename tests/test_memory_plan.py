"""`ngdiff plan`: exact parameter counts from a meta-device build, the documented formulas on hand-made
shapes, the cheapest change that fits, and the command line (no weights, no data files)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from launcher.cli import main
from ngdiff.memory_plan import (
    COMPONENTS,
    ModelShape,
    PlanSettings,
    component_bytes,
    llama_config,
    model_shape,
    plan,
)

SHAPE = ModelShape(
    params=1000, block_params=100, outside_params=200, layers=8, hidden=16, intermediate=32, kv_width=16, vocab=50
)


def test_shape_counts_the_real_models_parameters(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    real = AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.params == sum(p.numel() for p in real.parameters())
    blocks = real.model.layers
    assert shape.block_params == sum(p.numel() for p in blocks[0].parameters())
    assert shape.outside_params == shape.params - len(blocks) * shape.block_params
    assert (shape.layers, shape.hidden, shape.vocab) == (2, 32, config.vocab_size)


def test_llama2_7b_shape_has_its_published_parameter_count():
    assert model_shape(llama_config("llama2-7b")).params == 6_738_415_616  # meta-llama/Llama-2-7b-hf


def test_fsdp_components_follow_the_formulas():
    settings = PlanSettings(backend="fsdp", world_size=4, autolr=True, micro_batch=1, max_length=10)
    device, host = component_bytes(SHAPE, settings)
    per_token = 8 * (32 * 16 + 8 * 16 + 16 * 32) + 12 * 50 + 16 * 16  # layers, logits, rest
    assert device == {
        "parameters": 4 * 250 + 4 * (2 * 100 + 200),  # fp32 shard + gathered running/prefetched block and root
        "gradients": 4 * 250 + 4 * (100 + 200),  # fp32 shard + one unsharded block and the root in flight
        "stash": 4 * 250,
        "optimizer_state": 8 * 250,
        "autolr_copy": 4 * 250,
        "reference_model": 0,
        "activations": 10 * per_token - 4 * 250,  # the backward allocates the dropped gradient shard as it goes
    }
    assert host == {}


def test_single_with_reference_bf16_stash_and_plain_sgd():
    settings = PlanSettings(optimizer="sgd", reference=True, stash_dtype="bf16", max_length=10)
    device, _ = component_bytes(SHAPE, settings)
    per_token = 8 * 1152 + 12 * 50 + 4 * 50 + 16 * 16  # + the reference model's logits
    assert device == {
        "parameters": 4000,
        "gradients": 4000,
        "stash": 2000,
        "optimizer_state": 0,
        "autolr_copy": 0,
        "reference_model": 4000,
        # the whole per-rank batch of 8 at once, and the head's gradient, above the gradients (dropped)
        "activations": 8 * 10 * per_token + 4 * 50 * 16 - 4000,
    }


def test_zero3_offload_moves_the_sharded_state_to_the_host():
    settings = PlanSettings(backend="zero3", world_size=2, precision="bf16", cpu_offload=True, reduce_bucket=300)
    device, host = component_bytes(SHAPE, replace(settings, max_live=300))
    assert device["parameters"] == 2 * 500 + 2 * (2 * 100 + 200)  # bf16 partition + the running blocks and root
    assert device["gradients"] == 2 * 2 * 300  # the reduce bucket and its flat copy
    # under max_live, DeepSpeed keeps the whole model gathered (parameters reused within the reuse distance)
    assert component_bytes(SHAPE, settings)[0]["parameters"] == 2 * 500 + 2 * 1000
    assert device["stash"] == device["optimizer_state"] == 0
    assert host == {"parameters": 4 * 500, "gradients": 4 * 500, "stash": 4 * 500, "optimizer_state": 8 * 500}


def test_checkpointing_keeps_block_inputs_and_one_recomputed_block():
    base = PlanSettings(micro_batch=1, max_length=10)
    full = component_bytes(SHAPE, base)[0]["activations"]
    kept = component_bytes(SHAPE, replace(base, gradient_checkpointing=True))[0]["activations"]
    assert full - kept == 10 * (7 * 1152 - 8 * 4 * 16)


def test_the_cheapest_change_that_fits_is_suggested():
    settings = PlanSettings(backend="fsdp", world_size=2, micro_batch=1, max_length=1)
    total = plan(SHAPE, settings, 10**9).total_bytes
    stash = component_bytes(SHAPE, settings)[0]["stash"]
    tight = plan(SHAPE, settings, total - stash // 4)
    assert not tight.fits
    assert tight.suggestion["change"] == "bf16 stash"
    assert tight.suggestion["overrides"] == {"parallel.stash_dtype": "bf16"}
    assert tight.suggestion["total_bytes"] == total - stash // 2
    # a big model on few ranks: only more ranks help; the smallest count that fits is named
    big = replace(SHAPE, params=10**9, block_params=10**7, outside_params=10**6)
    needs_ranks = plan(big, replace(settings, stash_dtype="bf16", stash_offload=True), 8 * 10**9)
    ranks = needs_ranks.suggestion["overrides"]["world_size"]
    assert plan(big, replace(settings, world_size=ranks), 8 * 10**9).fits
    assert not plan(big, replace(settings, world_size=ranks // 2), 8 * 10**9).fits


def test_plan_command_json_needs_no_data_and_no_weights(tiny_model_dir, capsys, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())  # no weights beside it
    code = main(["plan", f"model.path={tmp_path}", "parallel.backend=fsdp", "--world-size", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["per_rank_bytes"]) == list(COMPONENTS)
    assert out["total_bytes"] == sum(out["per_rank_bytes"].values())
    assert out["fits"] is True
    tight = f"{int(out['total_bytes'] * 0.9)}B"
    assert main(["plan", f"model.path={tmp_path}", "parallel.backend=fsdp", "--world-size", "2", "--gpu-memory", tight,
                 "--json"]) == 0  # fmt: skip
    small = json.loads(capsys.readouterr().out)
    assert small["fits"] is False
    assert small["suggestion"]["total_bytes"] <= out["total_bytes"] * 0.9


def test_plan_command_table_and_bad_input(tiny_model_dir, capsys):
    assert main(["plan", f"model.path={tiny_model_dir}", "--gpu-memory", "80GiB"]) == 0
    table = capsys.readouterr().out
    assert "total" in table and "stash" in table and table.rstrip().endswith("fits")
    assert main(["plan", f"model.path={tiny_model_dir}", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots'" in capsys.readouterr().err
    assert main(["plan", "model.path=/no/such/dir"]) == 2
    assert "model.path: no such model directory: /no/such/dir" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["llama2-13b", "llama2-70b"])
def test_presets_plan_without_a_model_path(preset, capsys):
    assert main(["plan", "parallel.backend=fsdp", "--world-size", "64", "--model-config", preset, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == preset


def test_k_tasks_stash_k_minus_one_gradients(tiny_model_dir, capsys, tmp_path):
    """Three forget files and one retain file: four tasks, three stashed gradient shards."""
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    stashes = []
    for forget in ("a.jsonl", "a.jsonl,b.jsonl,c.jsonl"):
        args = ["plan", f"model.path={tmp_path}", f"data.forget={forget}", "data.retain=r.jsonl"]
        assert main([*args, "parallel.backend=fsdp", "--world-size", "2", "--json"]) == 0
        stashes.append(json.loads(capsys.readouterr().out)["per_rank_bytes"]["stash"])
    assert stashes[0] > 0 and stashes[1] == 3 * stashes[0]
