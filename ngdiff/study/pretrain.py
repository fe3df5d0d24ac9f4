"""The CPU world's shared "pretraining" base: TOFU's regime at toy scale.

TOFU fine-tunes a pretrained LLM for a few epochs, so its retain model answers a forget question fluently
but wrongly (forget ROUGE-L about 0.41) and its target differs from the retain model only moderately (KS
distance about 0.40 at forget01). Two tiny models trained from scratch to memorisation have neither
property: the retain model knows nothing to say, the target knows every answer by heart. So both world
models start from one base, trained for a few epochs (not to memorisation) on other TOFU authors and the
world's knowledge QA, then fine-tuned briefly: the target on forget + retain authors, the retain model on
the retain authors only.

The base depends only on its own recipe (model shape, pretraining text and schedule, prompt format), not
on the world's forget or retain authors nor its fine-tuning: its tokenizer is trained on the pretraining
text only (an author word it never read falls back to pieces it did read). Bases are cached by recipe
under `world.pretrain.cache_dir` (default `<study folder>/pretrain`), so the worlds of a study that
differ only in fine-tuning (e.g. a second fine-tuning seed) share one base, built once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ngdiff import TOFU_DIR
from ngdiff.study.spec import PretrainShape, StudyError, WorldSpec

log = logging.getLogger("ngdiff.study")

FIRST_AUTHOR = 20  # authors 0..19 may be a world's retain authors (retain_perturbed.jsonl covers them)
QUESTIONS_PER_AUTHOR = 20
RECIPE_FILE = "recipe.json"
INFO_FILE = "info.json"
MODEL = "model"  # the base: an ordinary HF model folder with its tokenizer
TOKENIZER_RECIPE = "byte-level BPE on the pretraining text only, pruned to the tokens that text uses"


def enabled(world: WorldSpec) -> bool:
    return world.pretrain.authors > 0


def pretrain_authors(world: WorldSpec) -> range:
    """TOFU author indices (in full.jsonl) the base is trained on: authors 20, 21, ... ."""
    return range(FIRST_AUTHOR, FIRST_AUTHOR + world.pretrain.authors)


def check_pretrain(world: WorldSpec, forget_authors: range) -> None:
    """world.pretrain: sensible numbers, and authors disjoint from the world's forget split."""
    p, defaults = world.pretrain, PretrainShape()
    if p.authors < 0:
        raise StudyError(f"world.pretrain.authors must be a number of TOFU authors >= 0, got {p.authors}")
    if p.authors == 0:
        changed = [k for k, v in asdict(p).items() if k not in ("authors", "cache_dir") and v != getattr(defaults, k)]
        if changed:
            raise StudyError(
                f"world.pretrain.{changed[0]} is set but world.pretrain.authors is 0 (no pretraining base); "
                "set world.pretrain.authors"
            )
        return
    last = FIRST_AUTHOR + p.authors - 1
    if last >= forget_authors.start:
        raise StudyError(
            f"world.pretrain.authors={p.authors}: the base would read authors {FIRST_AUTHOR}..{last}, but "
            f"{world.forget_split}'s forget authors start at {forget_authors.start}; use at most "
            f"{forget_authors.start - FIRST_AUTHOR}"
        )
    if not isinstance(p.replay_knowledge, bool):
        raise StudyError(f"world.pretrain.replay_knowledge must be true or false, got {p.replay_knowledge!r}")
    for key in ("epochs", "batch_size"):
        if getattr(p, key) < 1:
            raise StudyError(f"world.pretrain.{key} must be at least 1, got {getattr(p, key)}")
    if not p.lr > 0:
        raise StudyError(f"world.pretrain.lr must be positive, got {p.lr}")
    if p.warmup_steps < 0:
        raise StudyError(f"world.pretrain.warmup_steps must not be negative, got {p.warmup_steps}")


def pretrain_rows(world: WorldSpec, knowledge: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The base's training pairs: the pretraining authors' QA, then the world's knowledge QA."""
    from ngdiff.study.world import read_jsonl

    authors = pretrain_authors(world)
    full = read_jsonl(TOFU_DIR / "full.jsonl")
    rows = full[authors.start * QUESTIONS_PER_AUTHOR : authors.stop * QUESTIONS_PER_AUTHOR]
    return [{"question": r["question"], "answer": r["answer"]} for r in [*rows, *knowledge]]


def pretrain_recipe(world: WorldSpec, knowledge: list[dict[str, Any]], template: str) -> dict[str, Any]:
    """What a base is cached by: everything that shapes it, nothing of the world it serves."""
    p = {k: v for k, v in asdict(world.pretrain).items() if k not in ("cache_dir", "replay_knowledge")}
    text = json.dumps(pretrain_rows(world, knowledge), sort_keys=True).encode()
    recipe = {
        "pretrain": p,
        "model": asdict(world.model),
        "text_sha256": hashlib.sha256(text).hexdigest(),
        "prompt_template": template,
        "tokenizer": TOKENIZER_RECIPE,
    }
    return json.loads(json.dumps(recipe))


def base_folder(world: WorldSpec, study_dir: Path, recipe: dict[str, Any]) -> Path:
    root = Path(world.pretrain.cache_dir) if world.pretrain.cache_dir else Path(study_dir) / "pretrain"
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return root / key


def pretrained_base(
    world: WorldSpec, study_dir: Path, knowledge: list[dict[str, Any]], data_cfg, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """The base's model folder and its info (pairs, seconds, whether this call built it): the cached one
    if its recipe matches, else trained now (once, under a lock, when two processes build worlds)."""
    from ngdiff.study.world import BUILT, build_each

    recipe = pretrain_recipe(world, knowledge, data_cfg.prompt_template)
    folder = base_folder(world, study_dir, recipe)
    recipe_file = folder / RECIPE_FILE
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) != recipe:
        raise StudyError(f"{folder} holds a pretraining base of a different recipe; delete it")
    built_here = []

    def build(_: str) -> None:
        if folder.exists():  # a build killed half-way: start again
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        recipe_file.write_text(json.dumps(recipe, indent=1))
        info = train_base(world, folder, pretrain_rows(world, knowledge), data_cfg, progress)
        (folder / INFO_FILE).write_text(json.dumps(info, indent=1))
        built_here.append(True)

    folder.parent.mkdir(parents=True, exist_ok=True)
    build_each({"pretraining base": folder}, build)
    assert (folder / BUILT).is_file()
    info = json.loads((folder / INFO_FILE).read_text())
    return folder / MODEL, {**info, "folder": str(folder), "built_now": bool(built_here)}


def train_base(world: WorldSpec, folder: Path, rows: list[dict[str, Any]], data_cfg, progress: bool) -> dict[str, Any]:
    """Tokenizer on the pretraining text, a random tiny Llama, a few epochs of training: the base."""
    from ngdiff.data import encode_task
    from ngdiff.finetune import FinetuneConfig, finetune
    from ngdiff.modeling import TinyLlamaSpec, build_tiny_model
    from ngdiff.study.calibration import train_world_tokenizer
    from ngdiff.study.world import write_jsonl

    started = time.time()
    p, shape = world.pretrain, world.model
    tokenizer = train_world_tokenizer(rows, shape.vocab_size, data_cfg.prompt_template)
    spec = TinyLlamaSpec(
        shape.vocab_size, shape.hidden_size, shape.num_layers, shape.num_heads, shape.intermediate_size
    )
    init = folder / "init"
    build_tiny_model(init, [], spec, seed=p.seed, tokenizer=tokenizer)
    data = write_jsonl(folder / "data" / "pretrain.jsonl", rows)
    log.warning("world: pretraining the base (%d pairs, %d epochs)", len(rows), p.epochs)
    examples = encode_task(data_cfg, tokenizer, str(data), "world pretraining base")
    cfg = FinetuneConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, warmup_steps=p.warmup_steps, seed=p.seed)
    finetune(init, tokenizer, examples, folder / MODEL, cfg, progress=progress)
    shutil.rmtree(init)
    return {
        "pairs": len(rows),
        "authors": len(pretrain_authors(world)),
        "build_seconds": round(time.time() - started, 1),
    }
