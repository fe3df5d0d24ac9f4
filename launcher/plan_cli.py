"""`ngdiff plan`: will this run fit? Memory per rank from the model's config.json alone (no weights, no data).

ngdiff plan CONFIG [key=value ...] --world-size 8 [--gpu-memory 80GiB] [--json] [--model-config llama2-7b]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from launcher.cli import split_config_and_overrides, subcommand
from ngdiff.config import ConfigError, load_config

UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # fmt: skip


DEFAULT_GPU_MEMORY = "80GiB"


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '80g', '81920MiB'; a bare number is GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: give a positive size such as 80GiB, 80GB or 81920MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG] KEY=VALUE", help="YAML file, then dotted overrides")
    parser.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs) the run would use")
    parser.add_argument(
        "--gpu-memory",
        default=None,
        help=f"memory of one accelerator (default {DEFAULT_GPU_MEMORY}, an 80 GB A100/H100)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    parser.add_argument(
        "--model-config",
        default="",
        help="a config.json file or a preset (llama2-7b, llama2-13b, llama2-70b) instead of model.path's config",
    )


@subcommand("plan", "predict memory per rank of a run from the model's config.json (no weights, no data)",
            add_plan_arguments)  # fmt: skip
def run_plan(args: argparse.Namespace) -> int:
    from ngdiff.memory_plan import plan, settings_from_config

    if args.world_size < 1:
        raise ConfigError(f"--world-size must be at least 1, got {args.world_size}")
    capacity = parse_bytes(args.gpu_memory or DEFAULT_GPU_MEMORY)
    capacity_note = "" if args.gpu_memory else " (the default; set yours with --gpu-memory, e.g. --gpu-memory 40GiB)"
    config_path, overrides = split_config_and_overrides(args.items)
    cfg = load_config(config_path, overrides, check_sources=False)
    note = ""
    if cfg.parallel.backend == "single" and args.world_size > 1:  # one process cannot use N ranks: plan a sharded run
        cfg = load_config(config_path, [*overrides, "parallel.backend=fsdp"], check_sources=False)
        note = (
            f"parallel.backend=single runs one process; planned for {args.world_size} ranks as parallel.backend=fsdp "
            "(add parallel.backend=ddp or zero3 to plan those instead)"
        )
    shape, source = read_shape(cfg, args.model_config)
    result = plan(shape, settings_from_config(cfg, args.world_size, shape.hidden), capacity)
    if args.json:
        print(json.dumps({"model": source, **({"note": note} if note else {}), **result.as_dict()}, indent=1))
    else:
        print(f"note: {note}\n" if note else "", end="")
        print(render(result, source, capacity_note))
    return 0


def read_shape(cfg, model_config: str):
    """The model's shape from `--model-config` or from model.path's config.json (local folder or hub); with
    LoRA, its adapter parameters counted on the same meta-device model."""
    from ngdiff.memory_plan import model_shape

    lora = cfg.model.lora
    targets, r = (tuple(lora.target_modules), lora.r) if lora.enabled else ((), 0)
    shape = model_shape(read_hf_config(cfg, model_config), targets, r)
    if r and not shape.lora_params:
        raise ConfigError(f"model.lora.target_modules={list(targets)} names no Linear layer of the model")
    return shape, model_config or cfg.model.path


def read_hf_config(cfg, model_config: str):
    """The Hugging Face config of `--model-config` (a file or a preset) or of model.path."""
    from ngdiff.memory_plan import LLAMA2_CONFIGS, llama_config
    from ngdiff.model_source import ModelSourceError, check_model_source, loading_from

    if model_config in LLAMA2_CONFIGS:
        return llama_config(model_config)
    from transformers import AutoConfig

    if model_config:
        try:
            return AutoConfig.from_pretrained(model_config)
        except (OSError, ValueError) as err:
            presets = ", ".join(LLAMA2_CONFIGS)
            raise ConfigError(
                f"--model-config {model_config}: not a readable config.json or a preset ({presets}): {err}"
            ) from None
    if not cfg.model.path:
        raise ConfigError("model.path is required (or pass --model-config FILE or a preset)")
    try:
        check_model_source("model.path", cfg.model.path)
    except ModelSourceError as err:
        raise ConfigError(str(err)) from None
    if Path(cfg.model.path).expanduser().is_dir():
        with loading_from("model.path", cfg.model.path):
            return AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    try:  # a hub name whose config.json is cached: no network
        return AutoConfig.from_pretrained(
            cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError):
        pass
    unreachable = hub_unreachable()
    if unreachable:  # fail at once, not after the hub client's retries
        raise ConfigError(
            f"model.path={cfg.model.path}: its config.json is not cached and {unreachable}; plan from a shape "
            f"instead: --model-config {' | '.join(LLAMA2_CONFIGS)} | path/to/config.json"
        )
    with loading_from("model.path", cfg.model.path):
        return AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def hub_unreachable(timeout: float = 3.0) -> str:
    """Why the Hugging Face hub cannot be asked (offline mode, or its endpoint refuses or does not answer
    within `timeout` seconds), or '' when it answers."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set (no hub access)"
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        return f"the hub at {constants.ENDPOINT} cannot be reached ({err.strerror or err})"
    return ""


def explain(name: str, result) -> str:
    """What one line of the table holds, in this run's terms (the formulas: ngdiff/memory_plan.py)."""
    from ngdiff.memory_plan import activation_bytes, format_bytes, micro_tokens

    s, shape = result.settings, result.shape
    sharded = s.backend in ("fsdp", "zero3")
    share = f"1/{s.world_size} shard" if sharded else "full copy"
    if name == "parameters":
        return f"weights, {share}" + (" + the blocks gathered for compute" if sharded else "")
    if name == "gradients":
        return f"gradient, {share}" + (" + buffers in flight" if s.backend != "single" else "")
    if name == "stash":
        return f"NGDiff's copy of the retain gradient ({s.stash_dtype}{', in host memory' if s.stash_offload else ''})"
    if name == "optimizer_state":
        if s.optimizer == "adamw":
            return "AdamW's two moments"
        return "SGD momentum buffer" if s.momentum > 0 else "none: plain SGD keeps no state"
    if name == "autolr_copy":
        return "AutoLR's copy of the weights for its probes" if s.autolr else "none: autolr.enabled=false"
    if name == "reference_model":
        return "frozen reference (NPO, KL)" if s.reference else "none: the objectives need no reference"
    if name == "activations":
        held, counted = activation_bytes(shape, s), result.per_rank_bytes["activations"]
        how = (
            "block inputs + one recomputed block (gradient checkpointing)" if s.gradient_checkpointing else "all layers"
        )
        text = f"{micro_tokens(s)} tokens/micro-batch, {how}: {format_bytes(held)}"
        if counted == 0:
            return text + ", freed while the backward makes the gradients: none above them"
        if counted < held:
            return text + f", {format_bytes(counted)} above the gradients the backward makes as it frees them"
        return text
    return ""


def render(result, source: str, capacity_note: str = "") -> str:
    from ngdiff.memory_plan import format_bytes, micro_tokens

    s = result.settings
    lines = [
        f"{source}: {result.shape.params / 1e9:.3f}B parameters; {s.backend} on {s.world_size} rank(s), {s.precision}, "
        f"{micro_tokens(s)} tokens per micro-batch (max_length {s.max_length}), "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
        "",
        f"{'per rank':<18}{'bytes':>14}   what",
    ]
    for name, value in result.per_rank_bytes.items():
        lines.append(f"{name:<18}{format_bytes(value):>14}   {explain(name, result)}")
    lines.append(
        f"{'total':<18}{format_bytes(result.total_bytes):>14}   of {format_bytes(result.capacity_bytes)}{capacity_note}"
    )
    if result.host_bytes:
        held = ", ".join(f"{k} {format_bytes(v)}" for k, v in result.host_bytes.items())
        lines.append(f"in host memory: {held}")
    lines.append(
        "not counted: loading peaks, the CUDA context, allocator fragmentation; step time: not estimated "
        "(docs/benchmarks.md has measured step times)"
    )
    lines.append("")
    if result.fits:
        lines.append("fits")
    elif result.suggestion is None:
        lines.append("does NOT fit, and no change tried here (up to 4096 ranks with CPU offload) makes it fit")
    else:
        change = result.suggestion
        how = " ".join(
            f"--world-size {v}" if k == "world_size" else f"{k}={json.dumps(v)}" for k, v in change["overrides"].items()
        )
        lines.append(
            f"does NOT fit; cheapest change that fits: {change['change']} ({how}) -> "
            f"{format_bytes(change['total_bytes'])} per rank"
        )
        if change.get("also_fits"):
            lines.append(f"each of these alone would fit too (dearer): {', '.join(change['also_fits'])}")
    return "\n".join(lines)
