"""`ngdiff eval`: TOFU or MUSE-News metrics of a model folder, on one process or under torchrun, and
`ngdiff eval forget-quality` from two existing evaluation outputs (ours or legacy TOFU logs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from launcher.cli import VERBOSE_HELP, subcommand
from ngdiff.errors import UserError

log = logging.getLogger("ngdiff.eval")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "forget-quality"],
        help="run (default): evaluate --model; forget-quality: KS test of --unlearned against --reference",
    )
    parser.add_argument("--benchmark", choices=["tofu", "muse"], help="which benchmark to run")
    parser.add_argument("--model", help="Hugging Face model folder (e.g. a run's final/)")
    parser.add_argument(
        "--reference",
        help="TOFU: a retain-only model's evaluation output, legacy eval_log_forget.json or open-unlearning "
        "TOFU_EVAL.json (forget quality, PrivLeak); "
        "MUSE: a retrained model's AUC or evaluation output (PrivLeak)",
    )
    parser.add_argument("--split", default="forget01", help="TOFU forget split: forget01, forget05 or forget10")
    parser.add_argument(
        "--forget",
        help="your forget split (question/answer JSON or JSONL, e.g. a demo's data/forget.jsonl) instead of --split; "
        "paraphrased/perturbed answers are read from FILE_perturbed.jsonl beside it when present",
    )
    parser.add_argument("--retain", help="your retain split, like --forget")
    parser.add_argument(
        "--holdout",
        help="question/answer rows the model never saw, for membership inference of the forget set "
        "(default for a TOFU split: its matching holdout split, forget01 -> holdout01)",
    )
    parser.add_argument(
        "--reference-model",
        help="TOFU: a model never trained on the forget set (e.g. the retain model): the Reference attack, "
        "and PrivLeak's reference AUC when --reference holds none",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object of the metrics on stdout")
    parser.add_argument(
        "--format",
        choices=["ngdiff", "open-unlearning"],
        default="ngdiff",
        help="open-unlearning: also write TOFU_EVAL.json and TOFU_SUMMARY.json in its format",
    )
    parser.add_argument("--output", help="folder for items.json, aggregate.json, summary.md (default: MODEL/eval_*)")
    parser.add_argument("--data-dir", help="folder with the benchmark files (default: the bundled copies)")
    parser.add_argument(
        "--max-items", type=int, default=300, help="first N items of each set (default: TOFU's ds_size 300; 0: all)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation / scoring batch")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="TOFU generation length (MUSE fixes its own)")
    parser.add_argument(
        "--prompt-template",
        default="",
        help="TOFU prompt format the model was trained with: chat, llama2, phi, a string with {question}, "
        "or empty (chat template if the tokenizer has one, else Question/Answer); as data.prompt_template",
    )
    parser.add_argument("--backend", default="", help="shard the model with a parallel backend (fsdp, zero3)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--unlearned", help="forget-quality: the unlearned model's evaluation output")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


@subcommand("eval", "TOFU / MUSE-News metrics of a model, or forget quality from two outputs", add_eval_arguments)
def run_eval(args: argparse.Namespace) -> int:
    if args.action == "forget-quality":
        return forget_quality_command(args)
    custom = bool(args.forget or args.retain)
    if custom and args.benchmark == "muse":
        raise UserError("--forget / --retain are question/answer splits scored the TOFU way; drop --benchmark muse")
    if custom:
        args.benchmark = "tofu"
    if not args.benchmark:
        raise UserError(
            "ngdiff eval needs --benchmark tofu, --benchmark muse, or your own splits: "
            "ngdiff eval --model DIR --forget FORGET.jsonl --retain RETAIN.jsonl"
        )
    if not args.model:
        raise UserError("ngdiff eval needs --model DIR")
    if args.benchmark == "muse" and (args.holdout or args.reference_model or args.format != "ngdiff"):
        raise UserError("--holdout, --reference-model and --format open-unlearning are for TOFU-style splits")
    model_dir = Path(args.model)
    check_model_folder(model_dir, "--model", args.trust_remote_code)
    if args.reference_model:
        check_model_folder(Path(args.reference_model), "--reference-model", args.trust_remote_code)
    from ngdiff.data.tokenize import check_prompt_template

    try:
        check_prompt_template(args.prompt_template)
    except ValueError as err:
        raise UserError(str(err).replace("data.prompt_template", "--prompt-template")) from None
    for name in ("max_items", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value < 0 or (value == 0 and name != "max_items"):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return evaluate_command(args, model_dir)


def check_model_folder(model_dir: Path, flag: str, trust_remote_code: bool) -> None:
    """A Hugging Face model (or PEFT adapter) folder with its tokenizer, else one clear error naming `flag`."""
    from ngdiff.lora import is_adapter_folder
    from ngdiff.modeling import check_tokenizer_files

    if not (model_dir / "config.json").is_file() and not is_adapter_folder(model_dir):
        raise UserError(f"{flag} {model_dir}: not a model folder (no config.json) nor a PEFT adapter folder")
    check_tokenizer_files(model_dir, flag, trust_remote_code)


def forget_quality_command(args: argparse.Namespace) -> int:
    from ngdiff.eval.tofu_metrics import forget_quality, load_forget_truth_ratios

    if not args.unlearned or not args.reference:
        raise UserError("ngdiff eval forget-quality needs --unlearned A and --reference B")
    unlearned = load_forget_truth_ratios(args.unlearned)
    reference = load_forget_truth_ratios(args.reference)
    pvalue, statistic = forget_quality(unlearned, reference)
    result = {
        "forget_quality": pvalue,
        "ks_statistic": statistic,
        "n_unlearned": len(unlearned),
        "n_reference": len(reference),
    }
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "forget_quality.json").write_text(json.dumps(result, indent=1))
    return 0


def evaluate_command(args: argparse.Namespace, model_dir: Path) -> int:
    import torch

    from launcher.logs import setup_logging
    from ngdiff.eval.benchmark import BenchmarkSpec, load_reference, run_benchmark
    from ngdiff.eval.report import write_outputs
    from ngdiff.eval.sharding import EvalDist
    from parallel.distributed import init_distributed, shutdown_distributed

    # cheap checks first: split, data files, reference
    custom = []
    if args.benchmark == "tofu":
        from ngdiff.eval.tofu import custom_sets, load_rows, read_custom_rows, tofu_sets

        custom = custom_sets(args.forget, args.retain)
        for tofu_set, path in custom:
            read_custom_rows(tofu_set, path, 1)
        for tofu_set in [] if custom else tofu_sets(args.split):
            load_rows(tofu_set, args.data_dir, 1)
        if args.holdout:
            from ngdiff.eval.tofu import load_holdout

            load_holdout(args.holdout, 1)
        if not custom and (hint := own_splits_hint(model_dir, args.split)):
            log.warning(hint)
    spec = BenchmarkSpec(
        args.benchmark,
        split=args.split,
        data_dir=args.data_dir,
        max_items=args.max_items,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt_template=args.prompt_template,
        reference=load_reference(args.benchmark, args.reference),
        custom=custom,
        holdout=args.holdout or None,
        reference_auc=privleak_reference(args),
    )

    ctx = init_distributed()
    setup_logging(ctx.rank, args.verbose)
    output = Path(args.output) if args.output else model_dir / f"eval_{args.benchmark}"
    try:
        if ctx.is_main:
            what = ", ".join(f"{s.name} from {p}" for s, p in custom) if custom else f"the {args.split} split"
            log.info("evaluating %s on %s", model_dir, what if args.benchmark == "tofu" else "MUSE-News")
        model, sharded = load_model(args, model_dir, ctx)
        from ngdiff.modeling import load_tokenizer

        tokenizer = load_tokenizer(str(model_dir), args.trust_remote_code)
        ed = EvalDist(ctx.rank, ctx.world_size, sharded)
        reference_model = load_model(args, Path(args.reference_model), ctx)[0] if args.reference_model else None
        if args.benchmark == "tofu":
            spec = dataclasses.replace(spec, gradnorm=not sharded)
        start = time.perf_counter()
        items, metrics = run_benchmark(
            model, tokenizer, spec, ed=ed, progress=ctx.is_main and not args.json, reference_model=reference_model
        )
        seconds = time.perf_counter() - start
        if ctx.is_main:
            meta = {
                "model": str(model_dir),
                "split": split_description(args, custom),
                "reference": args.reference or "none",
                "max_items": args.max_items,
                "max_new_tokens": args.max_new_tokens if args.benchmark == "tofu" else "128 / 32",
                "prompt_template": args.prompt_template,
                "ranks": ctx.world_size,
                "seconds": round(seconds, 2),
            }
            if args.benchmark == "tofu":
                from ngdiff.eval.tofu import missing_metrics

                meta["not computed"] = missing_metrics(items, metrics)
                meta["holdout"] = args.holdout or ("TOFU's matching holdout split" if not custom else "none")
                meta["reference model"] = args.reference_model or "none"
            write_outputs(output, args.benchmark, items, metrics, meta)
            if args.format == "open-unlearning":
                from ngdiff.eval.open_unlearning_format import write_open_unlearning

                write_open_unlearning(output, items, metrics)
            if args.json:
                print(json.dumps(json_result(metrics, meta.get("not computed") or {})))
            else:
                print((output / "summary.md").read_text())
                print(f"per-item records, aggregate metrics and this summary: {output}/{{items,aggregate,summary}}")
        if ctx.distributed:
            torch.distributed.barrier()
        return 0
    finally:
        shutdown_distributed()


JSON_KEYS = (  # always present in `--json` (null when not computed: `not_computed` says why)
    "mia_loss_auc",
    "mia_zlib_auc",
    "mia_mink_auc",
    "mia_minkpp_auc",
    "mia_gradnorm_auc",
    "mia_reference_auc",
    "privleak",
    "extraction_strength",
    "exact_memorization",
    "forget_para_rougeL_recall",
)


def json_result(metrics: dict[str, float], not_computed: dict[str, str]) -> dict[str, Any]:
    """`--json`'s object: every metric, the headline keys (null when absent) and why any is absent."""
    from ngdiff.eval.report import _clean

    return _clean({**dict.fromkeys(JSON_KEYS), **metrics, "not_computed": not_computed})


def privleak_reference(args: argparse.Namespace) -> float | None:
    if args.benchmark != "tofu":
        return None
    from ngdiff.eval.open_unlearning_format import load_privleak_reference

    return load_privleak_reference(args.reference)


def own_splits_hint(model_dir: Path, split: str) -> str | None:
    """When `model_dir` is an ngdiff run's `final/` trained on local files, TOFU's `split` is most likely not
    what it unlearned: say so, and give the command that scores what it did."""
    import yaml

    saved = model_dir.parent / "config.yaml"
    if model_dir.name != "final" or not saved.is_file():
        return None
    data = (yaml.safe_load(saved.read_text()) or {}).get("data", {})
    forget, retain = data.get("forget", ""), data.get("retain", "")
    if not (forget and Path(forget).is_file()):
        return None
    own = f"--forget {forget}" + (f" --retain {retain}" if retain and Path(retain).is_file() else "")
    return (
        f"{model_dir} was unlearned on {forget}; --split {split} scores TOFU's {split} authors instead. "
        f"To score what it unlearned: ngdiff eval --model {model_dir} {own}"
    )


def split_description(args: argparse.Namespace, custom) -> str:
    if custom:
        return ", ".join(f"{tofu_set.name}: {path}" for tofu_set, path in custom)
    return args.split if args.benchmark == "tofu" else "news"


def load_model(args: argparse.Namespace, model_dir: Path, ctx) -> tuple[Any, bool]:
    """The whole model on every rank, or sharded by `--backend` (its frozen-model path); and whether its
    parameters are sharded (then generation must keep every rank stepping together)."""
    from ngdiff.lora import AdapterSource, is_adapter_folder
    from ngdiff.modeling import model_factory

    if is_adapter_folder(model_dir):  # a LoRA run's export.lora=adapter: merged onto its base when loaded
        build = AdapterSource(str(model_dir), args.trust_remote_code)
    else:
        build = model_factory(str(model_dir), args.trust_remote_code)
    if not args.backend:
        return build().to(ctx.device).eval(), False
    from ngdiff.config import OptimConfig, ParallelConfig
    from parallel import build_backend

    backend = build_backend(args.backend, ctx, ParallelConfig(backend=args.backend), OptimConfig(), "fp32")
    return backend.prepare_frozen(build), backend.shards_parameters
