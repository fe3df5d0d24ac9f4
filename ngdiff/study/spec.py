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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ngdiff.errors import UserError
from ngdiff.strict_yaml import DuplicateKeyError, safe_load
from ngdiff.typed_yaml import TypedYaml, checked_later


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
    """How the target and the retain model are fine-tuned (identically, from the same initialisation: the
    pretraining base, or a random one)."""

    epochs: int = 60
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 20
    seed: int = 0  # data order, and the initialisation of a world without a pretraining base


@dataclass(frozen=True)
class PretrainShape:
    """The CPU world's shared "pretraining" base (ngdiff.study.pretrain): a few epochs, not to memorisation,
    on `authors` other TOFU authors and the world's knowledge QA; the target and the retain model are then
    fine-tuned from it. `authors: 0` (the default): no base, both models fine-tuned from scratch."""

    authors: int = 0  # TOFU authors 20, 21, ...: never a retain author (0..19) nor a forget split's
    epochs: int = 5
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 20
    seed: int = 0  # the base's initialisation and data order
    cache_dir: str = ""  # where bases are cached by recipe; default: <study folder>/pretrain
    # fine-tune both models on the knowledge QA too (a replay of part of the pretraining): a tiny base
    # forgets the short knowledge answers in a fine-tuning on long author answers
    replay_knowledge: bool = field(default=False, metadata=checked_later())  # ngdiff.study.pretrain checks it


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
class MuseShape:
    """The MUSE-News CPU world's data (ngdiff.study.muse_world): chunks of `chunk_words` words of the bundled
    forget articles, retain-side texts and holdout texts, and MUSE's KnowMem questions."""

    chunk_words: int = 60  # words per training chunk (the tokenizer does not exist yet when they are cut)
    forget_chunks: int = 16  # from raw/forget_first16.json, in article order; also PrivLeak's members
    retain_chunks: int = 16  # from privleak/retain2.json (MUSE's large retain corpus is not bundled)
    holdout_chunks: int = 16  # from privleak/holdout.json: PrivLeak's non-members, never trained on
    knowmem_items: int = 16  # first N questions of knowmem/forget_qa.json and of knowmem/retain2_qa.json
    # few-shot examples of KnowMem's prompt. MUSE uses all 10 of the *_icl files; the world's models learn
    # the format from their training text, and behind 10 unseen examples a 2-layer model loses the answer
    knowmem_shots: int = 0
    verbmem_items: int = 16  # VerbMem prompts: the first N forget chunks, cut after `prompt_words` words
    prompt_words: int = 12
    # 2..4: also MUSE's sustainability folds 2..folds (sust/forget_<k>_first16.json), `forget_chunks` chunks each,
    # trained into the target and written as one file per fold (data/fold_<k>.jsonl) for `ngdiff sequence`
    folds: int = 1


@dataclass(frozen=True)
class WorldSpec:
    """`cpu`: built here from the bundled TOFU files; `muse`: built here from the bundled MUSE-News files
    (ngdiff.study.muse_world); `cluster`: the user's target and retain model."""

    kind: str = "cpu"
    cache_dir: str = ""  # where the world is built once; default: <study folder>/world
    max_new_tokens: int = 48  # greedy generation length of every evaluation
    # cpu world
    forget_split: str = "forget01"  # bundled <split>.jsonl and <split>_perturbed.jsonl: the forget authors
    forget_authors: tuple[int, ...] = ()  # only these authors of the split (0 = its first), e.g. [2, 3]
    second_retain_seed: int = -1  # >= 0: a second retain model, fine-tuned with this seed (forget ceiling)
    retain_authors: int = 10  # the first N TOFU authors (covered by the bundled retain_perturbed.jsonl)
    knowledge: tuple[str, ...] = ("real_authors", "world_facts")  # trained on, never in the retain set
    knowledge_items: int = 0  # train on N evenly spaced items of each knowledge set (0: all of them)
    model: ModelShape = field(default_factory=ModelShape)
    finetune: FinetuneShape = field(default_factory=FinetuneShape)
    pretrain: PretrainShape = field(default_factory=PretrainShape)  # authors 0: no pretraining base
    eval_items: EvalItems = field(default_factory=EvalItems)
    calibration: CalibrationBounds = field(default_factory=CalibrationBounds)  # checked after the build
    muse: MuseShape = field(default_factory=MuseShape)  # kind muse: the MUSE-News CPU world's data
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
    """Per run, the best evaluation point: the smallest KS distance D among the points whose
    `utility_metric` is at least `utility_fraction` x the target's (ngdiff.study.endpoints). Step 0 (the
    target itself) always qualifies, so every run has a best point. `select_on` is the endpoint whose
    median picks each method's lr (higher is better unless it is a distance); `floors` are the utility
    fractions of the floor-sensitivity table. `forget_metric` is the trajectory the plots draw."""

    forget_metric: str = "forget_quality"
    forget_mode: str = "max"
    utility_metric: str = "model_utility"
    utility_fraction: float = 0.95
    select_on: str = "best_gap"
    floors: tuple[float, ...] = (0.90, 0.95, 0.98)


@dataclass(frozen=True)
class StageSpec:
    """One stage of a study: which worlds (labels of `StudySpec.worlds`) and seeds it runs, which methods,
    and at which lrs: `grid` (every lr of the method's grid) or `selected` (the lr the selection stage
    picked). `grid` is the stage of a study that declares no stages."""

    name: str
    worlds: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    lrs: str = "grid"


@dataclass(frozen=True)
class ComparisonSpec:
    """A declared comparison: `method` against `reference` on an endpoint (ngdiff.study.inference)."""

    method: str = ""
    reference: str = ""
    endpoint: str = "best_gap"
    direction: str = "greater"


@dataclass(frozen=True)
class Claim2Spec:
    """Claim 2 (lr robustness): `with_method` (e.g. NGDiff + AutoLR) against `without` over their whole lr
    grids, run as the `claim2` stage: the width in decades of the initial lrs whose end point keeps the
    floor and reaches G >= `target_gap`, and a Brown-Forsythe test of the end-point G's spread."""

    with_method: str
    without: str
    target_gap: float
    worlds: tuple[str, ...]
    seeds: tuple[int, ...]
    lrs: tuple[float, ...] = ()  # the claim's own lr grid (e.g. 3 decades); empty: each method's grid


BASE_WORLD = "base"  # the label of the study's `world:` itself
STAGE_NAMES = ("selection", "confirmation")


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
    stage: str = "grid"
    world: str = BASE_WORLD

    @property
    def folder_method(self) -> str:
        """The method's name as a folder name may hold it."""
        return "".join(ch if ch.isalnum() or ch in "+-_." else "-" for ch in self.method)

    @property
    def run_id(self) -> str:
        """The run's folder name: distinct lrs always give distinct names (see `lr_label`); a staged or
        multi-world run's name starts with its stage and world."""
        name = f"{self.folder_method}__lr{lr_label(self.lr)}__s{self.seed}"
        if self.stage == "grid" and self.world == BASE_WORLD:
            return name
        return f"{self.stage}__{self.world}__{name}"

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
    worlds: tuple[tuple[str, WorldSpec], ...] = ()  # (label, world) of every world a stage names
    stages: tuple[StageSpec, ...] = ()  # empty: one `grid` stage (every method x lr x seed on `world`)
    comparisons: tuple[ComparisonSpec, ...] = ()
    exploratory: tuple[str, ...] = ()  # methods no verdict uses
    claim2: Claim2Spec | None = None
    keep_weights: bool = True  # each run keeps its selected and end point's weights (bf16)
    plot_labels: tuple[tuple[str, str], ...] = ()  # (method, legend in words) beyond the shipped names

    @property
    def staged(self) -> bool:
        return bool(self.stages)

    def world_spec(self, label: str) -> WorldSpec:
        return dict(self.worlds).get(label, self.world) if label != BASE_WORLD else self.world

    def method(self, name: str) -> MethodSpec:
        return next(m for m in self.methods if m.name == name)

    def runs(self, selected: dict[str, float] | None = None) -> list[RunSpec]:
        """The runs in a fixed order (stage, method, lr, world, seed): the index of a run is its Slurm array
        task. A staged study's confirmation runs need the selection's lrs (`selected`, per method); until
        they are known the list holds the selection (and claim-2) runs only, so indices never move."""
        out = []
        if not self.staged:
            out = [RunSpec(m.name, lr, seed, m.overrides) for m in self.methods for lr in m.lrs for seed in m.seeds]
        stages = list(self.stages)
        if self.claim2 is not None:  # after the selection, before the confirmation (whose lrs come later)
            c = self.claim2
            stages.insert(1 if self.staged else 0, StageSpec("claim2", c.worlds, c.seeds, (c.with_method, c.without)))
        for stage in stages:
            if stage.lrs == "selected" and selected is None:
                continue
            for name in stage.methods:
                m = self.method(name)
                lrs = m.lrs if stage.lrs == "grid" else ((selected[name],) if name in selected else ())
                if stage.name == "claim2" and self.claim2 is not None and self.claim2.lrs:
                    lrs = self.claim2.lrs
                # an exploratory method is tuned on the selection's first seed only (no verdict uses it)
                seeds = stage.seeds[:1] if name in self.exploratory and stage.name == "selection" else stage.seeds
                out += [
                    RunSpec(name, lr, seed, m.overrides, stage.name, world)
                    for lr in lrs
                    for world in stage.worlds
                    for seed in seeds
                ]
        return out

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
            *(["export.dtype=bf16"] if self.keep_weights else []),
        ]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self.world), sort_keys=True).encode()).hexdigest()[:16]


_TOP = (
    "name", "world", "methods", "lrs", "seeds", "budget_epochs", "eval_every", "common", "summary", "plots",
    "stages", "comparisons", "exploratory", "claim2", "keep_weights",
)  # fmt: skip


def _typed(source: str) -> TypedYaml:
    """The shared YAML-to-dataclass reader, raising StudyError with the study file's name."""
    return TypedYaml(source, StudyError)


def _numbers(raw: Any, key: str, source: str, kind: type) -> tuple:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise StudyError(f"{source}: {key} must be a non-empty list, got {raw!r}")
    values = tuple(_typed(source).value(v, kind, key) for v in raw)
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
            _typed(source).check_keys(body, ("overrides", "seeds", "lrs"), key)
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
    typed = _typed(source)
    typed.check_keys(raw, _TOP)
    world = typed.section(WorldSpec, raw.get("world"), "world")
    if world.kind not in ("cpu", "muse", "cluster"):
        raise StudyError(f"{source}: world.kind must be cpu, muse or cluster, got {world.kind!r}")
    seeds = _numbers(raw.get("seeds", [0]), "seeds", source, int)
    lrs = _positive_lrs(raw.get("lrs"), "lrs", source)
    budget = typed.value(raw.get("budget_epochs", 1.0), float, "budget_epochs")
    eval_every = typed.value(raw.get("eval_every", 0), int, "eval_every")
    if not (budget > 0 and math.isfinite(budget)):
        raise StudyError(f"{source}: budget_epochs must be positive, got {budget}")
    if eval_every < 1:
        raise StudyError(f"{source}: eval_every (steps between evaluations) must be at least 1, got {eval_every}")
    summary = typed.section(SummaryRule, raw.get("summary"), "summary")
    if summary.forget_mode not in ("min", "max"):
        raise StudyError(f"{source}: summary.forget_mode must be min or max, got {summary.forget_mode!r}")
    if not 0 <= summary.utility_fraction <= 1:
        raise StudyError(f"{source}: summary.utility_fraction must lie in [0, 1], got {summary.utility_fraction}")
    methods = _methods(raw.get("methods"), seeds, lrs, source)
    plots = raw.get("plots") or {}
    if not isinstance(plots, dict) or set(plots) - {"lr_methods", "labels"}:
        raise StudyError(f"{source}: plots may only hold lr_methods (the methods of lr.png) and labels")
    labels = plots.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise StudyError(f"{source}: plots.labels must map method names to legends in words")
    lr_methods = tuple(plots.get("lr_methods", [m.name for m in methods]))
    names = {m.name for m in methods}
    for name in lr_methods:
        if name not in names:
            raise StudyError(f"{source}: plots.lr_methods names unknown method {name!r}")
    exploratory = _method_names(raw.get("exploratory", []), "exploratory", names, source)
    worlds = _Worlds(raw.get("world") or {}, source)
    stages = _stages(raw.get("stages"), names, exploratory, worlds, source)
    comparisons = _comparisons(raw.get("comparisons"), names, exploratory, source)
    claim2 = _claim2(raw.get("claim2"), names, worlds, source)
    keep = raw.get("keep_weights", True)
    if not isinstance(keep, bool):
        raise StudyError(f"{source}: keep_weights must be true or false, got {keep!r}")
    if summary.select_on not in _ENDPOINTS:
        raise StudyError(f"{source}: summary.select_on '{summary.select_on}': choose one of {', '.join(_ENDPOINTS)}")
    summary = replace(summary, floors=_numbers(list(summary.floors), "summary.floors", source, float))
    if any(not 0 < f <= 1 for f in summary.floors):
        raise StudyError(f"{source}: summary.floors must be fractions in (0, 1], got {list(summary.floors)}")
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
        worlds=worlds.labelled(),
        stages=stages,
        comparisons=comparisons,
        exploratory=exploratory,
        claim2=claim2,
        keep_weights=keep,
        plot_labels=tuple((str(k), v) for k, v in labels.items()),
    )


# --------------------------------------------------------------------------- stages, comparisons, claim 2

# endpoints a selection or comparison may name (ngdiff.study.endpoints.NUMERIC_FIELDS less the p-values)
_ENDPOINTS = (
    "best_gap", "best_distance", "best_log10_quality", "best_utility", "best_tr_distance", "area",
    "end_gap", "end_distance", "end_log10_quality", "end_utility",
)  # fmt: skip


def _method_names(raw: Any, key: str, names: set[str], source: str) -> tuple[str, ...]:
    if not isinstance(raw, (list, tuple)):
        raise StudyError(f"{source}: {key} must be a list of method names, got {raw!r}")
    for name in raw:
        if name not in names:
            guess = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise StudyError(f"{source}: {key} names unknown method {name!r}{hint}")
    return tuple(raw)


class _Worlds:
    """Worlds named by a stage: a mapping of world keys merged into the study's `world:` (kept opaque here;
    WorldSpec checks the keys). `{}` is the study's world itself (label `base`); a mapping may carry a
    `name`, else the worlds are labelled w1, w2, ... in the order they first appear."""

    def __init__(self, base: Any, source: str) -> None:
        if not isinstance(base, dict):
            raise StudyError(f"{source}: world must be a mapping, got {base!r}")
        self.base, self.source = base, source
        self.items: list[tuple[str, dict, WorldSpec]] = []

    def label(self, raw: Any, key: str) -> str:
        if not isinstance(raw, dict):
            raise StudyError(f"{self.source}: {key} must be a mapping of world keys (e.g. {{}} for the study's world)")
        raw = dict(raw)
        name = raw.pop("name", None)
        if not raw and name in (None, BASE_WORLD):
            return BASE_WORLD
        for label, overrides, _ in self.items:
            if overrides == raw and name in (None, label):
                return label
        label = str(name) if name is not None else f"w{len(self.items) + 1}"
        if label == BASE_WORLD or any(label == other for other, _, _ in self.items):
            raise StudyError(f"{self.source}: {key}: two different worlds are both named {label!r}")
        if not label.replace("-", "").replace("_", "").isalnum():
            raise StudyError(f"{self.source}: {key}.name {label!r} may hold only letters, digits, - and _")
        merged = _merge(self.base, raw)
        if merged.get("cache_dir") and merged.get("cache_dir") == self.base.get("cache_dir"):
            merged["cache_dir"] = f"{merged['cache_dir'].rstrip('/')}-{label}"  # a world of its own
        self.items.append((label, raw, _typed(self.source).section(WorldSpec, merged, key)))
        return label

    def labelled(self) -> tuple[tuple[str, WorldSpec], ...]:
        return tuple((label, spec) for label, _, spec in self.items)


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _worlds_and_seeds(raw: dict, key: str, worlds: _Worlds, source: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    listed = raw.get("worlds", [{}])
    if not isinstance(listed, (list, tuple)) or not listed:
        raise StudyError(f"{source}: {key}.worlds must be a non-empty list of world mappings ({{}}: the study's)")
    labels = tuple(worlds.label(w, f"{key}.worlds[{i}]") for i, w in enumerate(listed))
    if len(set(labels)) != len(labels):
        raise StudyError(f"{source}: {key}.worlds lists a world twice")
    if "seeds" not in raw:
        raise StudyError(f"{source}: {key}.seeds is missing (the seeds this stage runs)")
    return labels, _numbers(raw["seeds"], f"{key}.seeds", source, int)


def _stages(raw: Any, names: set[str], exploratory: tuple[str, ...], worlds: _Worlds, source: str):
    """`stages: {selection: {worlds, seeds}, confirmation: {worlds, seeds}}`: selection runs every method at
    every lr of its grid; confirmation runs the verdict methods (not the exploratory ones) at the lr the
    selection picked, on fresh seeds (and worlds)."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or set(raw) != set(STAGE_NAMES):
        raise StudyError(f"{source}: stages must be a mapping with exactly selection and confirmation, got {raw!r}")
    out = []
    for name in STAGE_NAMES:
        body = raw[name]
        key = f"stages.{name}"
        if not isinstance(body, dict) or set(body) - {"worlds", "seeds"}:
            raise StudyError(f"{source}: {key} must be a mapping of worlds and seeds, got {body!r}")
        labels, seeds = _worlds_and_seeds(body, key, worlds, source)
        methods = sorted(names) if name == "selection" else sorted(names - set(exploratory))
        out.append(StageSpec(name, labels, seeds, tuple(methods), "grid" if name == "selection" else "selected"))
    selection, confirmation = out
    reused = {(w, s) for w in selection.worlds for s in selection.seeds}
    reused &= {(w, s) for w in confirmation.worlds for s in confirmation.seeds}
    if reused:
        world, seed = sorted(reused)[0]
        raise StudyError(
            f"{source}: stages.confirmation reuses world {world!r} with seed {seed} of stages.selection: "
            "confirm on fresh seeds (or worlds)"
        )
    return tuple(out)


def _comparisons(raw: Any, names: set[str], exploratory: tuple[str, ...], source: str):
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise StudyError(f"{source}: comparisons must be a list of {{method, reference, endpoint, direction}}")
    out = []
    for i, body in enumerate(raw):
        key = f"comparisons[{i}]"
        item = _typed(source).section(ComparisonSpec, body, key) if isinstance(body, dict) and body else None
        if item is None or not item.method or not item.reference:
            raise StudyError(f"{source}: {key} needs method and reference, got {body!r}")
        for role in ("method", "reference"):
            name = getattr(item, role)
            if name not in names:
                raise StudyError(f"{source}: {key}.{role} names unknown method {name!r}")
            if name in exploratory:
                raise StudyError(f"{source}: {key}.{role} names {name!r}, which is exploratory (no verdict uses it)")
        if item.endpoint not in _ENDPOINTS:
            raise StudyError(f"{source}: {key}.endpoint '{item.endpoint}': choose one of {', '.join(_ENDPOINTS)}")
        if item.direction not in ("greater", "less"):
            raise StudyError(f"{source}: {key}.direction must be greater or less, got {item.direction!r}")
        out.append(item)
    return tuple(out)


def _claim2(raw: Any, names: set[str], worlds: _Worlds, source: str) -> Claim2Spec | None:
    if raw is None:
        return None
    known = {"with", "without", "target_gap", "worlds", "seeds", "lrs"}
    if not isinstance(raw, dict) or set(raw) - known or not {"with", "without", "target_gap"} <= set(raw):
        raise StudyError(f"{source}: claim2 must be a mapping of {', '.join(sorted(known))}, got {raw!r}")
    for role in ("with", "without"):
        if raw[role] not in names:
            raise StudyError(f"{source}: claim2.{role} names unknown method {raw[role]!r}")
    labels, seeds = _worlds_and_seeds(raw, "claim2", worlds, source)
    gap = _typed(source).value(raw["target_gap"], float, "claim2.target_gap")
    lrs = _positive_lrs(raw["lrs"], "claim2.lrs", source) if "lrs" in raw else ()
    return Claim2Spec(str(raw["with"]), str(raw["without"]), gap, labels, seeds, lrs)


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


def same_setting(saved: Any, current: Any, default: Any) -> bool:
    """Whether a saved setting (study.json, a world's recipe.json) is the current one. A key the saved record
    lacks was added to the spec after it was written; the saved record was made with that key's default, so
    it matches only that. One rule, so a new spec field orphans neither study folders nor cached worlds."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return saved == current
    default = default if isinstance(default, dict) else {}
    if set(saved) - set(current):
        return False
    return all(
        same_setting(saved[key], value, default.get(key)) if key in saved else value == default.get(key, object())
        for key, value in current.items()
    )
