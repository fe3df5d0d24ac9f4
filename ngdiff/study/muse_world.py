"""The MUSE-News CPU world (`world.kind: muse`): MUSE's protocol at toy scale, from the bundled data.

MUSE (Shi et al. 2024, github.com/jaechan-repo/muse_bench) fine-tunes a target on the forget articles and
the retain corpus and a retrained model on the retain corpus alone, then scores VerbMem on the forget
articles, KnowMem on forget and retain questions, and PrivLeak against the retrained model's Min-K% AUC.
Here, with what is bundled (ngdiff/resources/muse_news/):

- forget text: chunks of `chunk_words` words of the forget articles (raw/forget_first16.json), in order;
- retain text: chunks of the retain-side texts (privleak/retain2.json). MUSE's retain corpus (thousands of
  articles) is not bundled, so the retain side is these texts only;
- KnowMem: the first `knowmem_items` questions of knowmem/forget_qa.json and retain2_qa.json, trained as text
  in KnowMem's own format (`Question: q\\nAnswer: a\\n\\n`) with the forget and the retain text. A model this
  small does not turn an article into answers, so it is taught the answers: KnowMem here measures
  memorised answers, a weaker thing than MUSE's knowledge;
- VerbMem: the first `verbmem_items` forget chunks, cut after `prompt_words` words (MUSE's prompts are cut
  from the forget articles the same way, with a longer prompt and a 128-token continuation);
- PrivLeak: the forget chunks (members) against as many chunks of privleak/holdout.json (never trained on).
- sustainability folds (`folds` > 1): chunks of MUSE's sustainability folds 2..folds
  (sust/forget_<k>_first16.json; fold 1 is the forget articles) trained into the target, never into the retain
  model, and written with fold 1's chunks as `data/fold_<k>.jsonl`: the requests of an `ngdiff sequence` (the
  QA pairs stay in the forget set only: they are no fold's VerbMem text).

The tokenizer is a byte-level BPE trained on the target's training text, with every run of whitespace its
own token: KnowMem's prompt ends in a space ("Answer: "), which an ordinary byte-level BPE would merge
into the answer's first word during training but not in the prompt. The target and the retain model are
fine-tuned from the same random initialisation (`finetune.seed`) and evaluated with ngdiff.eval.muse on
the world's evaluation files (`eval_data/`, MUSE's layout); the retain model's output is every run's
PrivLeak reference.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from ngdiff import MUSE_DIR
from ngdiff.study.spec import StudyError, WorldSpec

# a MUSE world's D (ngdiff.study.endpoints): |VerbMem_f - the retain model's VerbMem_f| / 100, 0 where the
# retain model is. Not PrivLeak: at this scale every trained text has a far lower loss than unseen news, so
# the forget-vs-holdout AUC stays at 0 until the forget set is destroyed (measured: 0 at every point of the
# quick study, VerbMem 74 -> 15 included)
MUSE_DISTANCE = "verbmem_distance"
DISTANCE_WORDS = (
    "D = |VerbMem on the forget set - the retain model's| / 100",
    "A MUSE world has no forget quality (no truth ratios, no KS test): those columns read n/a; every run's "
    "VerbMem, KnowMem (forget, retain) and PrivLeak are in results.jsonl.",
)
FORGET_ARTICLES = "raw/forget_first16.json"
RETAIN_TEXTS = "privleak/retain2.json"
HOLDOUT_TEXTS = "privleak/holdout.json"
# MUSE's sustainability folds in order: fold 1 is the forget set itself (muse_bench's README), 2-4 are sust/
FOLD_ARTICLES = (FORGET_ARTICLES, *(f"sust/forget_{k}_first16.json" for k in (2, 3, 4)))
TOKENIZER_RECIPE = "byte-level BPE on the target's training text, each whitespace run its own token"


def verbmem_distance(metrics: dict[str, Any], reference: dict[str, Any]) -> float | None:
    if metrics.get("verbmem_f") is None or reference.get("verbmem_f") is None:
        return None
    return abs(float(metrics["verbmem_f"]) - float(reference["verbmem_f"])) / 100.0


def with_distance(rows: list[dict[str, Any]], references: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows, each with its D against its world's retain model (`references[world]`: its metrics), so that
    results.jsonl alone carries what the summary ranks by."""
    return [{**r, MUSE_DISTANCE: verbmem_distance(r, references.get(r.get("world"), {}))} for r in rows]


def check_muse_world(world: WorldSpec) -> None:
    """Cheap checks of `world.muse` before anything is built."""
    muse = world.muse
    for key in ("chunk_words", "forget_chunks", "retain_chunks", "holdout_chunks", "knowmem_items", "verbmem_items"):
        if getattr(muse, key) < 1:
            raise StudyError(f"world.muse.{key} must be positive, got {getattr(muse, key)}")
    if not 0 <= muse.knowmem_shots <= 10:
        raise StudyError(
            f"world.muse.knowmem_shots must lie in 0..10 (the *_icl files hold 10), got {muse.knowmem_shots}"
        )
    if not 0 < muse.prompt_words < muse.chunk_words:
        raise StudyError(f"world.muse.prompt_words must lie in 1..chunk_words-1, got {muse.prompt_words}")
    if muse.verbmem_items > muse.forget_chunks:
        raise StudyError(
            f"world.muse.verbmem_items ({muse.verbmem_items}) exceeds forget_chunks ({muse.forget_chunks})"
        )
    if not 1 <= muse.folds <= len(FOLD_ARTICLES):
        raise StudyError(
            f"world.muse.folds must lie in 1..{len(FOLD_ARTICLES)} (MUSE's sustainability folds), got {muse.folds}"
        )
    if muse.knowmem_items > 100:
        raise StudyError(
            f"world.muse.knowmem_items must be at most 100 (the bundled QA files), got {muse.knowmem_items}"
        )


def _load(name: str) -> Any:
    return json.loads((MUSE_DIR / name).read_text())


def word_chunks(texts: list[str], words: int, n: int) -> list[str]:
    """The first `n` chunks of `words` words, cut from each text in turn (a chunk never spans two texts; a
    text's last piece is dropped when shorter than half a chunk). Whitespace inside a chunk is kept."""
    chunks: list[str] = []
    for text in texts:
        pieces = re.findall(r"\S+\s*", text)
        for start in range(0, len(pieces), words):
            part = pieces[start : start + words]
            if len(part) * 2 >= words:
                chunks.append("".join(part).rstrip())
            if len(chunks) == n:
                return chunks
    raise StudyError(f"the bundled texts give {len(chunks)} chunks of {words} words, fewer than the {n} asked")


def qa_text(row: dict[str, str]) -> str:
    """A KnowMem pair as its few-shot prompt writes each example (ngdiff.eval.muse.knowmem_prompt)."""
    return f"Question: {row['question']}\nAnswer: {row['answer']}\n\n"


def muse_world_data(world: WorldSpec) -> dict[str, Any]:
    """Training rows of both models, the unlearning sets, and the evaluation files in MUSE's layout."""
    muse = world.muse
    forget_chunks = word_chunks(_load(FORGET_ARTICLES), muse.chunk_words, muse.forget_chunks)
    retain_chunks = word_chunks(_load(RETAIN_TEXTS), muse.chunk_words, muse.retain_chunks)
    holdout = word_chunks(_load(HOLDOUT_TEXTS), muse.chunk_words, muse.holdout_chunks)
    forget_qa = _load("knowmem/forget_qa.json")[: muse.knowmem_items]
    retain_qa = _load("knowmem/retain2_qa.json")[: muse.knowmem_items]
    forget = [{"text": t} for t in [*forget_chunks, *map(qa_text, forget_qa)]]
    retain = [{"text": t} for t in [*retain_chunks, *map(qa_text, retain_qa)]]
    folds = [[{"text": c} for c in forget_chunks]]  # fold 1's texts; the QA pairs are no fold's VerbMem
    for name in FOLD_ARTICLES[1 : muse.folds]:
        folds.append([{"text": c} for c in word_chunks(_load(name), muse.chunk_words, muse.forget_chunks)])
    later_folds = [row for fold in folds[1:] for row in fold]
    from ngdiff.eval.muse import verbmem_row

    verbmem = [verbmem_row(chunk, muse.prompt_words) for chunk in forget_chunks[: muse.verbmem_items]]
    shots = muse.knowmem_shots
    evaluation = {
        "verbmem/forget.json": verbmem,
        "knowmem/forget_qa.json": forget_qa,
        "knowmem/forget_qa_icl.json": _load("knowmem/forget_qa_icl.json")[:shots],
        "knowmem/retain2_qa.json": retain_qa,
        "knowmem/retain2_qa_icl.json": _load("knowmem/retain2_qa_icl.json")[:shots],
        "privleak/forget.json": forget_chunks,
        "privleak/holdout.json": holdout,
    }
    return {
        "forget": forget,
        "retain": retain,
        "target_train": [*retain, *forget, *later_folds],
        "reference_train": retain,
        "evaluation": evaluation,
        "folds": folds,
    }


def evaluate_muse_model(model_dir: Path, eval_dir: Path, out: Path, reference: Path | None) -> dict[str, float]:
    """MUSE's four numbers of one model on the world's evaluation files (written to `out` as `ngdiff eval`
    writes them), PrivLeak against `reference`'s AUC when given."""
    import torch
    from transformers import AutoModelForCausalLM

    from ngdiff.eval.benchmark import BenchmarkSpec, load_reference, run_benchmark
    from ngdiff.eval.report import write_outputs
    from ngdiff.modeling import load_tokenizer

    spec = BenchmarkSpec(
        "muse", data_dir=eval_dir, max_items=0, reference=load_reference("muse", str(reference) if reference else None)
    )
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        items, metrics = run_benchmark(model, tokenizer, spec)
    write_outputs(out, "muse", items, metrics, {"model": str(model_dir), "data_dir": str(eval_dir)})
    return metrics


def build_muse_world(world: WorldSpec, folder: Path, data_cfg, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the target and the retain model, evaluate both; return the record world.json keeps."""
    from ngdiff.data import encode_task
    from ngdiff.finetune import FinetuneConfig, finetune
    from ngdiff.modeling import TinyLlamaSpec, build_tiny_model, load_tokenizer, train_tokenizer
    from ngdiff.study.world import WORLD_MODELS, _parameter_count, build_each, log, write_jsonl

    started = time.time()
    sets = muse_world_data(world)
    data_dir, eval_dir = folder / "data", folder / "eval_data"
    for name in ("forget", "retain", "target_train", "reference_train"):
        write_jsonl(data_dir / f"{name}.jsonl", sets[name])
    if world.muse.folds > 1:  # the requests of a sequence over MUSE's sustainability folds
        for k, rows in enumerate(sets["folds"], start=1):
            write_jsonl(data_dir / f"fold_{k}.jsonl", rows)
    for name, rows in sets["evaluation"].items():
        (eval_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (eval_dir / name).write_text(json.dumps(rows, indent=1))
    shape, ft = world.model, world.finetune
    spec = TinyLlamaSpec(
        shape.vocab_size, shape.hidden_size, shape.num_layers, shape.num_heads, shape.intermediate_size
    )
    # whole chunks, whatever the study's data.max_length (the runs get the longest text's length)
    text_cfg = dataclasses.replace(data_cfg, format="text", text_key="text", max_length=spec.max_position_embeddings)

    def build_base(_: str) -> None:
        texts = [r["text"] for r in sets["target_train"]]
        tokenizer = train_tokenizer(texts, shape.vocab_size, isolate_whitespace=True)
        build_tiny_model(folder / "base", [], spec, seed=ft.seed, tokenizer=tokenizer)

    build_each({"base": folder / "base"}, build_base)
    tokenizer = load_tokenizer(str(folder / "base"))

    def fine_tune(name: str) -> None:
        train = WORLD_MODELS[name]
        log.warning("world: fine-tuning the %s (%d texts, %d epochs)", name, len(sets[train]), ft.epochs)
        examples = encode_task(text_cfg, tokenizer, str(data_dir / f"{train}.jsonl"), f"world {train}")
        cfg = FinetuneConfig(
            epochs=ft.epochs, batch_size=ft.batch_size, lr=ft.lr, warmup_steps=ft.warmup_steps, seed=ft.seed
        )
        finetune(folder / "base", tokenizer, examples, folder / name, cfg, progress=progress)

    build_each({name: folder / name for name in WORLD_MODELS}, fine_tune)
    reference = folder / "reference_eval"
    reference_metrics = evaluate_muse_model(folder / "retain_model", eval_dir, reference, None)
    if not (reference_metrics.get("privleak_auc") or 0) > 0:
        raise StudyError(
            f"{folder}: the retain model's PrivLeak AUC (forget vs holdout texts) is "
            f"{reference_metrics.get('privleak_auc')}, so every run's PrivLeak, relative to it, is undefined: the "
            "world is too small or too briefly fine-tuned to tell its texts apart; raise world.finetune.epochs or "
            "world.muse's chunk counts"
        )
    target_metrics = evaluate_muse_model(folder / "target", eval_dir, folder / "target_eval", reference)
    reference_metrics["privleak"] = 0.0  # the retain model against its own AUC, by definition
    for metrics in (target_metrics, reference_metrics):
        metrics[MUSE_DISTANCE] = verbmem_distance(metrics, reference_metrics)
    tokens = [len(tokenizer(r["text"])["input_ids"]) for r in sets["target_train"]]
    overrides = [
        f"model.path={folder / 'target'}",
        f"data.forget={data_dir / 'forget.jsonl'}",
        f"data.retain={data_dir / 'retain.jsonl'}",
        "data.format=text",
        f"data.max_length={max(tokens)}",
        "eval.benchmark=muse",
        f"eval.data_dir={eval_dir}",
        f"eval.reference={reference}",
        "eval.max_items=0",
    ]
    info = {
        "forget_texts": len(sets["forget"]),
        "retain_texts": len(sets["retain"]),
        "eval_items": {name: len(rows) for name, rows in sets["evaluation"].items()},
        "training_tokens": {"max": max(tokens), "total": sum(tokens)},
        "parameters": _parameter_count(folder / "target"),
        "vocabulary": len(tokenizer),
        "build_seconds": round(time.time() - started, 1),
    }
    return {
        "overrides": overrides,
        "target_metrics": target_metrics,
        "reference_metrics": reference_metrics,
        "info": info,
    }
