"""The study config: one YAML naming the world, the methods, the lr grid, the seeds, the budget and
the evaluation cadence. Parsed and checked completely (every run's config through
`ngdiff.config.load_config`) before anything is built, so a typo costs a second.

A method is a name and a list of dotted config overrides, e.g.
`ngdiff+autolr: [method.combiner=ngdiff, autolr.enabled=true]`, so new config keys need no code.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ngdiff.errors import UserError
from ngdiff.strict_yaml import DuplicateKeyError, safe_load


class StudyError(UserError):
    """A study config that cannot run; the message names the key and the file."""


@dataclass(frozen=True)
class ModelShape:
    """The CPU world's tiny Llama (the demo's TinyLlamaSpec by default)."""

    vocab_size: int = 2000
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384


@dataclass(frozen=True)
class FinetuneShape:
    """How the target and the retain model are fine-tuned (identically, from the same initialisation)."""

    epochs: int = 60
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 20
    seed: int = 0


@dataclass(frozen=True)
class EvalItems:
    """How many items of each evaluation set every evaluation scores (evenly spaced, the same for all)."""

    forget: int = 40
    retain: int = 40
    real_authors: int = 40
    world_facts: int = 40


@dataclass(frozen=True)
class CalibrationBounds:
    """Bounds the CPU world's calibration figures must meet (ngdiff.study.calibration); unset: unchecked.
    Ranges are [low, high]; the others are maxima."""

    d_target_retain: tuple[float, ...] = ()  # target-vs-retain-model KS distance on the forget split
    retain_forget_rougeL: tuple[float, ...] = ()  # the retain model's forget ROUGE-L recall
    utility_gap_max: float | None = None  # |target utility - retain-model utility|
    unseen_token_share_max: float | None = None  # evaluation-answer tokens never seen in training
    truncated_share_max: float | None = None  # forget answers longer than max_new_tokens


@dataclass(frozen=True)
class WorldSpec:
    """`cpu`: built here from the bundled TOFU files; `cluster`: the user's target and retain model."""

    kind: str = "cpu"
    cache_dir: str = ""  # where the world is built once; default: <study folder>/world
    max_new_tokens: int = 48  # greedy generation length of every evaluation
    # cpu world
    forget_split: str = "forget01"  # bundled <split>.jsonl and <split>_perturbed.jsonl: the forget authors
    forget_authors: tuple[int, ...] = ()  # only these authors of the split (0 = its first), e.g. [2, 3]
    second_retain_seed: int = -1  # >= 0: a second retain model, fine-tuned with this seed (forget ceiling)
    retain_authors: int = 10  # the first N TOFU authors (covered by the bundled retain_perturbed.jsonl)
    knowledge: tuple[str, ...] = ("real_authors", "world_facts")  # fine-tuned, never in the retain set
    knowledge_items: int = 0  # fine-tune on N evenly spaced items of each knowledge set (0: all of them)
    model: ModelShape = field(default_factory=ModelShape)
    finetune: FinetuneShape = field(default_factory=FinetuneShape)
    eval_items: EvalItems = field(default_factory=EvalItems)
    calibration: CalibrationBounds = field(default_factory=CalibrationBounds)  # checked after the build
    # cluster world
    benchmark: str = "tofu"  # tofu | muse
    target: str = ""  # the model to unlearn (folder or hub name)
    retain_model: str = ""  # TOFU: the retain-only model, evaluated once for the reference truth ratios
    reference: str = ""  # or its evaluation output / published log (eval.reference); MUSE: retrained AUC
    forget: str = ""  # data.forget of every run
    retain: str = ""  # data.retain of every run
    split: str = "forget10"  # TOFU eval.split
    data_dir: str = ""  # eval.data_dir (default: the bundled files)
    max_items: int = 0  # eval.max_items (0: all)


@dataclass(frozen=True)
class SummaryRule:
    """Per run, the best evaluation point: the highest (or lowest) `forget_metric` among the points whose
    `utility_metric` is at least `utility_fraction` x the target's. Step 0 (the target itself) always
    qualifies, so every run has a best point."""

    forget_metric: str = "forget_quality"
    forget_mode: str = "max"
    utility_metric: str = "model_utility"
    utility_fraction: float = 0.95


@dataclass(frozen=True)
class MethodSpec:
    name: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]  # the study's grid unless the method names its own (another optimizer family)


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a method at one initial lr and one seed."""

    method: str
    lr: float
    seed: int
    overrides: tuple[str, ...]

    @property
    def folder_method(self) -> str:
        """The method's name as a folder name may hold it."""
        return "".join(ch if ch.isalnum() or ch in "+-_." else "-" for ch in self.method)

    @property
    def run_id(self) -> str:
        """The run's folder name: distinct lrs always give distinct names (see `lr_label`)."""
        return f"{self.folder_method}__lr{lr_label(self.lr)}__s{self.seed}"

    @property
    def legacy_run_id(self) -> str:
        """The folder name of studies begun before names carried every digit of the lr (one digit)."""
        return f"{self.folder_method}__lr{self.lr:.0e}__s{self.seed}"


def lr_label(lr: float) -> str:
    """The fewest significant digits that read back as exactly `lr`: 1e-04, 1.5e-04, 1.6e-04, 4.6e-02."""
    for digits in range(17):
        label = f"{lr:.{digits}e}"
        if float(label) == lr:
            return label
    return repr(lr)


@dataclass(frozen=True)
class StudySpec:
    name: str
    world: WorldSpec
    methods: tuple[MethodSpec, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    budget_epochs: float
    eval_every: int
    common: tuple[str, ...]
    summary: SummaryRule
    lr_plot_methods: tuple[str, ...]
    source: str = ""

    def runs(self) -> list[RunSpec]:
        """The grid in a fixed order (method, lr, seed): the index of a run is its Slurm array task."""
        return [RunSpec(m.name, lr, seed, m.overrides) for m in self.methods for lr in m.lrs for seed in m.seeds]

    def run_overrides(self, run: RunSpec) -> list[str]:
        """Every run gets the same budget and evaluation; the method's overrides come after the common ones."""
        return [
            *self.common,
            f"train.epochs={self.budget_epochs}",
            "train.max_steps=0",
            f"eval.every={self.eval_every}",
            *run.overrides,
            f"optim.lr={run.lr}",
            f"train.seed={run.seed}",
        ]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self.world), sort_keys=True).encode()).hexdigest()[:16]


_TOP = ("name", "world", "methods", "lrs", "seeds", "budget_epochs", "eval_every", "common", "summary", "plots")


def _section(cls: type, raw: Any, key: str, source: str) -> Any:
    """A frozen dataclass from a mapping; unknown keys and wrong types are named."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise StudyError(f"{source}: {key} must be a mapping, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for name, value in raw.items():
        if name not in known:
            guess = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {key}.{guess[0]}?)" if guess else f" (known: {', '.join(known)})"
            raise StudyError(f"{source}: unknown key {key}.{name}{hint}")
        default = getattr(cls(), name)
        if hasattr(default, "__dataclass_fields__"):
            values[name] = _section(type(default), value, f"{key}.{name}", source)
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise StudyError(f"{source}: {key}.{name} must be a list, got {value!r}")
            values[name] = tuple(value)
        elif isinstance(default, bool) or not isinstance(default, (int, float, str)):
            values[name] = value
        else:
            values[name] = _scalar(value, type(default), f"{key}.{name}", source)
    return cls(**values)


def _scalar(value: Any, kind: type, key: str, source: str) -> Any:
    if kind is str:
        if isinstance(value, (dict, list)):
            raise StudyError(f"{source}: {key} must be a string, got {value!r}")
        return "" if value is None else str(value)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise StudyError(f"{source}: {key} must be a number, got {value!r}") from None
    if kind is int:
        if not number.is_integer():
            raise StudyError(f"{source}: {key} must be an integer, got {value!r}")
        return int(number)
    return number


def _numbers(raw: Any, key: str, source: str, kind: type) -> tuple:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise StudyError(f"{source}: {key} must be a non-empty list, got {raw!r}")
    values = tuple(_scalar(v, kind, key, source) for v in raw)
    if len(set(values)) != len(values):
        raise StudyError(f"{source}: {key} lists a value twice: {list(values)}")
    return values


def _overrides(raw: Any, key: str, source: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)) or not all(isinstance(v, str) and "=" in v for v in raw):
        raise StudyError(f"{source}: {key} must be a list of key.sub=value overrides, got {raw!r}")
    return tuple(raw)


def _methods(raw: Any, seeds: tuple[int, ...], lrs: tuple[float, ...], source: str) -> tuple[MethodSpec, ...]:
    if not isinstance(raw, dict) or not raw:
        raise StudyError(f"{source}: methods must be a mapping of name -> overrides (or {{overrides, seeds, lrs}})")
    methods = []
    for name, body in raw.items():
        key = f"methods.{name}"
        method_seeds, method_lrs = seeds, lrs
        if isinstance(body, dict):
            unknown = set(body) - {"overrides", "seeds", "lrs"}
            if unknown:
                raise StudyError(f"{source}: unknown key {key}.{sorted(unknown)[0]} (known: overrides, seeds, lrs)")
            if "seeds" in body:
                method_seeds = _numbers(body["seeds"], f"{key}.seeds", source, int)
            if "lrs" in body:
                method_lrs = _positive_lrs(body["lrs"], f"{key}.lrs", source)
            body = body.get("overrides")
        methods.append(MethodSpec(str(name), _overrides(body, key, source), method_seeds, method_lrs))
    return tuple(methods)


def _positive_lrs(raw: Any, key: str, source: str) -> tuple[float, ...]:
    lrs = _numbers(raw, key, source, float)
    if any(not lr > 0 for lr in lrs):
        raise StudyError(f"{source}: {key} must be positive, got {list(lrs)}")
    return lrs


def parse_study(raw: dict[str, Any], source: str = "study config") -> StudySpec:
    """A StudySpec from the YAML mapping; every shape error names its key."""
    if not isinstance(raw, dict):
        raise StudyError(f"{source}: the top level must be a mapping")
    for key in raw:
        if key not in _TOP:
            guess = difflib.get_close_matches(str(key), _TOP, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else f" (known: {', '.join(_TOP)})"
            raise StudyError(f"{source}: unknown key {key}{hint}")
    world = _section(WorldSpec, raw.get("world"), "world", source)
    if world.kind not in ("cpu", "cluster"):
        raise StudyError(f"{source}: world.kind must be cpu or cluster, got {world.kind!r}")
    seeds = _numbers(raw.get("seeds", [0]), "seeds", source, int)
    lrs = _positive_lrs(raw.get("lrs"), "lrs", source)
    budget = _scalar(raw.get("budget_epochs", 1.0), float, "budget_epochs", source)
    eval_every = _scalar(raw.get("eval_every", 0), int, "eval_every", source)
    if not (budget > 0 and math.isfinite(budget)):
        raise StudyError(f"{source}: budget_epochs must be positive, got {budget}")
    if eval_every < 1:
        raise StudyError(f"{source}: eval_every (steps between evaluations) must be at least 1, got {eval_every}")
    summary = _section(SummaryRule, raw.get("summary"), "summary", source)
    if summary.forget_mode not in ("min", "max"):
        raise StudyError(f"{source}: summary.forget_mode must be min or max, got {summary.forget_mode!r}")
    if not 0 <= summary.utility_fraction <= 1:
        raise StudyError(f"{source}: summary.utility_fraction must lie in [0, 1], got {summary.utility_fraction}")
    methods = _methods(raw.get("methods"), seeds, lrs, source)
    plots = raw.get("plots") or {}
    if not isinstance(plots, dict) or set(plots) - {"lr_methods"}:
        raise StudyError(f"{source}: plots may only hold lr_methods (the methods of lr.png)")
    lr_methods = tuple(plots.get("lr_methods", [m.name for m in methods]))
    names = {m.name for m in methods}
    for name in lr_methods:
        if name not in names:
            raise StudyError(f"{source}: plots.lr_methods names unknown method {name!r}")
    return StudySpec(
        name=str(raw.get("name", Path(source).stem)),
        world=world,
        methods=methods,
        lrs=lrs,
        seeds=seeds,
        budget_epochs=budget,
        eval_every=eval_every,
        common=_overrides(raw.get("common"), "common", source),
        summary=summary,
        lr_plot_methods=lr_methods,
        source=source,
    )


def load_study(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study config not found: {path}")
    try:
        raw = safe_load(path.read_text())
    except DuplicateKeyError as err:
        raise StudyError(f"{path}: {err}; keep one") from None
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML: {err}") from err
    return parse_study(raw or {}, str(path))


def spec_to_dict(spec: StudySpec) -> dict[str, Any]:
    """What the study folder keeps as `study.json` (plain JSON types)."""
    return json.loads(json.dumps(asdict(spec)))
