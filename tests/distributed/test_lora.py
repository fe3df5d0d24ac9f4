"""LoRA under the sharded backends: 2 ranks (ddp, fsdp, zero3) equal 1 process (fp32, CPU, gloo), with every
combiner, AutoLR, and NPO / KL whose reference is the base model with adapters disabled; a resumed run
equals an uninterrupted one. FSDP loads every case shard by shard (`from_pretrained` forbidden); the adapter
export gathers only the adapters and equals the 1-process one."""

from __future__ import annotations

import sys

import pytest
from dist_helpers import (
    STEPS,
    common_overrides,
    deepspeed_launcher,
    load_one_and_two_ranks,
    load_result,
    lora_backend_cases,
    lora_matrix,
    max_abs_diff,
    run_cases,
    torchrun,
)

pytestmark = pytest.mark.distributed

LORA_BACKENDS = ("ddp", "fsdp", "zero3")


@pytest.fixture(scope="session")
def lora_runs(tmp_path_factory, tiny_model_dir, tofu_split):
    out = tmp_path_factory.mktemp("lora_runs")
    common = common_overrides(tiny_model_dir, tofu_split)
    launches = [
        ([sys.executable], lora_backend_cases("single"), "single"),
        (torchrun(), [*lora_backend_cases("ddp"), *lora_backend_cases("fsdp")], "torchrun"),
        (deepspeed_launcher(), lora_backend_cases("zero3"), "deepspeed"),
    ]
    return run_cases(out, common, launches)


@pytest.mark.parametrize("case", list(lora_matrix()))
@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_lora_two_ranks_equal_one_process(lora_runs, backend, case):
    reference, ref_log, sharded, log = load_one_and_two_ranks(lora_runs, f"single_{case}", f"{backend}_{case}")
    assert all(".lora_" in k for k in reference if "lora" in k)
    assert max_abs_diff(reference, sharded) <= 1e-5
    # NPO: as in test_equivalence. KL to a reference that is the model plus a small adapter: a ~1e-4 difference
    # of ~5-sized fp32 log-probs, so its value and gradient carry fp32 rounding of the log-probs, not of the KL
    rel = 1e-5 if "npo" in case or "kl" in case else 1e-6
    absolute = 1e-7 if "kl" in case else 1e-9
    for ours, ref in zip(log["steps"], ref_log["steps"], strict=True):
        for key in ("loss_retain", "loss_forget", "cos_retain_forget", "w_retain", "w_forget", "lr"):
            if key == "cos_retain_forget" and ref["loss_retain"] == 0:
                continue  # KL to the reference at step 1: the model is the reference, the gradient is 0, cos 0/0
            assert ours[key] == pytest.approx(ref[key], rel=rel, abs=absolute), key


def test_lora_adapters_moved(lora_runs):
    """The equality above is not between two untrained models: the adapters' B matrices left zero."""
    reference, _ = load_result(lora_runs, "single_lora_npo_ngdiff_sgd_autolr")
    lora_b = [t for k, t in reference.items() if ".lora_B." in k]
    assert lora_b and all(float(t.abs().max()) > 1e-4 for t in lora_b)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_lora_resume_after_crash_equals_uninterrupted(lora_runs, backend):
    uninterrupted, _ = load_result(lora_runs, f"{backend}_lora_ngdiff_adamw_autolr")
    resumed, log = load_result(lora_runs, f"{backend}_lora_resume")
    assert log["crashed_at"] == 3
    assert len(log["steps"]) == STEPS - 2
    assert max_abs_diff(uninterrupted, resumed) <= 1e-6


def checkpoint_model_keys(engine_dir, backend: str) -> list[str]:
    import torch

    if backend == "fsdp":
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(engine_dir)).read_metadata().state_dict_metadata
        return [k for k in keys if k.startswith("model.")]
    if backend == "zero3":
        files = sorted((engine_dir / "zero3").glob("*model_states.pt"))
        return [k for f in files for k in torch.load(f, weights_only=False)["module"]]
    return list(torch.load(engine_dir / "model_optimizer.pt", weights_only=True)["model"])


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_lora_checkpoint_holds_only_adapters(lora_runs, backend):
    engine = lora_runs / "runs" / f"{backend}_lora_resume" / "checkpoints" / "step_00000002" / "engine"
    keys = checkpoint_model_keys(engine, backend)
    assert keys and all(".lora_" in k for k in keys), [k for k in keys if ".lora_" not in k][:3]


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_lora_adapter_export_equals_one_process_and_gathers_only_adapters(lora_runs, backend):
    from safetensors.torch import load_file

    state, ref_log = load_result(lora_runs, "single_lora_adapter_export")
    _, log = load_result(lora_runs, f"{backend}_lora_adapter_export")
    folder = lora_runs / "runs" / f"{backend}_lora_adapter_export" / "final"
    reference = load_file(lora_runs / "runs" / "single_lora_adapter_export" / "final" / "adapter_model.safetensors")
    exported = load_file(folder / "adapter_model.safetensors")
    assert (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
    adapters = [k for k in state if ".lora_" in k]
    assert len(reference) == len(adapters) > 0 and reference.keys() == exported.keys()
    assert max(float((exported[k] - reference[k]).abs().max()) for k in reference) <= 1e-5
    assert max(float(reference[k].abs().max()) for k in reference if ".lora_B." in k) > 1e-4  # trained
    # what the export asked the engine for: the adapters only, each gathered once (fsdp, zero3: one gather each)
    assert log["export_names"] == ref_log["export_names"] == adapters
    assert log["export_gathers"] == (0 if backend == "ddp" else len(adapters))
