"""`ngdiff attack MODEL --forget F [--retain-model R]`: relearning, quantization and format-shift attacks on
the forget set, on one process or under torchrun (items sharded as in `ngdiff eval`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from launcher.cli import VERBOSE_HELP, subcommand
from ngdiff.errors import UserError

log = logging.getLogger("ngdiff.attack")


def add_attack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face model folder to attack (e.g. a run's final/)")
    parser.add_argument(
        "--forget", required=True, help="TOFU split (forget01, forget05, forget10) or a question/answer JSON(L) file"
    )
    parser.add_argument(
        "--retain-model", help="a model never trained on the forget set: the same attacks, as yardstick"
    )
    parser.add_argument(
        "--attacks", default="shift,quantize,relearn", help="comma-separated subset of: shift, quantize, relearn"
    )
    parser.add_argument("--steps", type=int, default=5, help="relearning steps (default 5)")
    parser.add_argument("--lr", type=float, default=1e-5, help="relearning AdamW learning rate (default 1e-5)")
    parser.add_argument("--relearn-batch-size", type=int, default=4, help="training rows per relearning step")
    parser.add_argument("--max-items", type=int, default=300, help="first N forget rows (default 300; 0: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation / scoring batch")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="generation length")
    parser.add_argument("--prompt-template", default="", help="the prompt format the model was trained with")
    parser.add_argument("--output", help="folder for attack.json and attack.png (default: MODEL/attack)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def forget_rows(forget: str, max_items: int) -> list[dict]:
    from ngdiff.eval.tofu import FORGET_SPLITS, custom_sets, load_rows, read_custom_rows, tofu_sets

    if forget in FORGET_SPLITS:
        return load_rows(tofu_sets(forget)[0], None, max_items)
    (tofu_set, path), *_ = custom_sets(forget, None)
    return read_custom_rows(tofu_set, path, max_items)


@subcommand("attack", "relearning, quantization and format-shift attacks on the forget set", add_attack_arguments)
def run_attack(args: argparse.Namespace) -> int:
    import torch

    from launcher.eval_cli import check_model_folder
    from launcher.logs import setup_logging
    from ngdiff.attacks.relearn import RelearnConfig
    from ngdiff.attacks.run import ATTACKS, attack_one, write_report
    from ngdiff.attacks.scoring import Scoring
    from ngdiff.data.tokenize import check_prompt_template
    from ngdiff.eval.sharding import EvalDist
    from ngdiff.modeling import load_tokenizer, model_factory
    from parallel.distributed import init_distributed, shutdown_distributed

    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not attacks or any(a not in ATTACKS for a in attacks):
        raise UserError(f"--attacks {args.attacks!r}: choose from {', '.join(ATTACKS)}")
    for name in ("steps", "relearn_batch_size", "batch_size", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    try:
        check_prompt_template(args.prompt_template)
    except ValueError as err:
        raise UserError(str(err).replace("data.prompt_template", "--prompt-template")) from None
    models = {"model": Path(args.model)}
    if args.retain_model:
        models["retain_model"] = Path(args.retain_model)
    for key, folder in models.items():
        check_model_folder(folder, "--retain-model" if key == "retain_model" else "MODEL", args.trust_remote_code)
    rows = forget_rows(args.forget, args.max_items)
    if "relearn" in attacks and len(rows) < 2:
        raise UserError(f"--forget {args.forget}: relearning needs at least 2 rows, got {len(rows)}")
    output = Path(args.output) if args.output else models["model"] / "attack"

    ctx = init_distributed()
    setup_logging(ctx.rank, args.verbose)
    try:
        ed = EvalDist(ctx.rank, ctx.world_size, False)
        how = Scoring(args.max_new_tokens, args.batch_size, args.prompt_template, ed)
        cfg = RelearnConfig(args.steps, args.lr, args.relearn_batch_size)
        results = {}
        for key, folder in models.items():
            if ctx.is_main:
                log.info("attacking %s (%s) on %d forget rows", folder, key.replace("_", " "), len(rows))
            torch.manual_seed(0)
            model = model_factory(str(folder), args.trust_remote_code)().to(ctx.device).eval()
            tokenizer = load_tokenizer(str(folder), args.trust_remote_code)
            results[key] = attack_one(model, tokenizer, str(folder), rows, attacks, cfg, how, output / key)
            del model
        if ctx.is_main:
            report = {
                "model": str(models["model"]),
                "retain_model": args.retain_model or None,
                "forget": args.forget,
                "items": len(rows),
                "settings": {
                    "attacks": attacks,
                    "steps": args.steps,
                    "lr": args.lr,
                    "relearn_batch_size": args.relearn_batch_size,
                    "max_new_tokens": args.max_new_tokens,
                    "prompt_template": args.prompt_template,
                    "ranks": ctx.world_size,
                },
                "results": results,
            }
            write_report(output, report)
            print(f"attack results: {output}/attack.json, plot: {output}/attack.png")
        if ctx.distributed:
            torch.distributed.barrier()
        return 0
    finally:
        shutdown_distributed()
