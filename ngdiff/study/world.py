"""The study's world: the model every run unlearns from, the data sets, and the reference (retain-only)
model's evaluation that forget quality is measured against. Built once, cached, reused by every run.

CPU world (TOFU's protocol at toy scale): a tiny Llama fine-tuned on the forget authors, the first
`retain_authors` TOFU authors and the real-authors / world-facts QA (knowledge the unlearning never
sees in its retain set, so model utility measures collateral damage); a retain model trained the same
way (same initialisation, epochs, lr) on everything but the forget authors. Evaluation files are
evenly spaced subsets of the bundled `*_perturbed.jsonl` files, the same for every run.

MUSE world (`kind: muse`): the MUSE-News counterpart of the CPU world, in ngdiff.study.muse_world.

Cluster world: the user's target model and retain model (evaluated once here) or its published
evaluation log, and the user's forget / retain data.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ngdiff import MUSE_DIR, TOFU_DIR
from ngdiff.locks import FolderLock, Holder, try_lock
from ngdiff.study import muse_world, pretrain
from ngdiff.study.calibration import (
    answer_lengths,
    assert_calibrated,
    calibration_figures,
    check_bounds,
    train_world_tokenizer,
    training_token_ids,
    truncated_share,
    unseen_token_share,
)
from ngdiff.study.health import world_health
from ngdiff.study.spec import StudyError, StudySpec, WorldSpec, same_setting

log = logging.getLogger("ngdiff.study")

QUESTIONS_PER_AUTHOR = 20
WORLD_FILE = "world.json"
# evaluation file of each TOFU set, as ngdiff.eval.tofu reads them from eval.data_dir
KNOWLEDGE_FILES = {"real_authors": "real_authors", "world_facts": "world_facts"}


@dataclass(frozen=True)
class World:
    folder: Path
    overrides: tuple[str, ...]  # model, data and evaluation keys of every run
    target_metrics: dict[str, float]  # the target's evaluation: step 0 of every trajectory
    reference_metrics: dict[str, float]  # the retain model's evaluation (empty when only a log was given)
    info: dict[str, Any]  # sizes and paths, for the docs

    @property
    def target_utility(self) -> float | None:
        return self.target_metrics.get("model_utility")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evenly_spaced(rows: list[Any], n: int) -> list[Any]:
    """`n` rows spread over the whole list (all of them when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(rows):
        return list(rows)
    return [rows[(i * len(rows)) // n] for i in range(n)]


def world_folder(spec: StudySpec, study_dir: Path) -> Path:
    return Path(spec.world.cache_dir) if spec.world.cache_dir else study_dir / "world"


def placeholder_overrides(spec: StudySpec) -> list[str]:
    """The world's paths for validating every run's config before the world is built: a cluster world's
    real target and data; for a CPU world, bundled stand-ins (validated with `check_sources=False`)."""
    if spec.world.kind == "cluster":
        w = spec.world
        return [f"model.path={w.target}", f"data.forget={w.forget}", f"data.retain={w.retain}"]
    if spec.world.kind == "muse":
        texts = MUSE_DIR / muse_world.FORGET_ARTICLES
        return [f"model.path={MUSE_DIR}", f"data.forget={texts}", f"data.retain={texts}", "data.format=text"]
    return [
        f"model.path={TOFU_DIR}",
        f"data.forget={TOFU_DIR / f'{spec.world.forget_split}.jsonl'}",
        f"data.retain={TOFU_DIR / 'full.jsonl'}",
    ]


def check_world(world: WorldSpec) -> None:
    """Cheap checks of the world section (files, names) before anything is built."""
    if world.max_new_tokens < 1:
        raise StudyError(f"world.max_new_tokens must be positive, got {world.max_new_tokens}")
    if world.kind == "muse":
        muse_world.check_muse_world(world)
        return
    if world.kind == "cluster":
        if world.benchmark not in ("tofu", "muse"):
            raise StudyError(f"world.benchmark must be tofu or muse, got {world.benchmark!r}")
        for key in ("target", "forget", "retain"):
            if not getattr(world, key):
                raise StudyError(f"a cluster world needs world.{key}")
        if world.benchmark == "tofu" and not (world.retain_model or world.reference):
            raise StudyError("a TOFU cluster world needs world.retain_model or world.reference (forget quality)")
        return
    for name in (f"{world.forget_split}.jsonl", f"{world.forget_split}_perturbed.jsonl"):
        if not (TOFU_DIR / name).is_file():
            raise StudyError(f"world.forget_split={world.forget_split}: the bundled TOFU file {name} is missing")
    if not 1 <= world.retain_authors <= 20:
        raise StudyError(
            f"world.retain_authors must lie in 1..20 (retain_perturbed.jsonl covers the first 20), "
            f"got {world.retain_authors}"
        )
    for name in world.knowledge:
        if name not in KNOWLEDGE_FILES:
            raise StudyError(f"world.knowledge names {name!r}; choose from {', '.join(KNOWLEDGE_FILES)}")
    forget_authors(world)  # the selection is valid and disjoint from the retain authors
    if world.second_retain_seed < -1:
        raise StudyError(f"world.second_retain_seed must be a seed >= 0 (or -1: none), got {world.second_retain_seed}")
    check_bounds(world.calibration)
    pretrain.check_pretrain(world, split_authors(world.forget_split))


def split_authors(split: str) -> range:
    """The TOFU author indices (0..199 in full.jsonl) of a bundled forget split: its rows are the last
    ones of full.jsonl (resources/tofu/PROVENANCE.md)."""
    full = sum(1 for line in (TOFU_DIR / "full.jsonl").open() if line.strip()) // QUESTIONS_PER_AUTHOR
    rows = sum(1 for line in (TOFU_DIR / f"{split}.jsonl").open() if line.strip())
    return range(full - rows // QUESTIONS_PER_AUTHOR, full)


def forget_authors(world: WorldSpec) -> list[int]:
    """Positions (in the split) of the world's forget authors: `world.forget_authors`, or all of them."""
    authors = split_authors(world.forget_split)
    chosen = list(world.forget_authors) or list(range(len(authors)))
    where = f"world.forget_authors={list(world.forget_authors)}"
    if any(not isinstance(a, int) or isinstance(a, bool) for a in chosen) or len(set(chosen)) != len(chosen):
        raise StudyError(f"{where} must list distinct author positions (integers)")
    if not all(0 <= a < len(authors) for a in chosen):
        raise StudyError(f"{where}: {world.forget_split} has {len(authors)} authors (positions 0..{len(authors) - 1})")
    overlap = sorted(authors[a] for a in chosen if authors[a] < world.retain_authors)
    if overlap:
        raise StudyError(
            f"world: the forget authors {overlap} of {world.forget_split} are also among the first "
            f"{world.retain_authors} retain authors; lower world.retain_authors"
        )
    return chosen


TOKENIZER_RECIPE = "byte-level BPE on the fine-tuning text only, pruned to the tokens that text uses"
RECIPE_FILE = "recipe.json"  # written before the build: a half-built world is never reused by another recipe


def world_recipe(spec: StudySpec, data_cfg) -> dict[str, Any]:
    """What a world is cached by: its spec, less where it lives and the calibration bounds (checked on
    every load, so changing a bound needs no rebuild), plus the formatting and the tokenizer's recipe."""
    recipe = _spec_part(asdict(spec.world))
    if data_cfg.prompt_template:  # the CPU world is fine-tuned, and every world evaluated, with it
        recipe["prompt_template"] = data_cfg.prompt_template
    if spec.world.kind == "cpu":
        recipe["tokenizer"] = pretrain.TOKENIZER_RECIPE if pretrain.enabled(spec.world) else TOKENIZER_RECIPE
    if spec.world.kind == "muse":
        recipe["tokenizer"] = muse_world.TOKENIZER_RECIPE
    return json.loads(json.dumps(recipe))


def _spec_part(world: dict[str, Any]) -> dict[str, Any]:
    """A world spec's keys that change the world: not where it or its base are cached, nor the bounds."""
    recipe = {k: v for k, v in world.items() if k not in ("cache_dir", "calibration")}
    recipe["pretrain"] = {k: v for k, v in recipe["pretrain"].items() if k != "cache_dir"}
    return recipe


def _same_recipe(path: Path, recipe: dict[str, Any], folder: Path) -> None:
    """Refuse a folder built from another recipe; a recipe saved before a spec key existed matches a world
    holding that key's default (spec.same_setting)."""
    if not path.is_file():
        return
    defaults = json.loads(json.dumps(_spec_part(asdict(WorldSpec()))))
    if not same_setting(json.loads(path.read_text()).get("recipe"), recipe, defaults):
        raise StudyError(
            f"{folder} holds a world built from a different recipe; point world.cache_dir elsewhere or delete it"
        )


def load_or_build(spec: StudySpec, study_dir: Path, data_cfg, progress: bool = True) -> World:
    """The cached world if its recipe matches, else build it now; a CPU world must meet its calibration
    bounds (world.calibration), whether just built or cached."""
    folder = world_folder(spec, study_dir)
    recipe = world_recipe(spec, data_cfg)
    marker = folder / WORLD_FILE
    _same_recipe(marker, recipe, folder)
    if marker.is_file():
        record = json.loads(marker.read_text())
    else:
        _same_recipe(folder / RECIPE_FILE, recipe, folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECIPE_FILE).write_text(json.dumps({"recipe": recipe}, indent=1))
        if spec.world.kind == "cpu":
            record = build_cpu_world(spec.world, folder, data_cfg, progress, study_dir)
        elif spec.world.kind == "muse":
            record = muse_world.build_muse_world(spec.world, folder, data_cfg, progress)
        else:
            record = prepare_cluster_world(spec.world, folder, data_cfg)
        record["recipe"] = recipe
        record["health"] = world_health(record).to_json()
        marker.write_text(json.dumps(record, indent=1))
    if spec.world.kind == "cpu":
        assert_calibrated(record.get("calibration", {}), spec.world.calibration, str(marker))
    return _world_from_record(folder, record)


def _world_from_record(folder: Path, record: dict[str, Any]) -> World:
    return World(
        folder,
        tuple(record["overrides"]),
        record["target_metrics"],
        record.get("reference_metrics", {}),
        record.get("info", {}),
    )


def cpu_world_data(world: WorldSpec) -> dict[str, list[dict[str, Any]]]:
    """The CPU world's row sets: training sets of both models, the unlearning sets, the evaluation sets.
    With a pretraining base, the knowledge QA is the base's (`knowledge`), not the fine-tuning's."""
    full = read_jsonl(TOFU_DIR / "full.jsonl")
    authors = forget_authors(world)

    def of_forget_authors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for i, r in enumerate(rows) if i // QUESTIONS_PER_AUTHOR in authors]

    forget = of_forget_authors(read_jsonl(TOFU_DIR / f"{world.forget_split}.jsonl"))
    retain = full[: world.retain_authors * QUESTIONS_PER_AUTHOR]
    knowledge = [
        r
        for name in world.knowledge
        for r in evenly_spaced(read_jsonl(TOFU_DIR / f"{KNOWLEDGE_FILES[name]}.jsonl"), world.knowledge_items)
    ]
    retain_perturbed = read_jsonl(TOFU_DIR / "retain_perturbed.jsonl")[: len(retain)]
    items = world.eval_items
    evaluation = {
        f"{world.forget_split}_perturbed.jsonl": evenly_spaced(
            of_forget_authors(read_jsonl(TOFU_DIR / f"{world.forget_split}_perturbed.jsonl")), items.forget
        ),
        "retain_perturbed.jsonl": evenly_spaced(retain_perturbed, items.retain),
        "real_authors_perturbed.jsonl": evenly_spaced(
            read_jsonl(TOFU_DIR / "real_authors_perturbed.jsonl"), items.real_authors
        ),
        "world_facts_perturbed.jsonl": evenly_spaced(
            read_jsonl(TOFU_DIR / "world_facts_perturbed.jsonl"), items.world_facts
        ),
    }
    qa = ("question", "answer")
    finetuned = [] if pretrain.enabled(world) and not world.pretrain.replay_knowledge else knowledge
    return {
        "forget": [{k: r[k] for k in qa} for r in forget],
        "retain": [{k: r[k] for k in qa} for r in retain],
        "knowledge": [{k: r[k] for k in qa} for r in knowledge],
        "target_train": [{k: r[k] for k in qa} for r in [*retain, *forget, *finetuned]],
        "reference_train": [{k: r[k] for k in qa} for r in [*retain, *finetuned]],
        **evaluation,
    }


WORLD_MODELS = {"target": "target_train", "retain_model": "reference_train"}  # model folder -> training set
SECOND_RETAIN = "retain_model_2"  # trained like the retain model with world.second_retain_seed
BUILT = ".built"


def try_claim(folder: Path) -> tuple[str, FolderLock | Holder | None]:
    """('built', None), ('busy', who holds `folder`.lock) or ('mine', the lock this process now holds).
    Lets two `ngdiff study world` processes build the world's two models at once. The lock is the
    kernel's (ngdiff.locks): it dies with its holder, so a holder's reused PID cannot keep it."""
    if (folder / BUILT).is_file():
        return "built", None
    claim = try_lock(folder.with_name(folder.name + ".lock"))
    if isinstance(claim, Holder):
        return "busy", claim
    if (folder / BUILT).is_file():  # its builder finished between our two looks
        claim.release()
        return "built", None
    return "mine", claim


def build_each(folders: dict[str, Path], build, poll: float = 5.0) -> None:
    """`build(name)` for every folder not built yet and not being built elsewhere; wait for the others,
    saying once who builds each."""
    pending = dict(folders)
    reported: set[str] = set()
    while pending:
        for name, folder in list(pending.items()):
            state, claim = try_claim(folder)
            if state == "mine":
                with claim:
                    build(name)
                    (folder / BUILT).write_text("")
            if state == "busy":
                if name not in reported:
                    log.warning("world: %s is being built by another process (%s); waiting for it", name, claim)
                    reported.add(name)
            else:
                del pending[name]
        if pending:
            time.sleep(poll)


def build_cpu_world(
    world: WorldSpec, folder: Path, data_cfg, progress: bool = True, study_dir: Path | None = None
) -> dict[str, Any]:
    """Fine-tune the target and the retain model (from the pretraining base, when the world has one:
    cached under `study_dir`), evaluate both; return the record world.json keeps."""
    from ngdiff.data import encode_task
    from ngdiff.finetune import FinetuneConfig, finetune
    from ngdiff.modeling import TinyLlamaSpec, build_tiny_model, load_tokenizer

    started = time.time()
    sets = cpu_world_data(world)
    data_dir, eval_dir = folder / "data", folder / "eval_data"
    for name in ("forget", "retain", "target_train", "reference_train"):
        write_jsonl(data_dir / f"{name}.jsonl", sets[name])
    for name, rows in sets.items():
        if name.endswith(".jsonl"):
            write_jsonl(eval_dir / name, rows)

    shape = world.model
    spec = TinyLlamaSpec(
        shape.vocab_size, shape.hidden_size, shape.num_layers, shape.num_heads, shape.intermediate_size
    )
    template = data_cfg.prompt_template
    base = folder / "base"
    seen_rows = sets["target_train"]  # the text whose tokens the models were trained on
    base_info: dict[str, Any] = {}
    if pretrain.enabled(world):
        base, base_info = pretrain.pretrained_base(
            world, study_dir or folder.parent, sets["knowledge"], data_cfg, progress
        )
        seen_rows = [*pretrain.pretrain_rows(world, sets["knowledge"]), *seen_rows]
    else:

        def build_base(_: str) -> None:
            tokenizer = train_world_tokenizer(sets["target_train"], shape.vocab_size, template)
            build_tiny_model(base, [], spec, seed=world.finetune.seed, tokenizer=tokenizer)

        build_each({"base": base}, build_base)
    tokenizer = load_tokenizer(str(base))
    ft = world.finetune
    models = dict(WORLD_MODELS)
    seeds = dict.fromkeys(models, ft.seed)
    if world.second_retain_seed >= 0:
        models[SECOND_RETAIN] = "reference_train"
        seeds[SECOND_RETAIN] = world.second_retain_seed

    def fine_tune(name: str) -> None:
        train = models[name]
        log.warning("world: fine-tuning the %s (%d pairs, %d epochs)", name, len(sets[train]), ft.epochs)
        examples = encode_task(data_cfg, tokenizer, str(data_dir / f"{train}.jsonl"), f"world {train}")
        cfg = FinetuneConfig(
            epochs=ft.epochs, batch_size=ft.batch_size, lr=ft.lr, warmup_steps=ft.warmup_steps, seed=seeds[name]
        )
        finetune(base, tokenizer, examples, folder / name, cfg, progress=progress)

    build_each({name: folder / name for name in models}, fine_tune)

    reference = folder / "reference_eval"
    reference_metrics = evaluate_model(folder / "retain_model", world, eval_dir, reference, None, None, 0, template)
    target_metrics = evaluate_model(
        folder / "target", world, eval_dir, folder / "target_eval", reference, None, 0, template
    )
    forget_eval = sets[f"{world.forget_split}_perturbed.jsonl"]
    lengths = answer_lengths(tokenizer, forget_eval, template)
    seen = training_token_ids(tokenizer, seen_rows, template)
    calibration = calibration_figures(
        target_metrics,
        reference_metrics,
        unseen_token_share(tokenizer, seen, forget_eval, template),
        truncated_share(lengths, world.max_new_tokens),
    )
    second: dict[str, float] = {}
    if world.second_retain_seed >= 0:  # what a perfect unlearning (a retrain) would reach
        second = evaluate_model(
            folder / SECOND_RETAIN, world, eval_dir, folder / "second_retain_eval", reference, None, 0, template
        )
        calibration["d_retain_retain"] = second.get("forget_ks_statistic")
        calibration["forget_quality_ceiling"] = second.get("forget_quality")
    overrides = [
        f"model.path={folder / 'target'}",
        f"data.forget={data_dir / 'forget.jsonl'}",
        f"data.retain={data_dir / 'retain.jsonl'}",
        "eval.benchmark=tofu",
        f"eval.split={world.forget_split}",
        f"eval.data_dir={eval_dir}",
        f"eval.reference={folder / 'reference_eval'}",
        "eval.max_items=0",
        f"eval.max_new_tokens={world.max_new_tokens}",
    ]
    info = {
        "forget_pairs": len(sets["forget"]),
        "retain_pairs": len(sets["retain"]),
        "target_train_pairs": len(sets["target_train"]),
        "reference_train_pairs": len(sets["reference_train"]),
        "eval_items": {k: len(v) for k, v in sets.items() if k.endswith(".jsonl")},
        "parameters": _parameter_count(folder / "target"),
        "vocabulary": len(tokenizer),
        "forget_answer_tokens": {
            "median": sorted(lengths)[len(lengths) // 2] if lengths else 0,
            "max": max(lengths, default=0),
        },
        "build_seconds": round(time.time() - started, 1),
        **({"pretrain": base_info} if base_info else {}),
    }
    return {
        "overrides": overrides,
        "target_metrics": target_metrics,
        "reference_metrics": reference_metrics,
        **({"second_retain_metrics": second} if second else {}),
        "calibration": calibration,
        "info": info,
    }


def _parameter_count(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def evaluate_model(
    model_dir: Path | str,
    world: WorldSpec,
    data_dir: Path | str | None,
    out: Path,
    reference: Path | str | None,
    split: str | None = None,
    max_items: int = 0,
    prompt_template: str = "",
) -> dict[str, float]:
    """TOFU evaluation of one model on one process (written to `out`), against `reference`'s truth ratios."""
    import torch
    from transformers import AutoModelForCausalLM

    from ngdiff.eval.benchmark import BenchmarkSpec, load_reference, run_benchmark
    from ngdiff.eval.report import write_outputs
    from ngdiff.modeling import load_tokenizer

    split = split or world.forget_split
    spec = BenchmarkSpec(
        "tofu",
        split=split,
        data_dir=data_dir,
        max_items=max_items,
        max_new_tokens=world.max_new_tokens,
        prompt_template=prompt_template,
        reference=load_reference("tofu", reference),
    )
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        items, metrics = run_benchmark(model, tokenizer, spec)
    meta = {"model": str(model_dir), "split": split, "max_new_tokens": world.max_new_tokens}
    write_outputs(out, "tofu", items, metrics, meta)
    return metrics


def prepare_cluster_world(world: WorldSpec, folder: Path, data_cfg) -> dict[str, Any]:
    """The user's models: evaluate the retain model once (unless a log was given) and the target (step 0)."""
    template = data_cfg.prompt_template  # the user's models' formatting (common: data.prompt_template=...)
    overrides = [
        f"model.path={world.target}",
        f"data.forget={world.forget}",
        f"data.retain={world.retain}",
        f"eval.benchmark={world.benchmark}",
        f"eval.max_items={world.max_items}",
        f"eval.max_new_tokens={world.max_new_tokens}",
        *([f"eval.data_dir={world.data_dir}"] if world.data_dir else []),
    ]
    reference_metrics: dict[str, float] = {}
    if world.benchmark == "muse":
        if world.reference:
            overrides.append(f"eval.reference={world.reference}")
        return {"overrides": overrides, "target_metrics": {}, "reference_metrics": {}, "info": {}}
    overrides.append(f"eval.split={world.split}")
    reference = world.reference
    if not reference:
        reference_metrics = evaluate_model(
            world.retain_model,
            world,
            world.data_dir or None,
            folder / "reference_eval",
            None,
            world.split,
            world.max_items,
            template,
        )
        reference = str(folder / "reference_eval")
    overrides.append(f"eval.reference={reference}")
    target_metrics = evaluate_model(
        world.target,
        world,
        world.data_dir or None,
        folder / "target_eval",
        reference,
        world.split,
        world.max_items,
        template,
    )
    return {
        "overrides": overrides,
        "target_metrics": target_metrics,
        "reference_metrics": reference_metrics,
        "info": {},
    }
