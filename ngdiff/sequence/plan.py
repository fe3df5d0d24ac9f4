"""From one validated config to the requests of a sequence: each request's own run config, checked before
anything trains.

Request i (1-based) runs in `<output_dir>/request_<i>` and starts from `request_<i-1>/final` (request 1 from
`model.path`). What it forgets depends on `sequence.mode`:
- chain: set i alone (MUSE's sequential protocol);
- replay: set i and every earlier set as forget tasks of the k-task core, set i first with weight 1 and the
  earlier sets sharing `sequence.replay_share` equally (docs/sequence.md says why);
- adapters: set i alone, trained as a fresh LoRA adapter merged into `final/` (export.lora=merged).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

from ngdiff.config import ConfigError, ExperimentConfig, SequenceConfig, validate

REQUEST_DIR = "request_{}"


@dataclass(frozen=True)
class Request:
    index: int  # 1-based
    cfg: ExperimentConfig  # an ordinary run config: output_dir is the request's folder

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def final(self) -> Path:
        return self.folder / "final"


@dataclass(frozen=True)
class SequencePlan:
    cfg: ExperimentConfig  # the sequence's own config (output_dir: the sequence folder)
    requests: tuple[Request, ...]

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def sets(self) -> tuple[str, ...]:
        return self.cfg.data.forget


def replay_weights(index: int, share: float, retain_tasks: int) -> tuple[float, ...]:
    """method.task_weights of replay request `index`: its forget files are (new set, set 1, ..., set index-1),
    the new one weighing 1 and the earlier ones `share / (index - 1)` each; every retain task 1."""
    if index == 1:
        return ()
    earlier = share / (index - 1)
    return (1.0, *[earlier] * (index - 1), *[1.0] * retain_tasks)


def request_config(cfg: ExperimentConfig, index: int) -> ExperimentConfig:
    """Request `index`'s run config (validated, without a sequence section)."""
    seq, sets, out = cfg.sequence, cfg.data.forget, Path(cfg.output_dir)
    run = copy.deepcopy(cfg)
    run.sequence = SequenceConfig()
    run.output_dir = str(out / REQUEST_DIR.format(index))
    if index > 1:
        run.model.path = str(out / REQUEST_DIR.format(index - 1) / "final")
    if seq.mode == "replay":
        run.data.forget = (sets[index - 1], *sets[: index - 1])
        run.method.task_weights = replay_weights(index, seq.replay_share, len(cfg.data.retain))
    else:
        run.data.forget = (sets[index - 1],)
    if seq.mode == "adapters":
        run.model.lora.enabled = True
    if muse_cells(cfg) and cfg.eval.every == 0:
        run.eval.benchmark = "none"  # the cells score its final model; an end-of-run MUSE suite would repeat them
    try:
        validate(run, check_sources=False)  # the sources were checked once; a later request's model is made later
    except ConfigError as err:
        raise ConfigError(f"request {index} of the sequence ({run.output_dir}): {err}") from None
    return run


def plan_sequence(cfg: ExperimentConfig) -> SequencePlan:
    """Every request's config, after the checks that need no model: one clear error before any training."""
    check_sequence(cfg)
    requests = tuple(Request(i, request_config(cfg, i)) for i in range(1, len(cfg.data.forget) + 1))
    return SequencePlan(cfg, requests)


def check_sequence(cfg: ExperimentConfig) -> None:
    seq, data = cfg.sequence, cfg.data
    if len(data.forget) < 2:
        named = f" (got {data.forget[0]})" if data.forget else ""
        raise ConfigError(
            f"ngdiff sequence needs two or more unlearning requests in data.forget, one file each in the order they "
            f"arrive{named}; for a single request run `ngdiff train`"
        )
    seen: dict[str, int] = {}
    for index, source in enumerate(data.forget, start=1):
        key = str(Path(source).expanduser().resolve())
        if key in seen:
            raise ConfigError(
                f"data.forget names {source} twice (requests {seen[key]} and {index}); each request is one set"
            )
        seen[key] = index
    check_cell_kind(cfg)
    for key, values in (("data.forget", data.forget), ("data.retain", data.retain)):
        for index, value in enumerate(values):
            if not Path(value).expanduser().is_file():
                where = key if len(values) == 1 else f"{key}[{index}]"
                raise ConfigError(f"{where}: ngdiff sequence evaluates local files; {value} is not a file")
    if cfg.method.task_weights:
        raise ConfigError(
            "method.task_weights is set per request by ngdiff sequence (replay: the new set 1, the earlier sets "
            "sequence.replay_share between them); leave it empty"
        )
    if not (seq.replay_share > 0 and math.isfinite(seq.replay_share)):
        raise ConfigError(
            f"sequence.replay_share must be positive, got {seq.replay_share:g} (to drop the earlier sets, use "
            "sequence.mode=chain)"
        )
    if seq.replay_share != SequenceConfig.replay_share and seq.mode != "replay":
        raise ConfigError(f"sequence.replay_share is read by sequence.mode=replay only, not {seq.mode}")
    if (seq.mode == "adapters" or cfg.model.lora.enabled) and cfg.export.lora != "merged":
        raise ConfigError(
            "export.lora=adapter leaves each request's final/ an adapter, which the next request cannot start "
            "from; ngdiff sequence needs export.lora=merged"
        )
    if seq.mode == "adapters":
        check_lora_targets(cfg)


def muse_cells(cfg: ExperimentConfig) -> bool:
    """Whether the cells are MUSE's (eval.benchmark=muse: VerbMem per text set, KnowMem on the retain QA)
    rather than the question/answer evaluation of `ngdiff eval --forget`."""
    return cfg.eval.benchmark == "muse"


def check_cell_kind(cfg: ExperimentConfig) -> None:
    """The benchmark chooses the cells; the sets' format must be the one they score."""
    fmt, words = cfg.data.format, cfg.sequence.verbmem_prompt_words
    if muse_cells(cfg) and fmt != "text":
        raise ConfigError(
            f"eval.benchmark=muse scores each request's set by VerbMem on its texts; data.format={fmt} sets hold "
            "question/answer pairs: use data.format=text, or leave eval.benchmark for the question/answer cells"
        )
    if not muse_cells(cfg) and fmt != "tofu":
        raise ConfigError(
            f"data.format={fmt} sets have no question/answer evaluation: set eval.benchmark=muse to score each set "
            "by MUSE's VerbMem on its texts (and utility by KnowMem on the retain QA)"
        )
    if words != SequenceConfig.verbmem_prompt_words and not muse_cells(cfg):
        raise ConfigError("sequence.verbmem_prompt_words is read by eval.benchmark=muse sequences only")
    if words < 1:
        raise ConfigError(f"sequence.verbmem_prompt_words must be at least 1, got {words}")


def check_lora_targets(cfg: ExperimentConfig) -> None:
    """sequence.mode=adapters: the model must have a module that model.lora.target_modules names (peft's match
    of plain names), found on the meta device from config.json alone."""
    from transformers import AutoConfig

    from ngdiff.memory_plan import model_shape

    path, lora = cfg.model.path, cfg.model.lora
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"sequence.mode=adapters: model.path {path}: cannot read its config ({err})") from None
    if model_shape(hf_config, tuple(lora.target_modules), 1).lora_params == 0:
        raise ConfigError(
            f"sequence.mode=adapters: model.path {path} ({hf_config.model_type}) has no Linear module named by "
            f"model.lora.target_modules={list(lora.target_modules)}; set model.lora.target_modules to its "
            "projection names, or use sequence.mode=chain or replay"
        )
