"""`ngdiff` command line: train, demo, and the subcommands other modules register."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG] KEY=VALUE", help="YAML file, then dotted overrides")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    parser.add_argument("--verbose", action="store_true", help=f"{VERBOSE_HELP}, from every rank (logging.verbose)")


@subcommand("train", "unlearn with a YAML config and/or dotted overrides", add_train_arguments)
def run_train(args: argparse.Namespace) -> int:
    from launcher.run import train_from_config

    config_path, overrides = split_config_and_overrides(args.items)
    cfg = load_config(config_path, overrides)
    return train_from_config(cfg, overwrite=args.overwrite, verbose=args.verbose or cfg.logging.verbose)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs/demo", help="where the demo writes everything")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output-dir")
    parser.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; targets not expected)")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


@subcommand(
    "demo", "the embedded end-to-end example on CPU: fine-tune a tiny model, unlearn, report", add_demo_arguments
)
def run_demo(args: argparse.Namespace) -> int:
    from launcher.logs import setup_logging
    from ngdiff.demo import run_demo as demo

    setup_logging(0, args.verbose)
    report = demo(args.output_dir, overwrite=args.overwrite, quick=args.quick)
    return 0 if report is not None else 1


def _register_optional() -> None:
    """Import the modules that add subcommands (kept optional so a broken extra never hides train)."""
    import importlib

    subcommand_modules = ("attack_cli", "eval_cli", "plan_cli", "plot_cli", "slurm", "study_cli")
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
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        sub.set_defaults(run=run)
    return parser


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
