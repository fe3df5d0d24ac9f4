"""Two forget sets of very different sizes: their union as ONE forget task vs TWO forget tasks.

    ngdiff demo --output-dir /tmp/demo                  # once: the fine-tuned tiny Llama (20 TOFU authors)
    python benchmarks/two_forget_sets.py --demo /tmp/demo \
        [--arms union,two,two_half,two_norm] [--seeds 1,2] [--steps 10,20,40] [--out FILE.jsonl]

The demo's model recites 20 authors x 20 pairs (`data/all.jsonl`). The splits, written beside `--out`:
small = 1 author (20 pairs), large = 4 other authors (80), union = both (100), retain = the other 15
authors (300). Every arm is the demo's unlearning (ngdiff.demo.UNLEARN_OVERRIDES: NGDiff, SGD at lr
0.05, AutoLR) with 8 retain examples and 8 forget examples per step in all, for a fixed number of steps
(no stopping rule: it watches the union's loss in one arm and the least-forgotten set's in the other):

- union: data.forget=union.jsonl, 8 per step drawn from the 100 pairs (about 1.6 small, 6.4 large);
- two: data.forget=small.jsonl,large.jsonl, 4 + 4 per step, d = u_R - u_small - u_large (unit vectors),
  whose forget part is sqrt(2 + 2 cos) long, not 1 as the union's: a stronger push, not only a fairer one;
- two_half: as two with method.task_weights=0.5,0.5,1: the forget part is the mean of the two unit
  vectors, at most 1 long;
- two_norm: as two with weights 1/sqrt(2): the forget part has the union's length 1 while the two forget
  gradients are orthogonal (their cosine is ~0.01-0.1 in the first ten steps, ~0.5 later).

The model is scored at each budget in `--steps` during one run (with a constant lr schedule and no
horizon decay, a run's first n steps are an n-step run): mean ROUGE-L recall of greedy answers and the
mean length-normalised answer loss on all 20 small pairs, all 80 large ones, and every 9th retained pair
(34), as the demo scores (`ngdiff.eval.tofu.qa_metrics`). Rows are appended to `--out` as they are
scored; the table gives mean +- half the range over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAIRS_PER_AUTHOR = 20
SMALL_AUTHORS = (19,)  # the demo's order: the last authors are forgotten, the first ones retained
LARGE_AUTHORS = (15, 16, 17, 18)
RETAIN_EVAL_EVERY = 9
HALF_SQRT2 = 0.7071  # 1/sqrt(2): |t u_small + t u_large| = 1 when the two forget gradients are orthogonal
ARMS: dict[str, tuple[tuple[str, ...], int, str]] = {
    # arm -> (forget files, forget batch per task, extra override)
    "union": (("union",), 8, ""),
    "two": (("small", "large"), 4, ""),
    "two_half": (("small", "large"), 4, "method.task_weights=0.5,0.5,1"),
    "two_norm": (("small", "large"), 4, f"method.task_weights={HALF_SQRT2},{HALF_SQRT2},1"),
}
SCORES = ("small_rougeL", "large_rougeL", "retain_rougeL", "small_loss", "large_loss", "retain_loss")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def authors(rows: list[dict], which: tuple[int, ...]) -> list[dict]:
    return [row for a in which for row in rows[a * PAIRS_PER_AUTHOR : (a + 1) * PAIRS_PER_AUTHOR]]


def write_splits(demo: Path, data_dir: Path) -> dict[str, Path]:
    """small / large / union / retain from the demo's 400 pairs, as JSONL files in `data_dir`."""
    rows = read_rows(demo / "data" / "all.jsonl")
    forgotten = set(SMALL_AUTHORS + LARGE_AUTHORS)
    kept = tuple(a for a in range(len(rows) // PAIRS_PER_AUTHOR) if a not in forgotten)
    splits = {
        "small": authors(rows, SMALL_AUTHORS),
        "large": authors(rows, LARGE_AUTHORS),
        "union": authors(rows, SMALL_AUTHORS + LARGE_AUTHORS),
        "retain": authors(rows, kept),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, split in splits.items():
        paths[name] = data_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in split))
    return paths


def score(model, tokenizer, paths: dict[str, Path], new_tokens: int) -> dict[str, float]:
    from ngdiff.eval.tofu import qa_metrics

    sets = {
        "small": read_rows(paths["small"]),
        "large": read_rows(paths["large"]),
        "retain": read_rows(paths["retain"])[::RETAIN_EVAL_EVERY],
    }
    out = {}
    for name, rows in sets.items():
        metrics = qa_metrics(model, tokenizer, rows, max_new_tokens=new_tokens)
        out[f"{name}_rougeL"] = metrics["rougeL_recall"]
        out[f"{name}_loss"] = metrics["answer_loss"]
    return out


def overrides(demo: Path, paths: dict[str, Path], arm: str, seed: int, steps: int, lr: float, out_dir: Path):
    from ngdiff.demo import UNLEARN_OVERRIDES

    files, batch, extra = ARMS[arm]
    return [
        *UNLEARN_OVERRIDES,
        f"model.path={demo / 'finetuned'}",
        f"data.forget={','.join(str(paths[f]) for f in files)}",
        f"data.retain={paths['retain']}",
        f"optim.lr={lr}",
        f"train.forget_batch_size={batch}",
        f"train.max_steps={steps}",
        f"train.seed={seed}",
        "train.stop_forget_loss=0",
        "logging.progress=false",
        f"output_dir={out_dir}",
        *([extra] if extra else []),
    ]


def run_arm(args: argparse.Namespace, paths: dict[str, Path], arm: str, seed: int) -> list[dict]:
    """One run to the largest budget, scored at every budget; returns (and appends) one row per budget."""
    from ngdiff.config import load_config
    from ngdiff.pipeline import run_training
    from parallel.base import DistContext

    budgets = sorted(args.steps)
    out_dir = args.out.parent / "runs" / f"{arm}_seed{seed}_lr{args.lr:g}_{time.strftime('%H%M%S')}"
    cfg_overrides = overrides(args.demo, paths, arm, seed, budgets[-1], args.lr, out_dir)
    cfg_overrides.append(f"eval.every={math.gcd(*budgets)}")
    cfg = load_config(None, cfg_overrides)
    rows: list[dict] = []
    last = LastMetrics()
    trainer_box: list = []
    started = time.time()

    def factory(backend, tokenizer):
        def evaluate(step: int, final: bool = True) -> dict[str, float]:
            if step not in budgets:
                return {}
            model = backend.model
            model.eval()
            scores = score(model, tokenizer, paths, args.new_tokens)
            model.train()
            train = {f"train_{k}": v for k, v in last.metrics.items() if k.startswith("loss_")}
            row = {"arm": arm, "seed": seed, "lr": args.lr, "steps": step, "lr_now": trainer_box[0].lr}
            row.update({**scores, **train, "seconds": round(time.time() - started, 1)})
            rows.append(row)
            append(args.out, row)
            return {f"eval/{k}": v for k, v in scores.items()}

        return evaluate

    def attach(trainer) -> None:
        trainer_box.append(trainer)
        trainer.sinks.append(last)

    run_training(cfg, DistContext(), evaluate_factory=factory, on_trainer=attach)
    return rows


class LastMetrics:
    """A metrics sink that keeps the last step's metrics: the training losses at a scored budget."""

    def __init__(self) -> None:
        self.metrics: dict = {}

    def log(self, metrics: dict, step: int) -> None:
        if "loss_forget" in metrics:
            self.metrics = dict(metrics)

    def finish(self) -> None:
        pass


def append(path: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def mean_spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def table(rows: list[dict]) -> str:
    """One line per (lr, steps, arm): mean ± half the range over seeds of each score."""
    header = "| lr | steps | arm | seeds | small ROUGE-L | large ROUGE-L | retain ROUGE-L "
    header += "| small loss | large loss | retain loss |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    groups: dict[tuple, list[dict]] = {}
    order = {arm: i for i, arm in enumerate(("before", *ARMS))}
    for row in rows:
        groups.setdefault((row["lr"], row["steps"], order.get(row["arm"], 99), row["arm"]), []).append(row)
    for (lr, steps, _, arm), group in sorted(groups.items()):
        cells = " | ".join(mean_spread([r[m] for r in group]) for m in SCORES)
        lines.append(f"| {lr:g} | {steps} | {arm} | {len(group)} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="output folder of `ngdiff demo`")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--steps", default="10,20,40", help="budgets scored during each run")
    parser.add_argument("--lr", type=float, default=0.05, help="start lr (AutoLR adapts it; the demo's 0.05)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy answer length scored (the demo's)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/two_forget_sets/runs.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    args.steps = [int(s) for s in args.steps.split(",")]
    if not args.table_only:
        unknown = set(args.arms.split(",")) - set(ARMS)
        if unknown:
            parser.error(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        paths = write_splits(args.demo, args.out.parent / "data")
        done = {(r["arm"], r["seed"], r["lr"]) for r in read_rows(args.out)} if args.out.exists() else set()
        if ("before", 0, 0.0) not in done:
            append(args.out, before_row(args, paths))
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in args.arms.split(","):
                if (arm, seed, args.lr) not in done:  # a re-run resumes an interrupted study
                    run_arm(args, paths, arm, seed)
    print(table(read_rows(args.out)))


def before_row(args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    """The fine-tuned model's scores: what every arm starts from."""
    from transformers import AutoModelForCausalLM

    from ngdiff.modeling import load_tokenizer

    model_dir = args.demo / "finetuned"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    scores = score(model, load_tokenizer(str(model_dir)), paths, args.new_tokens)
    return {"arm": "before", "seed": 0, "lr": 0.0, "steps": 0, **scores}


if __name__ == "__main__":
    main()
