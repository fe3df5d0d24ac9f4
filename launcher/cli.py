"""`ngdiff` command line: train, demo, and the subcommands other modules register."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from ngdiff import __version__
from ngdiff.config import ConfigError, load_config
from ngdiff.errors import UserError

log = logging.getLogger("ngdiff")
VERBOSE_HELP = "library INFO lines and transformers' loading/saving bars"

# name -> (add arguments, run) ; other modules (eval, slurm) register here
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def subcommand(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = (help_text, add_arguments, run)
        return run

    return register


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] key=value ...`: the first item is a file unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


# the keys a first run sets or looks at, shown with their defaults by `ngdiff train --help`
MAIN_KEYS = (
    ("model.path", "model to unlearn: a local folder or a hub name (required)"),
    ("data.forget", "what to forget: JSON/JSONL file(s) or hub set(s) (required)"),
    ("data.retain", "what to keep: same forms (required)"),
    ("data.format", "tofu (question/answer records) or text (a text field)"),
    ("method.combiner", "ngdiff, gdiff, ga, lossnorm, mgda, pcgrad, imtlg, rlw"),
    ("method.forget_objective", "nll, npo, simnpo, idk"),
    ("optim.name", "sgd or adamw"),
    ("optim.lr", "starting lr (AutoLR moves it)"),
    ("autolr.enabled", "AutoLR's fitted step size"),
    ("train.epochs", "epochs over the forget set"),
    ("train.max_steps", "steps; 0: from train.epochs"),
    ("train.forget_batch_size", "global batch of each forget set"),
    ("train.save_every", "steps between checkpoints (Ctrl-C also writes one)"),
    ("train.stop_forget_loss", "stop once the forget loss reaches it (0: off)"),
    ("parallel.backend", "single, ddp, fsdp, zero3"),
    ("output_dir", "where metrics.jsonl, checkpoints/ and final/ go"),
)
TRAIN_EXAMPLES = """examples:
  ngdiff train configs/tofu_ngdiff.yaml parallel.backend=single
  ngdiff train model.path=/models/my-llama data.format=tofu data.forget=forget.jsonl \\
      data.retain=retain.jsonl output_dir=out/run1
  ngdiff train configs/tofu_ngdiff.yaml optim.lr=0.02 train.max_steps=60 train.resume=auto"""
KEY_TABLE = 'every key and its meaning: README.md, section "The config keys" (defaults: ngdiff/config.py)'


def train_epilog() -> str:
    """`ngdiff train --help`'s epilog: the main keys with today's defaults, examples, where the rest is."""
    from ngdiff.config import ExperimentConfig

    defaults = ExperimentConfig()

    def default_of(key: str) -> str:
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        if isinstance(value, bool):
            value = str(value).lower()
        return repr(value) if value == "" else str(value)

    width = max(len(key) for key, _ in MAIN_KEYS)
    header = f"main keys, set as KEY=VALUE:\n  {'key':<{width}}  {'default':<12} meaning"
    lines = [f"  {key:<{width}}  {default_of(key):<12} {meaning}" for key, meaning in MAIN_KEYS]
    return "\n".join([header, *lines, "", TRAIN_EXAMPLES, "", KEY_TABLE])


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG] KEY=VALUE", help="YAML file, then dotted overrides")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    parser.add_argument("--verbose", action="store_true", help=f"{VERBOSE_HELP}, from every rank (logging.verbose)")


@subcommand("train", "unlearn with a YAML config and/or dotted overrides", add_train_arguments)
def run_train(args: argparse.Namespace) -> int:
    from launcher.run import train_from_config

    config_path, overrides = split_config_and_overrides(args.items)
    cfg = load_config(config_path, overrides, single_run=True)
    return train_from_config(cfg, overwrite=args.overwrite, verbose=args.verbose or cfg.logging.verbose)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs/demo", help="where the demo writes everything")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output-dir")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test of the same path (about a minute): its numbers need not fall"
    )
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


@subcommand(
    "demo", "the embedded end-to-end example on CPU: fine-tune a tiny model, unlearn, report", add_demo_arguments
)
def run_demo(args: argparse.Namespace) -> int:
    from launcher.logs import setup_logging
    from ngdiff.demo import run_demo as demo

    setup_logging(0, args.verbose)
    report = demo(args.output_dir, overwrite=args.overwrite, quick=args.quick)
    return 1 if report is None or report["verdict"] == "FAIL" else 0


def _register_optional() -> None:
    """Import the modules that add subcommands (kept optional so a broken extra never hides train)."""
    import importlib

    subcommand_modules = ("attack_cli", "eval_cli", "plan_cli", "plot_cli", "sequence_cli", "slurm", "study_cli")
    for module in (f"launcher.{name}" for name in subcommand_modules):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def build_parser() -> argparse.ArgumentParser:
    _register_optional()
    parser = argparse.ArgumentParser(prog="ngdiff", description="Distributed LLM unlearning with NGDiff + AutoLR")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"ngdiff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    epilogs = {"train": train_epilog()}
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilogs.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(sub)
        sub.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        sub.set_defaults(run=run)
    return parser


def entry() -> int:
    """The `ngdiff` command (and `python -m launcher`): `main`, then leave; a rank of a distributed run
    exits without interpreter finalization (`parallel.distributed.leave` says why)."""
    from ngdiff.host_memory import keep_freed_heap
    from parallel.distributed import leave

    keep_freed_heap()
    return leave(main())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:  # config, data and launch errors, raised before heavy work
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"ngdiff: {kind}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, a second Ctrl-C): no traceback
        print(f"ngdiff: interrupted; {interrupted_hint(args)}", file=sys.stderr)
        return 130


def interrupted_hint(args: argparse.Namespace) -> str:
    """What a Ctrl-C outside the training loop leaves: a training run resumes from its newest checkpoint."""
    if args.command not in ("train", "sequence"):
        return "nothing was completed"
    from launcher.signals import resume_hint

    return f"any checkpoint written is kept: {resume_hint()}"
