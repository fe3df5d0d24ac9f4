"""Experiment configuration: YAML files plus dotted overrides, validated into typed objects.

Everything here is checked before a model, a tokenizer or a data set is loaded, so a typo costs a
second, not a cluster allocation. Each error names the offending key (and file) once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ngdiff.data.records import looks_like_local_path
from ngdiff.errors import UserError
from ngdiff.model_source import ModelSourceError, check_model_source
from ngdiff.strict_yaml import DuplicateKeyError, safe_load
from ngdiff.typed_yaml import TypedYaml


class ConfigError(UserError):
    """A configuration that cannot run; the message names the key and, if any, the file."""


@dataclass
class LoraConfig:
    """LoRA adapters (peft): only they train; NPO / KL's reference is the base with adapters disabled."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # > 0 draws per-rank masks: runs stay correct but no longer equal across world sizes
    # the attention and MLP projections of Llama-like models (Llama, Mistral, Qwen, Phi-3 name them alike)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    path: str = ""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    reference_path: str = ""  # frozen reference model for NPO / KL; defaults to model.path (LoRA: adapters off)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    format: Literal["tofu", "text"] = "tofu"
    # one task per file (a YAML list, or comma-separated in an override): see ngdiff/tasks.py
    forget: tuple[str, ...] = ()
    retain: tuple[str, ...] = ()
    max_length: int = 256
    question_key: str = "question"
    answer_key: str = "answer"
    text_key: str = "text"
    prompt_template: str = ""  # "", chat, llama2, phi or a string with {question} (ngdiff/data/tokenize.py)
    idk: str = ""  # refusal sentences for the idk forget objective; default: the bundled TOFU file
    alternate_key: str = ""  # the forget records' field that DPO prefers to answer_key (forget_objective=dpo)


@dataclass
class MethodConfig:
    combiner: str = "ngdiff"
    forget_objective: str = "nll"
    retain_objective: str = "nll"
    gdiff_coefficient: float = 0.5
    npo_beta: float = 0.1
    simnpo_beta: float = 2.5  # official SimNPO code's default; open-unlearning's TOFU config uses 4.5
    simnpo_gamma: float = 0.0  # SimNPO's reward margin (open-unlearning calls it delta)
    # open-unlearning's defaults (configs/trainer/<method>.yaml); see docs/methods.md
    dpo_beta: float = 0.1  # dpo and idkdpo
    wga_beta: float = 1.0
    satimp_beta1: float = 5.0
    satimp_beta2: float = 1.0
    undial_beta: float = 10.0
    ceu_ignore_first_n: int = 1
    rmu_layer: str = "model.layers.7"  # the decoder layer whose output RMU steers (a name or its suffix)
    rmu_steering_coeff: float = 2.0
    rmu_trainable: tuple[str, ...] = ()  # regexes of the parameters RMU trains; empty: all (RMU.yaml's `.*`)
    blur_gamma: float = 1.0  # combiner blur: the forget progress <d, h_F> = gamma |h_F|^2
    cagrad_c: float = 0.5  # combiner cagrad (TorchJD): radius of the ball around the mean gradient
    fairgrad_alpha: float = 1.0  # combiner fairgrad (TorchJD): the alpha of alpha-fairness
    # a multiplier per task on the combiner's weight: data.forget's files in order, then data.retain's
    task_weights: tuple[float, ...] = ()


@dataclass
class OptimConfig:
    # NGDiff's direction under plain SGD with AutoLR fitting the step: the setting AutoLR's fit is valid in
    # (docs/autolr.md); AutoLR moves the lr from here. The default study grid found no evidence that AutoLR
    # improves on NGDiff at a constant lr (docs/study.md)
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 0.0  # 0 disables clipping of the combined direction
    schedule: Literal["constant", "linear"] = "constant"  # multiplier on the lr each step (ngdiff/schedule.py)
    warmup_steps: int = 0  # linear warmup from 0 over these steps (HF's formula)
    warmup_epochs: float = 0.0  # or over this many epochs of the forget set (open-unlearning's warmup_epochs)


@dataclass
class AutoLRConfig:
    enabled: bool = True  # the paper's method: NGDiff + AutoLR (use it with optim.name=sgd)
    every: int = 4
    probe_points: tuple[float, ...] = (-1.0, 0.0, 1.0)
    probe_loss: Literal["retain", "combined"] = "retain"
    probe_batch: Literal["fresh", "step"] = "step"  # step: the step's own batches; l(0) from its forward
    momentum: float = 0.0  # lr <- momentum * lr + (1 - momentum) * scale * clip(lr * B / A)
    max_change: float = 2.0  # the clip: lr * B / A is kept within [lr / max_change, lr * max_change]
    on_reject: Literal["keep", "halve"] = "halve"  # what a rejected fit does to the lr
    min_r2: float = 0.99  # only checked when more than three points are probed
    horizon_decay: Literal["none", "linear", "cosine"] = "none"


@dataclass
class TrainConfig:
    max_steps: int = 0  # 0: derive from epochs over the forget set
    epochs: float = 5.0  # TOFU's unlearning length (5 epochs of forget10 in configs/tofu_ngdiff.yaml)
    forget_batch_size: int = 8  # global, over all ranks and accumulation steps
    retain_batch_size: int = 8
    micro_batch_size: int = 0  # per rank; 0 means the whole per-rank batch at once
    seed: int = 42
    precision: Literal["fp32", "bf16"] = "fp32"
    save_every: int = 50  # steps between checkpoints (0: none but the one a stop signal writes); resumable
    resume: Literal["never", "auto"] = "never"
    resume_changed_data: bool = False  # resume although a data file's rows changed since the run started
    log_every: int = 1
    stop_forget_loss: float = 0.0  # stop once the forget loss exceeds this (0 disables)


@dataclass
class ParallelConfig:
    backend: str = "single"
    deepspeed_config: str = ""
    timeout_minutes: float = 10.0
    cpu_offload: bool = False
    stash_dtype: Literal["fp32", "bf16"] = "fp32"  # the retain-gradient stash
    stash_offload: bool = False  # keep the stash in (pinned) CPU memory


@dataclass
class EvalConfig:
    every: int = 0
    benchmark: Literal["none", "tofu", "muse"] = "none"
    max_items: int = 300  # first N items of each set (TOFU's ds_size: the published logs); 0: all
    batch_size: int = 16
    max_new_tokens: int = 200  # TOFU's generation length
    best_metric: str = ""  # e.g. "forget_rougeL_recall:min" keeps the best checkpoint by it
    split: str = ""  # TOFU forget split evaluated; empty: the one data.forget names (forget10.jsonl), else forget01
    data_dir: str = ""  # folder with the benchmark files; empty: the copies bundled in ngdiff/resources
    reference: str = ""  # TOFU: retain-only model's evaluation output (forget quality); MUSE: its AUC or output
    # TOFU evaluations before the last: "full", or "utility" (the forget sets' likelihood metrics and all that
    # model utility needs, without forget-set generations and membership inference: about half the cost)
    intermediate: Literal["full", "utility"] = "full"


@dataclass
class LoggingConfig:
    wandb: bool = False
    project: str = "ngdiff"
    entity: str = ""
    run_name: str = ""
    group: str = ""
    tags: tuple[str, ...] = ()
    progress: bool = True
    verbose: bool = False  # library INFO lines and transformers' load/save bars (same as --verbose)


@dataclass
class ExportConfig:
    dtype: Literal["fp32", "bf16"] = "fp32"  # of the exported final model (safetensors)
    lora: Literal["adapter", "merged"] = "merged"  # LoRA runs: a PEFT adapter folder, or the merged plain model


@dataclass
class SequenceConfig:
    """`ngdiff sequence` only: data.forget's files are unlearning requests handled one after another
    (ngdiff/sequence/, docs/sequence.md). `ngdiff train` refuses these keys: a run is one request."""

    mode: Literal["chain", "replay", "adapters"] = "replay"
    # replay: the earlier sets' total task weight, shared equally among them (the new set weighs 1)
    replay_share: float = 0.5
    # eval.benchmark=muse: words of each forget text kept as its VerbMem prompt (the rest is the ground truth)
    verbmem_prompt_words: int = 12


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    autolr: AutoLRConfig = field(default_factory=AutoLRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    output_dir: str = "outputs/run"

    def to_dict(self) -> dict[str, Any]:
        """Plain values; the `sequence` section only when set, so a run's config.yaml (which `ngdiff train`
        and Slurm jobs read back, refusing sequence keys) and its marker are as they were before sequences."""
        raw = _plain(dataclasses.asdict(self))
        if self.sequence == SequenceConfig():
            del raw["sequence"]
        return raw


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- parsing


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    check_sources: bool = True,
    single_run: bool = False,
) -> ExperimentConfig:
    """Read an optional YAML file, apply `key.sub=value` overrides, validate, return typed config.
    `check_sources=False` skips the model and data paths (`ngdiff plan` reads neither); `single_run=True`
    refuses `sequence.*` keys, whatever their value (`ngdiff train`: a run is one request)."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = safe_load(path.read_text())
        except DuplicateKeyError as err:
            raise ConfigError(f"{path}: {err}; keep one") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        _apply_override(raw, item)
    if single_run and "sequence" in raw:
        given = raw["sequence"] if isinstance(raw["sequence"], dict) else {}
        keys = ", ".join(f"sequence.{key}" for key in given) or "sequence"
        raise ConfigError(
            f"{source}: {keys} is read by `ngdiff sequence` only; a single run (ngdiff train, ngdiff slurm submit) "
            "is one unlearning request: drop it, or run `ngdiff sequence` with the same config"
        )
    config = TypedYaml(source, ConfigError, "config key").section(ExperimentConfig, raw)
    validate(config, check_sources=check_sources)
    return config


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key component")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = safe_load(text) if text != "" else ""
    except DuplicateKeyError as err:
        raise ConfigError(f"override {item!r}: {err}") from None
    except yaml.YAMLError:
        node[parts[-1]] = text


# --------------------------------------------------------------------------- validation

# seeds feed torch (at most 64 bits) after offsets per task, epoch and step (ngdiff/tasks.py, combiners):
# 32 bits leave room for them all
MAX_SEED = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38  # the optimizers multiply float32 tensors by the lr
MAX_TIMEOUT_MINUTES = 7 * 24 * 60  # a collective waiting longer is hung; timedelta overflows far beyond


def check_objective_data(config: ExperimentConfig) -> None:
    """The data and names an objective needs beyond the defaults: DPO's alternate answers, RMU's layer."""
    method, data = config.method, config.data
    if method.forget_objective == "dpo" and not data.alternate_key:
        raise ConfigError(
            "method.forget_objective=dpo prefers each forget record's alternate answer: set data.alternate_key "
            "to its field (or use idkdpo, which prefers a refusal from data.idk)"
        )
    if data.alternate_key and method.forget_objective != "dpo":
        raise ConfigError(
            f"data.alternate_key is read only by method.forget_objective=dpo, not {method.forget_objective}"
        )
    uses_pairs = method.forget_objective in ("dpo", "idkdpo")
    if uses_pairs and data.format != "tofu":
        raise ConfigError(
            f"method.forget_objective={method.forget_objective} needs question/answer data (data.format=tofu)"
        )
    uses_rmu = "rmu" in (method.forget_objective, method.retain_objective)
    if uses_rmu and not method.rmu_layer.strip():
        raise ConfigError("method.rmu_layer must name the decoder layer RMU steers, e.g. model.layers.7")
    if method.rmu_trainable and method.forget_objective != "rmu":
        raise ConfigError(f"method.rmu_trainable applies to method.forget_objective=rmu, not {method.forget_objective}")
    if method.rmu_trainable and config.model.lora.enabled:
        raise ConfigError("method.rmu_trainable and model.lora.enabled both choose what trains; set one")
    for pattern in method.rmu_trainable:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"method.rmu_trainable: {pattern!r} is not a regular expression ({err})") from None


def validate(config: ExperimentConfig, check_sources: bool = True) -> None:
    """Checks that need no model or data: names, signs, ranges, files that must exist."""
    from ngdiff.combiners import COMBINERS
    from ngdiff.data.tokenize import check_prompt_template
    from ngdiff.objectives import FORGET_OBJECTIVES, RETAIN_OBJECTIVES
    from parallel import BACKENDS

    def choose(key: str, value: str, known: typing.Iterable[str]) -> None:
        known = sorted(known)
        if value not in known:
            guess = difflib.get_close_matches(value, known, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise ConfigError(f"unknown {key} {value!r}{hint}; choose one of: {', '.join(known)}")

    choose("method.combiner", config.method.combiner, COMBINERS)
    from ngdiff.torchjd_adapter import missing_requirement

    unavailable = missing_requirement(config.method.combiner, len(config.data.forget) + len(config.data.retain))
    if unavailable:
        raise ConfigError(unavailable)
    choose("method.forget_objective", config.method.forget_objective, FORGET_OBJECTIVES)
    choose("method.retain_objective", config.method.retain_objective, RETAIN_OBJECTIVES)
    choose("parallel.backend", config.parallel.backend, BACKENDS)

    positive = {
        "optim.lr": config.optim.lr,
        "train.forget_batch_size": config.train.forget_batch_size,
        "train.retain_batch_size": config.train.retain_batch_size,
        "data.max_length": config.data.max_length,
        "autolr.every": config.autolr.every,
        "parallel.timeout_minutes": config.parallel.timeout_minutes,
        "train.log_every": config.train.log_every,
        "eval.batch_size": config.eval.batch_size,
        "method.npo_beta": config.method.npo_beta,
        "method.simnpo_beta": config.method.simnpo_beta,
        "method.dpo_beta": config.method.dpo_beta,
        "method.undial_beta": config.method.undial_beta,
        "method.rmu_steering_coeff": config.method.rmu_steering_coeff,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {
        "optim.weight_decay": config.optim.weight_decay,
        "optim.momentum": config.optim.momentum,
        "optim.max_grad_norm": config.optim.max_grad_norm,
        "optim.eps": config.optim.eps,
        "train.stop_forget_loss": config.train.stop_forget_loss,
        "optim.warmup_steps": config.optim.warmup_steps,
        "optim.warmup_epochs": config.optim.warmup_epochs,
        "method.blur_gamma": config.method.blur_gamma,
        "method.cagrad_c": config.method.cagrad_c,
        "method.fairgrad_alpha": config.method.fairgrad_alpha,
        "train.max_steps": config.train.max_steps,
        "train.epochs": config.train.epochs,
        "train.micro_batch_size": config.train.micro_batch_size,
        "train.save_every": config.train.save_every,
        "eval.every": config.eval.every,
        "eval.max_items": config.eval.max_items,
        "method.wga_beta": config.method.wga_beta,
        "method.satimp_beta1": config.method.satimp_beta1,
        "method.satimp_beta2": config.method.satimp_beta2,
        "method.ceu_ignore_first_n": config.method.ceu_ignore_first_n,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must not be negative, got {value}")
    if config.optim.lr > FLOAT32_MAX:
        raise ConfigError(
            f"optim.lr must be at most {FLOAT32_MAX:.4g} (the parameters' float32 range), got {config.optim.lr:g}"
        )
    if not all(0.0 <= beta < 1.0 for beta in config.optim.betas):
        raise ConfigError(f"optim.betas must each lie in [0, 1), got {list(config.optim.betas)}")
    if not 0 <= config.train.seed <= MAX_SEED:
        raise ConfigError(f"train.seed must lie in [0, 2**32 - 1], got {config.train.seed}")
    if config.parallel.timeout_minutes > MAX_TIMEOUT_MINUTES:
        raise ConfigError(
            f"parallel.timeout_minutes must be at most {MAX_TIMEOUT_MINUTES} (one week), "
            f"got {config.parallel.timeout_minutes:g}"
        )
    if config.optim.warmup_steps > 0 and config.optim.warmup_epochs > 0:
        raise ConfigError("set optim.warmup_steps or optim.warmup_epochs, not both")
    if config.train.max_steps == 0 and config.train.epochs == 0:
        raise ConfigError("set train.max_steps or train.epochs to a positive value")
    if not 0.0 <= config.method.gdiff_coefficient <= 1.0:
        raise ConfigError(f"method.gdiff_coefficient must lie in [0, 1], got {config.method.gdiff_coefficient}")
    if not 0.0 <= config.autolr.momentum < 1.0:
        raise ConfigError(f"autolr.momentum must lie in [0, 1), got {config.autolr.momentum}")
    if not config.autolr.max_change > 1.0:
        raise ConfigError(f"autolr.max_change must be greater than 1, got {config.autolr.max_change}")
    points = config.autolr.probe_points
    if len(points) < 3 or len(set(points)) != len(points) or 0.0 not in points:
        raise ConfigError(f"autolr.probe_points needs at least three distinct points including 0, got {points}")
    tasks = len(config.data.forget) + len(config.data.retain)
    if config.method.task_weights and len(config.method.task_weights) != tasks:
        raise ConfigError(
            f"method.task_weights has {len(config.method.task_weights)} values for {tasks} tasks "
            f"(data.forget's {len(config.data.forget)} files, then data.retain's {len(config.data.retain)})"
        )
    if any(not (w >= 0 and math.isfinite(w)) for w in config.method.task_weights):
        raise ConfigError(f"method.task_weights must be finite and non-negative, got {config.method.task_weights}")
    if config.method.retain_objective == "none" and config.method.combiner != "ga":
        raise ConfigError(
            f"method.retain_objective=none leaves no retain gradient for method.combiner={config.method.combiner}; "
            "use combiner ga or a retain objective"
        )
    check_objective_data(config)
    if config.autolr.enabled and config.method.retain_objective == "none" and config.autolr.probe_loss == "retain":
        raise ConfigError(
            "autolr.probe_loss=retain needs a retain objective (method.retain_objective is none): "
            "set autolr.probe_loss=combined, or autolr.enabled=false (AutoLR is on by default)"
        )
    try:
        check_prompt_template(config.data.prompt_template)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if check_sources:
        check_sources_of(config)
    resolve_eval_split(config)
    if config.parallel.deepspeed_config and not Path(config.parallel.deepspeed_config).is_file():
        raise ConfigError(f"parallel.deepspeed_config: file not found: {config.parallel.deepspeed_config}")
    if not config.output_dir:
        raise ConfigError("output_dir must not be empty")
    validate_lora(config)


def validate_lora(config: ExperimentConfig) -> None:
    lora = config.model.lora
    if not lora.enabled:
        return
    if lora.r <= 0:
        raise ConfigError(f"model.lora.r must be positive, got {lora.r}")
    if lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout must lie in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules must name at least one module")


def check_sources_of(config: ExperimentConfig) -> None:
    """The model and data a run reads: given, and existing where they are local paths."""
    if not config.model.path:
        raise ConfigError("model.path is required (a local model directory or a hub name)")
    for key, value in (("model.path", config.model.path), ("model.reference_path", config.model.reference_path)):
        try:
            check_model_source(key, value) if value else None
        except ModelSourceError as err:
            raise ConfigError(str(err)) from None
    for key in ("forget", "retain"):
        values = getattr(config.data, key)
        if not values:
            raise ConfigError(f"data.{key} is required (a JSON/JSONL file or a hub dataset name, or a list of them)")
        for index, value in enumerate(values):
            check_data_source(f"data.{key}" if len(values) == 1 else f"data.{key}[{index}]", value)
    if config.data.idk:
        check_data_source("data.idk", config.data.idk)
    check_forget_is_not_retain(config.data.forget, config.data.retain)


def check_forget_is_not_retain(forget: typing.Sequence[str], retain: typing.Sequence[str]) -> None:
    """The same file (or hub set) as forget and retain data: the run would push its records both ways."""

    def identity(value: str) -> str:
        return str(Path(value).expanduser().resolve()) if looks_like_local_path(value) else value

    retained = {identity(value): value for value in retain}
    for value in forget:
        other = retained.get(identity(value))
        if other is not None:
            spelled = f" (as {other})" if other != value else ""
            raise ConfigError(
                f"data.forget and data.retain both name {value}{spelled}: the run would ascend and descend "
                "the same records; give each role its own set"
            )


def resolve_eval_split(config: ExperimentConfig) -> None:
    """The TOFU split evaluated follows the trained one: training on forget10 never scores forget01."""
    from ngdiff.eval.tofu import tofu_split_of

    splits = sorted({split for split in map(tofu_split_of, config.data.forget) if split})
    if len(splits) > 1 and not config.eval.split:
        raise ConfigError(f"data.forget trains on several TOFU splits ({', '.join(splits)}); set eval.split to one")
    trained = splits[0] if len(splits) == 1 else ""
    if config.eval.split and trained and config.eval.split != trained:
        forget = ",".join(config.data.forget)
        raise ConfigError(
            f"eval.split={config.eval.split} contradicts data.forget={forget}, which trains on {trained}; "
            f"drop eval.split (it follows data.forget) or set eval.split={trained}"
        )
    config.eval.split = config.eval.split or trained or "forget01"


def check_data_source(key: str, value: str) -> None:
    """A local path must exist; anything else is taken as a hub dataset name (`name` or `name:split`)."""
    if looks_like_local_path(value) and not Path(value).expanduser().exists():
        raise ConfigError(f"{key}: data file not found: {value}")


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
