"""`ngdiff plot RUN_DIR`: one PNG of a run's metrics.jsonl (see ngdiff/plots.py)."""

from __future__ import annotations

import argparse

from launcher.cli import subcommand


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--output", help="the PNG to write (default: RUN_DIR/metrics.png)")


@subcommand(
    "plot", "draw a run's losses, gradient norms, cosine, weights, lr and evaluations into one PNG", add_plot_arguments
)
def run_plot(args: argparse.Namespace) -> int:
    from ngdiff.plots import plot_run

    path = plot_run(args.run_dir, args.output)
    print(f"plot written to {path}")
    return 0
