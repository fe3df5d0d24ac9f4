"""DeepSpeed ZeRO stage 3: parameters, gradients and optimizer state partitioned over ranks.

The model is built under `zero.Init` (through transformers' `HfDeepSpeedConfig`), so it never
materialises whole on one rank. Between `engine.backward` and `engine.step` each rank reads and
writes its fp32 gradient partition through DeepSpeed's public `safe_get_local_grad` /
`safe_set_local_grad`. Zeroing the gradients resets ZeRO's micro-step counter, so the first
backward of the next task overwrites the partitions instead of adding to them.

AutoLR edits the fp32 master partitions (`local_params`); `params_changed` copies them into the
partitions forward passes gather from, as DeepSpeed's own step does. Every DeepSpeed and transformers
internal used here goes through `parallel.compat` (the fp32 master, the gloo collectives, the
re-partitioning, zero.Init through HfDeepSpeedConfig).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from parallel.base import Backend, frozen_names
from parallel.compat.deepspeed import fp32_master_is_the_partition, fp32_partitions, repartition, use_collectives
from parallel.compat.transformers import zero3_init
from parallel.deepspeed_shm import release_allreduce_segment
from parallel.deepspeed_sizing import (
    SIZED_KEYS,
    DeepSpeedConfigError,
    explicit_sizes,
    hidden_size_of,
    read_user_config,
    zero_section,
    zero_sizes,
)
from parallel.export import everything, exported_names, gather_rows_to_main
from parallel.optim import build_optimizer, set_lr
from parallel.safe_load import weights_only_loads

log = logging.getLogger("ngdiff.parallel")

CHECKPOINT_TAG = "zero3"


def checkpoint_globals() -> list[type]:
    """The classes a ZeRO-3 checkpoint ngdiff writes holds beyond tensors and plain data (its optimizer
    states' loss scaler and ZeRO stage): all that `weights_only` loading must be allowed to build."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, ZeroStageEnum]


def _conflict(key: str, ours: Any, theirs: Any, source: str) -> DeepSpeedConfigError:
    return DeepSpeedConfigError(
        f"{source}: {key}={theirs!r} disagrees with the trainer's value {ours!r}; "
        f'remove the key or set it to "auto" (ngdiff fills it)'
    )


def build_deepspeed_config(
    user: dict[str, Any],
    *,
    micro_batch: int,
    accumulation: int,
    world_size: int,
    precision: str,
    cpu_offload: bool,
    hidden_size: int | None = None,
    source: str = "parallel.deepspeed_config",
) -> dict[str, Any]:
    """The user's DeepSpeed JSON with the trainer's keys filled in; a clear error where they disagree.

    The trainer owns batch sizes, precision and the optimizer (a torch optimizer, lr set every step by
    the trainer / AutoLR), so a DeepSpeed `optimizer` or `scheduler` section is refused.
    """
    config = json.loads(json.dumps(user))  # deep copy
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise DeepSpeedConfigError(
                f"{source}: remove the {section!r} section; ngdiff builds a torch optimizer from optim.* and sets "
                "the learning rate itself (AutoLR)"
            )
    if config.get("fp16", {}).get("enabled") is True:
        raise DeepSpeedConfigError(f"{source}: fp16 is not supported (loss scaling); use train.precision=bf16")
    zero = zero_section(config, source)
    stage = zero.get("stage", 3)
    if stage != 3:
        raise DeepSpeedConfigError(
            f"{source}: zero_optimization.stage={stage} is not supported: NGDiff needs each rank's gradient "
            "partition per parameter between backward and step (two backward passes per step), which DeepSpeed "
            "exposes exactly only for stage 3 (safe_get_local_grad); stages 1-2 keep flat reduce buckets. "
            "Use stage 3 (parallel.backend=zero3) or parallel.backend=fsdp"
        )
    zero["stage"] = 3
    # bucket and residency sizes: the user's numbers, else sized to the model (parallel/deepspeed_sizing.py,
    # which `ngdiff plan` reads too); with no model size known, absent, so DeepSpeed applies its own default
    sized = zero_sizes(zero, hidden_size, source) if hidden_size else explicit_sizes(zero, source)
    for key in SIZED_KEYS:
        if key in sized:
            zero[key] = sized[key]
        else:
            zero.pop(key, None)
    if cpu_offload:
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # the trainer's torch optimizer steps the offloaded fp32 partitions (DeepSpeed refuses it by default)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
    }
    for key, value in ours.items():
        theirs = config.get(key, "auto")
        if theirs != "auto" and theirs != value:
            raise _conflict(key, value, theirs, source)
        config[key] = value
    bf16 = precision == "bf16"
    theirs = config.get("bf16", {}).get("enabled", "auto")
    if theirs != "auto" and bool(theirs) != bf16:
        raise _conflict("bf16.enabled", bf16, theirs, source)
    config.setdefault("bf16", {})["enabled"] = bf16
    clipping = config.get("gradient_clipping", "auto")
    if clipping == "auto":
        config["gradient_clipping"] = 0.0  # the trainer clips the combined direction (optim.max_grad_norm)
    elif clipping:
        log.warning("%s: gradient_clipping=%s is applied by DeepSpeed after the NGDiff combination", source, clipping)
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("steps_per_print", 1 << 30)
    config.setdefault("wall_clock_breakdown", False)
    return config


def model_hidden_size(build_model) -> int | None:
    """The model's hidden size from its config file (a `ModelSource`), without building it."""
    path = getattr(build_model, "path", None)
    if path is None:
        return None
    from transformers import AutoConfig

    return hidden_size_of(
        AutoConfig.from_pretrained(path, trust_remote_code=getattr(build_model, "trust_remote_code", False))
    )


class Zero3Backend(Backend):
    name = "zero3"
    shards_parameters = True

    def __init__(self, ctx, parallel_cfg, optim_cfg, precision):
        super().__init__(ctx, parallel_cfg, optim_cfg, precision)
        self.ds_config: dict[str, Any] | None = None
        self._hf_ds_config = None  # transformers holds only a weak reference: keep it alive

    @classmethod
    def planned_buffers(cls, parallel_cfg, hidden_size):
        """The reduce bucket and the residency limit `build_deepspeed_config` writes (or DeepSpeed's defaults,
        which it leaves to DeepSpeed when the model's size is unknown): one source, `zero_sizes`."""
        path = parallel_cfg.deepspeed_config if parallel_cfg is not None else ""
        zero = zero_section(read_user_config(path), path or "parallel.deepspeed_config")
        sizes = zero_sizes(zero, hidden_size, path or "parallel.deepspeed_config")
        return {"reduce_bucket": sizes["reduce_bucket_size"], "max_live": sizes["stage3_max_live_parameters"]}

    def _config(self, build_model=None) -> dict[str, Any]:
        if self.ds_config is None:
            path = self.parallel_cfg.deepspeed_config
            user = read_user_config(path)
            micro, accumulation = self.batch_layout
            self.ds_config = build_deepspeed_config(
                user,
                micro_batch=micro,
                accumulation=accumulation,
                world_size=self.ctx.world_size,
                precision=self.precision,
                cpu_offload=self.parallel_cfg.cpu_offload,
                hidden_size=model_hidden_size(build_model),
                source=path or "parallel.deepspeed_config",
            )
        return self.ds_config

    def _build_partitioned(self, build_model):
        import deepspeed

        # DeepSpeed's comm layer adopts our process group (its config reads the world size from it)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        release_allreduce_segment(self.ctx.rank, torch.distributed.barrier)  # else /dev/shm keeps 66 MiB a rank
        if torch.distributed.get_backend() == "gloo":
            from parallel.gloo_comm import all_gather_into_tensor, reduce_scatter_tensor  # public calls only

            use_collectives(all_gather_into_tensor, reduce_scatter_tensor)  # no whole-tensor staging copy

        self._hf_ds_config = zero3_init(self._config(build_model))  # from_pretrained now builds under zero.Init
        return build_model()

    def prepare(self, build_model, gradient_checkpointing=False):
        import deepspeed

        module = self._build_partitioned(build_model)
        if gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module.train()
        with fp32_master_is_the_partition():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=module,
                model_parameters=[p for p in module.parameters() if p.requires_grad],
                optimizer=lambda params: build_optimizer(params, self.optim_cfg),
                config=self._config(),
            )
        self.model = self.engine
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        return self.engine

    def prepare_frozen(self, build_model):
        import deepspeed

        module = self._build_partitioned(build_model)
        module.requires_grad_(False)
        config = {k: v for k, v in self._config().items() if k not in ("zero_allow_untested_optimizer",)}
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()  # DeepSpeedEngine.eval() returns None, not the engine
        return engine

    def autocast(self):
        return torch.autocast(self.ctx.device.type, enabled=False)  # DeepSpeed holds bf16 weights itself

    def backward(self, loss, *, last_micro_batch):
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer normalises by global counts

    def zero_grad(self):
        self.optimizer.zero_grad()  # also resets ZeRO's micro-step: the next backward overwrites

    def local_grads(self):
        from deepspeed.utils import safe_get_local_grad

        return [safe_get_local_grad(p) for p in self.params]

    def close(self):
        # transformers holds the HfDeepSpeedConfig by weak reference only: dropping ours ends zero.Init builds
        self._hf_ds_config = None

    def set_local_grads(self, grads):
        from deepspeed.utils import safe_set_local_grad

        for p, live, new in zip(self.params, self.local_grads(), grads, strict=True):
            if live.data_ptr() != new.data_ptr():  # a copy (optimizer offload): write it back
                safe_set_local_grad(p, new)

    def local_params(self):
        return fp32_partitions(self.optimizer)

    @torch.no_grad()
    def params_changed(self):
        repartition(self.optimizer)  # masters -> the partitions forward gathers from, as DeepSpeed's step does

    def step(self, lr):
        set_lr(self.optimizer.optimizer, lr)
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()

    # frozen parameters (a LoRA run's base model) are rebuilt from model.path and left out
    def save_checkpoint(self, directory: Path):
        self.engine.save_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True
        )

    def load_checkpoint(self, directory: Path):
        # DeepSpeed's checkpoint engine unpickles with weights_only=False: a planted file would run code
        with weights_only_loads(checkpoint_globals(), where=directory):
            path, _ = self.engine.load_checkpoint(
                str(directory),
                tag=CHECKPOINT_TAG,
                load_module_strict=not frozen_names(self.module),
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}")

    def full_tensors(self, names=everything):
        """fp32 masters gathered to rank 0 one parameter at a time (a `gather` of the flat partitions)."""
        import deepspeed
        from deepspeed.utils import safe_get_local_fp32_param

        for name, tensor in exported_names(self.module):
            if not names(name):
                continue
            if not hasattr(tensor, "ds_id"):  # buffers: not partitioned
                yield name, tensor.detach().cpu() if self.ctx.is_main else None
            elif tensor.requires_grad:
                local = safe_get_local_fp32_param(tensor).reshape(-1)
                full = gather_rows_to_main(local, torch.Size([tensor.ds_numel]), local.numel(), self.ctx.device)
                yield name, full.view(tensor.ds_shape) if full is not None else None
            else:  # frozen: no fp32 master, the (compute-dtype) partitions themselves
                with deepspeed.zero.GatheredParameters([tensor]):
                    yield name, tensor.detach().cpu().clone() if self.ctx.is_main else None
