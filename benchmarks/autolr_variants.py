"""AutoLR variants over an lr grid on the demo model: how far the end point depends on the start lr.

    ngdiff demo --output-dir /tmp/autolr/demo          # once: the fine-tuned tiny Llama and its splits
    python benchmarks/autolr_variants.py --demo /tmp/autolr/demo --optim adamw \
        [--variants off,today,combined_step] [--lrs 5e-5,2.3e-4,1.1e-3,5e-3] [--steps 24] [--out FILE.jsonl]

Each (variant, lr) is one short NGDiff run (8 forget + 8 retain per step, max length 128) in this
process. The end point is scored on the final model: the mean length-normalised answer loss and the
ROUGE-L recall of greedy answers (32 new tokens) on all 40 forget pairs and on every 9th retained pair
(40), as the demo does (`ngdiff.eval.tofu.qa_metrics`). The spread of a variant is max - min of each
end-point metric over the lr grid; the table also gives the mean acceptance rate and the final lrs.
Rows are appended to `--out` as they finish, so an interrupted study keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# variant name -> AutoLR overrides ("off" runs without AutoLR)
VARIANTS: dict[str, list[str]] = {
    "off": ["autolr.enabled=false"],
    # the reconstruction before this study: retain loss on a fresh batch, momentum 0.9, clip 2x, keep on reject
    "today": [
        "autolr.probe_loss=retain",
        "autolr.probe_batch=fresh",
        "autolr.momentum=0.9",
        "autolr.max_change=2",
        "autolr.on_reject=keep",
    ],
    "retain_fresh_m0_halve": [
        "autolr.probe_loss=retain",
        "autolr.probe_batch=fresh",
        "autolr.momentum=0",
        "autolr.max_change=2",
        "autolr.on_reject=halve",
    ],
    "retain_step_m0_halve": [
        "autolr.probe_loss=retain",
        "autolr.probe_batch=step",
        "autolr.momentum=0",
        "autolr.max_change=2",
        "autolr.on_reject=halve",
    ],
    "retain_step_m0_halve_c4": [
        "autolr.probe_loss=retain",
        "autolr.probe_batch=step",
        "autolr.momentum=0",
        "autolr.max_change=4",
        "autolr.on_reject=halve",
    ],
    "retain_step_m0_halve_c10": [
        "autolr.probe_loss=retain",
        "autolr.probe_batch=step",
        "autolr.momentum=0",
        "autolr.max_change=10",
        "autolr.on_reject=halve",
    ],
    "retain_step_m0_halve_every2": [
        "autolr.probe_loss=retain",
        "autolr.probe_batch=step",
        "autolr.momentum=0",
        "autolr.max_change=2",
        "autolr.on_reject=halve",
        "autolr.every=2",
    ],
    "combined_step_m09": [
        "autolr.probe_loss=combined",
        "autolr.probe_batch=step",
        "autolr.momentum=0.9",
        "autolr.max_change=2",
        "autolr.on_reject=keep",
    ],
    "combined_step_m0_keep": [
        "autolr.probe_loss=combined",
        "autolr.probe_batch=step",
        "autolr.momentum=0",
        "autolr.max_change=2",
        "autolr.on_reject=keep",
    ],
    "combined_step_m0_halve": [
        "autolr.probe_loss=combined",
        "autolr.probe_batch=step",
        "autolr.momentum=0",
        "autolr.max_change=2",
        "autolr.on_reject=halve",
    ],
    "combined_step_m0_halve_c4": [
        "autolr.probe_loss=combined",
        "autolr.probe_batch=step",
        "autolr.momentum=0",
        "autolr.max_change=4",
        "autolr.on_reject=halve",
    ],
    "combined_step_m0_halve_every2": [
        "autolr.probe_loss=combined",
        "autolr.probe_batch=step",
        "autolr.momentum=0",
        "autolr.max_change=2",
        "autolr.on_reject=halve",
        "autolr.every=2",
    ],
}
DEFAULT_LRS = {"adamw": "5e-5,2.3e-4,1.1e-3,5e-3", "sgd": "0.01,0.046,0.22,1.0"}
METRICS = ("forget_loss", "retain_loss", "forget_rougeL", "retain_rougeL")


def run_one(demo: Path, optim: str, lr: float, variant: str, steps: int, out_dir: Path) -> dict:
    from ngdiff.config import load_config
    from ngdiff.eval.tofu import qa_metrics
    from ngdiff.pipeline import run_training
    from parallel.base import DistContext

    overrides = [
        f"model.path={demo / 'finetuned'}",
        f"data.forget={demo / 'data' / 'forget.jsonl'}",
        f"data.retain={demo / 'data' / 'retain.jsonl'}",
        "data.max_length=128",
        "method.combiner=ngdiff",
        f"optim.name={optim}",
        f"optim.lr={lr}",
        "autolr.enabled=true",
        "autolr.every=4",
        f"train.max_steps={steps}",
        "train.forget_batch_size=8",
        "train.retain_batch_size=8",
        "logging.progress=false",
        f"output_dir={out_dir}",
        *VARIANTS[variant],
    ]
    started = time.time()
    outcome = run_training(load_config(None, overrides), DistContext())
    model = outcome.trainer.backend.model.eval()
    tokenizer = outcome.trainer.tokenizer
    rows = [json.loads(line) for line in (demo / "data" / "forget.jsonl").read_text().splitlines()]
    retain = [json.loads(line) for line in (demo / "data" / "retain.jsonl").read_text().splitlines()][::9]
    forget_scores = qa_metrics(model, tokenizer, rows, max_new_tokens=32)
    retain_scores = qa_metrics(model, tokenizer, retain, max_new_tokens=32)
    records = [r.autolr for r in outcome.results if r.autolr is not None]
    return {
        "optim": optim,
        "variant": variant,
        "lr": lr,
        "final_lr": outcome.trainer.lr,
        "acceptance_rate": records[-1].acceptance_rate if records else None,
        "fits_with_B_le_0": sum(r.B <= 0 for r in records),  # the step raised the probed loss
        "fits_with_A_le_0": sum(r.A <= 0 for r in records),  # no minimum along the step
        "forget_loss": forget_scores["answer_loss"],
        "retain_loss": retain_scores["answer_loss"],
        "forget_rougeL": forget_scores["rougeL_recall"],
        "retain_rougeL": retain_scores["rougeL_recall"],
        "seconds": round(time.time() - started, 1),
    }


def table(rows: list[dict]) -> str:
    """One line per (optimizer, variant): spreads over the lr grid, acceptance, final lrs."""
    lines = [
        "| optim | variant | spread forget loss | spread retain loss | spread forget ROUGE-L | spread retain ROUGE-L "
        "| acceptance | final lr per start lr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["optim"], row["variant"]), []).append(row)
    for (optim, variant), group in groups.items():
        group.sort(key=lambda r: r["lr"])
        spreads = [max(r[m] for r in group) - min(r[m] for r in group) for m in METRICS]
        rates = [r["acceptance_rate"] for r in group if r["acceptance_rate"] is not None]
        acceptance = f"{sum(rates) / len(rates):.2f}" if rates else "-"
        lrs = ", ".join(f"{r['lr']:.2g}->{r['final_lr']:.2g}" for r in group)
        cells = " | ".join(f"{s:.3f}" for s in spreads)
        lines.append(f"| {optim} | {variant} ({len(group)} lrs) | {cells} | {acceptance} | {lrs} |")
    return "\n".join(lines)


def run_table(rows: list[dict]) -> str:
    """Every run's end point: loss and ROUGE-L recall on the forget pairs (F) and the retained ones (R)."""
    lines = ["| optim | variant | start lr | final lr | accepted | F loss | R loss | F ROUGE-L | R ROUGE-L |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["optim"], r["variant"], r["lr"])):
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        lines.append(
            f"| {r['optim']} | {r['variant']} | {r['lr']:.2g} | {r['final_lr']:.2g} | {rate} | {r['forget_loss']:.3f} "
            f"| {r['retain_loss']:.3f} | {r['forget_rougeL']:.2f} | {r['retain_rougeL']:.2f} |"
        )
    return "\n".join(lines)


def run_dir(args: argparse.Namespace, variant: str, lr: float) -> Path:
    return args.out.parent / "runs" / f"{args.optim}_{variant}_{lr:g}_{time.strftime('%H%M%S')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="output folder of `ngdiff demo`")
    parser.add_argument("--optim", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lrs", default="", help="comma-separated start lrs (default: 2 decades for --optim)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("/tmp/autolr/variants.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--runs", action="store_true", help="also print every run's end point")
    args = parser.parse_args()
    if not args.table_only:
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
        lrs = [float(x) for x in (args.lrs or DEFAULT_LRS[args.optim]).split(",")]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for variant in args.variants.split(","):
            for lr in lrs:
                row = run_one(args.demo, args.optim, lr, variant, args.steps, run_dir(args, variant, lr))
                print(json.dumps(row), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(table(rows))
    if args.runs:
        print()
        print(run_table(rows))


if __name__ == "__main__":
    main()
