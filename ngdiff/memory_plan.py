"""Accelerator memory per rank of one unlearning step, predicted from the model's config alone.

Pure functions from (model shape, run settings, world size) to bytes per component. The model is
built on the `meta` device to count its parameters exactly (no weights are read). What is modelled is
the steady state of a step (the peak during the forget task's backward, or during the optimizer
step when that is higher); loading peaks, the CUDA context and allocator fragmentation are not.

Notation: P parameters, N ranks, S = 1/N for the sharded backends (fsdp, zero3) and 1 for single/ddp,
c = bytes of a compute element (2 in bf16, 4 in fp32), B the largest decoder block's parameters, O
the parameters outside the decoder blocks (embeddings, head, final norm), T = micro-batch x max_length
tokens of one micro-batch on this rank.

Per component (single/ddp | fsdp | zero3):
- parameters: 4P fp32 (+2 x linear weights: bf16 autocast's cast cache) | 4PS master shard + c(2B + O)
  gathered (the running and the prefetched block, the root's embeddings and head) | cPS partition + 4PS
  fp32 master (none in fp32 without offload: the partition is the master, see parallel/compat/deepspeed.py
  `fp32_master_is_the_partition`) + c max(2B + O, min(P, max_live)) gathered (DeepSpeed keeps parameters it will reuse
  within `stage3_max_reuse_distance` gathered, up to `stage3_max_live_parameters`).
- gradients: 4P (ddp: +4P reducer buckets) | 4PS + 4(B + O) unsharded in flight | 4PS + 2c min(bucket, P)
  (DeepSpeed's reduce bucket, `reduce_bucket_size`, and its flat reduce-scatter copy). Both sizes are the
  backend's own (`parallel.planned_buffers`, from parallel/deepspeed_sizing.py): the user's numbers, else
  h^2 and 10 h^2 for "auto" or absent keys, else DeepSpeed's defaults (5e8, 1e9) when h is unknown.
- stash (NGDiff's retain-gradient copy): one gradient shard, 4PS (2PS with `parallel.stash_dtype=bf16`,
  in host memory with `parallel.stash_offload`); k - 1 of them for k tasks (several forget/retain files).
- optimizer state: AdamW 8PS, SGD with momentum 4PS, plain SGD 0; plus the step's temporaries (AdamW's
  foreach sqrt buffer, 4PS) where they exceed the stash and activations the backward held.
- AutoLR copy: 4PS when `autolr.enabled` (one fp32 parameter shard).
- reference model (NPO, KL): 4P | 4PS | cPS; none with LoRA (the base with adapters disabled).
- LoRA (`model.lora.enabled`): only the R adapter parameters train, so gradients, stash, optimizer state
  and AutoLR copy above hold R (RS sharded) instead of P; the adapters add 4R (4RS) to the parameters, the
  frozen head makes no gradient, and FSDP's in-flight unsharded gradients are at most 4R.
- activations: A = T x (L x per-layer + 12V + 16h): the saved tensors of every layer, the fp32
  log-softmax kept for the backward with its gradient and the logits' gradient, a small per-token rest
  (+4V with a reference model's logits). single, ddp and fsdp drop their gradients in `zero_grad`, so
  the backward allocates gradients while it frees activations: the component is what the backward's
  peak adds above the gradients, max(0, A + 4Vh - 4P) (single/ddp; 4Vh the head's gradient, made first)
  or max(0, A - 4PS) (fsdp). ZeRO-3 keeps its gradient buffers: A.

Per layer and token (bytes, measured with saved-tensor hooks on transformers' Llama, torch 2.13):
fp32 `32h + 8kv + 16I`; bf16 compute weights (fsdp/zero3) `20h + 4kv + 8I`; bf16 autocast over fp32
weights (single/ddp) `30h + 4kv + 8I`, h hidden, kv the key/value width, I the MLP width. Gradient
checkpointing keeps only each block's input (4h, or 2h with bf16 weights) plus one block recomputed.
With `parallel.cpu_offload` the sharded parameters, gradients, optimizer state, stash and AutoLR copy
of fsdp (FSDP2's CPUOffloadPolicy), or the fp32 master, gradients, optimizer state, stash and AutoLR
copy of zero3 (`offload_optimizer`), live in host memory and are reported in `host_bytes`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Any

from parallel import planned_buffers, shards_parameters

COMPONENTS = (
    "parameters",
    "gradients",
    "stash",
    "optimizer_state",
    "autolr_copy",
    "reference_model",
    "activations",
)
GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: exact parameter counts (from a meta-device build) and the layer sizes."""

    params: int
    block_params: int  # the largest decoder block
    outside_params: int  # embeddings, head, final norm: everything outside the decoder blocks
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    lora_params: int = 0  # adapter parameters when LoRA is on (then only they train); 0: full training

    @property
    def linear_params(self) -> int:
        """Weights that bf16 autocast casts (and caches) during a forward: the blocks and the head."""
        return self.layers * self.block_params + self.vocab * self.hidden


@dataclass(frozen=True)
class PlanSettings:
    """The run settings memory depends on (see `settings_from_config`)."""

    backend: str = "single"
    world_size: int = 1
    precision: str = "fp32"
    optimizer: str = "adamw"
    momentum: float = 0.0
    autolr: bool = False
    reference: bool = False
    reference_copy: bool = True  # False: a LoRA run's reference is the base with adapters disabled, no copy
    forget_batch: int = 8  # global
    retain_batch: int = 8
    micro_batch: int = 0  # per rank; 0: the whole per-rank batch
    max_length: int = 256
    gradient_checkpointing: bool = False
    cpu_offload: bool = False
    stash_dtype: str = "fp32"
    stash_offload: bool = False
    stashes: int = 1  # k - 1 for k tasks: every task's gradient but the last is stashed
    # the engine's buffers in elements (zero3: reduce bucket, gathered parameters kept for reuse), as the
    # backend would configure them (`parallel.planned_buffers`); None: the engine's defaults
    reduce_bucket: int | None = None
    max_live: int | None = None


@dataclass
class MemoryPlan:
    settings: PlanSettings
    shape: ModelShape
    per_rank_bytes: dict[str, int]
    host_bytes: dict[str, int]
    capacity_bytes: int
    suggestion: dict[str, Any] | None = field(default=None)

    @property
    def total_bytes(self) -> int:
        return sum(self.per_rank_bytes.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.settings.backend,
            "world_size": self.settings.world_size,
            "parameters": self.shape.params,
            "per_rank_bytes": dict(self.per_rank_bytes),
            "total_bytes": self.total_bytes,
            "host_bytes": dict(self.host_bytes),
            "capacity_bytes": self.capacity_bytes,
            "fits": self.fits,
            "suggestion": self.suggestion,
        }


# ------------------------------------------------------------------------------------ model shape
def model_shape(hf_config: Any, lora_targets: tuple[str, ...] = (), lora_r: int = 0) -> ModelShape:
    """Count parameters exactly by building the model on the meta device (no memory, no weights). With
    `lora_r`, also the LoRA parameters r x (in + out) of every Linear whose name ends in one of `lora_targets`
    (peft's matching of plain module names)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    params = sum(p.numel() for p in model.parameters())
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks] or [0]
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(
        params=params,
        block_params=max(block_sizes),
        outside_params=params - sum(block_sizes),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        kv_width=kv_heads * head_dim,
        vocab=text.vocab_size,
        lora_params=sum(
            lora_r * (m.in_features + m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in lora_targets
        )
        if lora_r
        else 0,
    )


# ------------------------------------------------------------------------------------ the formulas
def micro_tokens(s: PlanSettings) -> int:
    """Tokens of the largest micro-batch one rank runs (padding to max_length: an upper bound)."""
    per_rank = max(math.ceil(max(s.forget_batch, s.retain_batch) / s.world_size), 1)
    micro = min(s.micro_batch, per_rank) if s.micro_batch else per_rank
    return micro * s.max_length


def layer_bytes_per_token(shape: ModelShape, s: PlanSettings) -> int:
    h, kv, inter = shape.hidden, shape.kv_width, shape.intermediate
    if s.precision == "fp32":
        return 32 * h + 8 * kv + 16 * inter
    if shards_parameters(s.backend):  # bf16 compute weights: the whole graph in bf16, norms upcast
        return 20 * h + 4 * kv + 8 * inter
    return 30 * h + 4 * kv + 8 * inter  # autocast over fp32 weights: fp32 residual stream and norms


def activation_bytes(shape: ModelShape, s: PlanSettings) -> int:
    tokens = micro_tokens(s)
    per_layer = layer_bytes_per_token(shape, s)
    if s.gradient_checkpointing:
        kept = (2 if s.precision == "bf16" and shards_parameters(s.backend) else 4) * shape.hidden
        layers = shape.layers * kept + per_layer  # block inputs, plus one block recomputed in the backward
    else:
        layers = shape.layers * per_layer
    logits = 12 * shape.vocab  # fp32 log-softmax kept for the backward, its gradient and the logits' gradient
    reference_logits = 4 * shape.vocab if s.reference else 0
    return tokens * (layers + logits + reference_logits + 16 * shape.hidden)


def component_bytes(shape: ModelShape, s: PlanSettings) -> tuple[dict[str, int], dict[str, int]]:
    """(accelerator bytes, host bytes) per component on one rank; see the module docstring."""
    p = shape.params
    sharded = shards_parameters(s.backend)
    local = math.ceil(p / s.world_size) if sharded else p
    # what trains: everything, or with LoRA only the adapters (their gradients, stash, optimizer, AutoLR copy)
    t = shape.lora_params or p
    t_local = math.ceil(t / s.world_size) if sharded else t
    lora = bool(shape.lora_params)
    c = 2 if s.precision == "bf16" else 4
    gathered = c * (2 * shape.block_params + shape.outside_params) if sharded else 0
    buffers = {**planned_buffers(s.backend), **{k: v for k in ("reduce_bucket", "max_live") if (v := getattr(s, k))}}
    if s.backend == "zero3":  # DeepSpeed keeps parameters it will reuse soon gathered, up to max_live of them
        gathered = max(gathered, c * min(p, buffers["max_live"]))
    offload = s.cpu_offload and sharded
    device: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    host: dict[str, int] = {}

    def put(name: str, nbytes: int, on_host: bool = False) -> None:
        (host if on_host else device)[name] = (host if on_host else device).get(name, 0) + int(nbytes)

    # parameters
    if s.backend == "fsdp":
        put("parameters", 4 * local, on_host=offload)
    elif s.backend == "zero3":
        put("parameters", c * local)
        if s.precision == "bf16" or offload:  # fp32 on the device: the partition is its own master
            put("parameters", 4 * local, on_host=offload)  # fp32 master partition, held by the optimizer
    else:
        put("parameters", 4 * p + (2 * shape.linear_params if s.precision == "bf16" else 0))
    if lora:  # the adapters on top of the frozen base (fsdp/zero3: sharded with it)
        put("parameters", 4 * t_local, on_host=offload and s.backend == "fsdp")
    put("parameters", gathered)
    # gradients
    put("gradients", 4 * t_local, on_host=offload)
    if s.backend == "fsdp":
        put("gradients", 4 * min(t, shape.block_params + shape.outside_params))
    elif s.backend == "zero3":
        put("gradients", 2 * c * min(buffers["reduce_bucket"], t))  # the reduce bucket and its flat reduce-scatter copy
    elif s.backend == "ddp":
        put("gradients", 4 * t)
    # the gradient stash: one gradient shard per task but the last (k - 1; the retain gradient for two tasks)
    put("stash", s.stashes * (2 if s.stash_dtype == "bf16" else 4) * t_local, on_host=s.stash_offload or offload)
    # optimizer state (+ the step's temporaries where they exceed what the backward held)
    slots = 2 if s.optimizer == "adamw" else (1 if s.momentum > 0 else 0)
    put("optimizer_state", 4 * slots * t_local, on_host=offload)
    # single, ddp and fsdp drop the gradients in zero_grad: the backward allocates them while it frees
    # the activations, so only the activations (and, without sharding, the head's gradient, made before
    # any activation is freed) above the gradients add to the peak. ZeRO-3 keeps its gradient buffers.
    released = 0 if s.backend == "zero3" or offload else 4 * t_local
    head = 4 * shape.vocab * shape.hidden if not sharded and not lora else 0  # LoRA: the head is frozen
    step_temporaries = 0 if offload else 4 * t_local * (1 if s.optimizer == "adamw" else 0)
    backward_extra = device["stash"] + max(0, activation_bytes(shape, s) + head - released)
    put("optimizer_state", max(0, step_temporaries - backward_extra))
    put("autolr_copy", 4 * t_local if s.autolr else 0, on_host=offload)
    if s.reference and s.reference_copy:
        put("reference_model", (c if s.backend == "zero3" else 4) * local, on_host=offload and s.backend == "fsdp")
    put("activations", max(0, activation_bytes(shape, s) + head - released))
    return device, {k: v for k, v in host.items() if v}


def plan(shape: ModelShape, settings: PlanSettings, capacity_bytes: int) -> MemoryPlan:
    device, host = component_bytes(shape, settings)
    result = MemoryPlan(settings, shape, device, host, capacity_bytes)
    if not result.fits:
        result.suggestion = cheapest_fix(shape, settings, capacity_bytes)
    return result


# ------------------------------------------------------------------------------------ what would fit
def candidate_changes(s: PlanSettings) -> list[tuple[str, dict[str, Any], PlanSettings]]:
    """Single changes, cheapest first (in run time and hardware): (description, overrides, settings)."""
    out: list[tuple[str, dict[str, Any], PlanSettings]] = []
    if s.stash_dtype == "fp32":
        out.append(("bf16 stash", {"parallel.stash_dtype": "bf16"}, replace(s, stash_dtype="bf16")))
    if not s.stash_offload:
        out.append(("stash in CPU memory", {"parallel.stash_offload": True}, replace(s, stash_offload=True)))
    per_rank = max(math.ceil(max(s.forget_batch, s.retain_batch) / s.world_size), 1)
    micro = min(s.micro_batch, per_rank) if s.micro_batch else per_rank
    size = micro // 2
    while size >= 1:
        if per_rank % size == 0:
            out.append((f"micro-batch {size}", {"train.micro_batch_size": size}, replace(s, micro_batch=size)))
        size //= 2
    if not s.gradient_checkpointing:
        out.append(
            (
                "gradient checkpointing",
                {"model.gradient_checkpointing": True},
                replace(s, gradient_checkpointing=True),
            )
        )
    if not shards_parameters(s.backend) and s.world_size > 1:
        out.append(("shard with fsdp", {"parallel.backend": "fsdp"}, replace(s, backend="fsdp")))
    backend = s.backend if shards_parameters(s.backend) else "fsdp"
    ranks = s.world_size * 2
    while ranks <= 4096:
        overrides: dict[str, Any] = {"world_size": ranks}
        if backend != s.backend:
            overrides["parallel.backend"] = backend
        out.append((f"{ranks} ranks", overrides, replace(s, world_size=ranks, backend=backend)))
        ranks *= 2
    if not s.cpu_offload:
        target = s.backend if shards_parameters(s.backend) else "fsdp"
        overrides = {"parallel.cpu_offload": True}
        if target != s.backend:
            overrides["parallel.backend"] = target
        out.append(("CPU offload", overrides, replace(s, cpu_offload=True, backend=target)))
    return out


def cheapest_fix(shape: ModelShape, s: PlanSettings, capacity_bytes: int) -> dict[str, Any] | None:
    """The first single change (cheapest first) that fits; else the changes taken together in that order,
    stopping at the first combination that fits; None when nothing here makes it fit."""

    def total(settings: PlanSettings) -> int:
        return sum(component_bytes(shape, settings)[0].values())

    changes = candidate_changes(s)
    fitting = [change for change in changes if total(change[2]) <= capacity_bytes]
    if fitting:
        name, overrides, settings = fitting[0]
        # the dearer single changes that fit as well, one per kind (the fewest ranks, the largest micro-batch)
        kinds, also = {next(iter(overrides))}, []
        for other, change, _ in fitting[1:]:
            if next(iter(change)) not in kinds:
                kinds.add(next(iter(change)))
                also.append(other)
        return {"change": name, "overrides": overrides, "total_bytes": total(settings), "also_fits": also}
    combined, names, overrides = s, [], {}
    for name, change, _ in changes:
        if "world_size" in change and "world_size" in overrides:
            continue  # one rank count at a time: the first that fits with the cheaper changes
        trial = replace(combined, **_settings_delta(change, combined))
        if total(trial) <= capacity_bytes:
            return {
                "change": " + ".join([*names, name]),
                "overrides": {**overrides, **change},
                "total_bytes": total(trial),
            }
        if "world_size" not in change:
            combined, names, overrides = trial, [*names, name], {**overrides, **change}
    return None


_KEYS = {
    "parallel.stash_dtype": "stash_dtype",
    "parallel.stash_offload": "stash_offload",
    "train.micro_batch_size": "micro_batch",
    "model.gradient_checkpointing": "gradient_checkpointing",
    "parallel.backend": "backend",
    "parallel.cpu_offload": "cpu_offload",
    "world_size": "world_size",
}


def _settings_delta(overrides: dict[str, Any], settings: PlanSettings) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(settings)}
    return {_KEYS[k]: v for k, v in overrides.items() if _KEYS[k] in names}


# ------------------------------------------------------------------------------------ from a run config
def settings_from_config(cfg: Any, world_size: int, hidden_size: int | None = None) -> PlanSettings:
    """The memory-relevant part of an ExperimentConfig (ngdiff/config.py). The engine's buffer sizes come
    from the backend itself (`parallel.planned_buffers`: for zero3 the user's DeepSpeed JSON, "auto" sized
    from the model's `hidden_size` as the backend sizes it), so the plan and the run agree."""
    from ngdiff.objectives import FORGET_OBJECTIVES, RETAIN_OBJECTIVES

    forget = FORGET_OBJECTIVES[cfg.method.forget_objective]
    retain = RETAIN_OBJECTIVES[cfg.method.retain_objective]
    buffers = planned_buffers(cfg.parallel.backend, cfg.parallel, hidden_size)
    return PlanSettings(
        backend=cfg.parallel.backend,
        world_size=world_size,
        precision=cfg.train.precision,
        optimizer=cfg.optim.name,
        momentum=cfg.optim.momentum,
        autolr=cfg.autolr.enabled,
        reference=forget.needs_reference or (retain is not None and retain.needs_reference),
        reference_copy=not cfg.model.lora.enabled or bool(cfg.model.reference_path),
        forget_batch=cfg.train.forget_batch_size,
        retain_batch=cfg.train.retain_batch_size,
        micro_batch=cfg.train.micro_batch_size,
        max_length=cfg.data.max_length,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        cpu_offload=cfg.parallel.cpu_offload,
        stash_dtype=cfg.parallel.stash_dtype,
        stash_offload=cfg.parallel.stash_offload,
        stashes=len(cfg.data.forget) + len(cfg.data.retain) - 1 if cfg.data.forget and cfg.data.retain else 1,
        reduce_bucket=buffers.get("reduce_bucket"),
        max_live=buffers.get("max_live"),
    )


# Llama 2 shapes (config.json of meta-llama/Llama-2-{7b,13b,70b}-hf), for planning without a download
LLAMA2_CONFIGS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
}  # fmt: skip


def llama_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA2_CONFIGS[name], tie_word_embeddings=False)


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"
