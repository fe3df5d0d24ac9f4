"""chain vs replay on a small CPU world: two one-author requests, every set scored by `ngdiff sequence`.

    python benchmarks/sequence_modes.py --out /tmp/seqmodes [--modes chain,replay] [--seeds 1,2] [--steps 10]

The world is the study's CPU world (ngdiff/study/world.py, built once in OUT/world and reused): a tiny
Llama (64 hidden, 2 layers) fine-tuned 60 epochs on TOFU's forget01 authors (2 x 20 pairs), 2 retain
authors and 8 real-authors / world-facts items. The requests are forget01's two authors, one each, in file
order; the retain set is the world's. Each (mode, seed) is one `ngdiff sequence` with NGDiff + AutoLR under
SGD at lr 0.1 (the study's ngdiff+autolr arm), 8 forget + 8 retain pairs per step, `--steps` steps per
request, every cell on all pairs of its set with greedy answers of 48 tokens (the world's length). The
table (stdout and OUT/table.md) is mean +- half the range over seeds of the scores after the last request.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORLD = {
    "kind": "cpu",
    "forget_split": "forget01",
    "retain_authors": 2,
    "knowledge": ["real_authors", "world_facts"],
    "knowledge_items": 8,
    "max_new_tokens": 48,
    "model": {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 192},
    "finetune": {"epochs": 60, "lr": 0.005, "batch_size": 16, "warmup_steps": 10},
    "eval_items": {"forget": 8, "retain": 8, "real_authors": 8, "world_facts": 8},
}
UNLEARN = ["method.combiner=ngdiff", "optim.name=sgd", "optim.lr=0.1", "autolr.enabled=true",
           "train.forget_batch_size=8", "train.retain_batch_size=8", "data.max_length=128"]  # fmt: skip
PAIRS_PER_AUTHOR = 20


def build_world(out: Path) -> dict[str, Path]:
    """The world (study code), then its forget split cut into one set per author, each with TOFU's
    paraphrased / perturbed answers beside it (truth ratio)."""
    from ngdiff import TOFU_DIR
    from ngdiff.config import load_config
    from ngdiff.data import load_records
    from ngdiff.demo import write_rows
    from ngdiff.study.spec import parse_study
    from ngdiff.study.world import load_or_build, placeholder_overrides

    spec = parse_study(
        {
            "name": "sequence",
            "world": WORLD,
            "lrs": [0.1],
            "eval_every": 5,
            "methods": {"ngdiff": ["method.combiner=ngdiff"]},
        }
    )
    data_cfg = load_config(None, placeholder_overrides(spec), check_sources=False).data
    world = load_or_build(spec, out, data_cfg)
    keys = dict(item.split("=", 1) for item in world.overrides)
    rows = load_records(keys["data.forget"], ("question", "answer"), "world forget")
    companions = {r["question"]: r for r in load_records(str(TOFU_DIR / "forget01_perturbed.jsonl"), (), "TOFU")}
    paths = {"model": Path(keys["model.path"]), "retain": Path(keys["data.retain"])}
    for k in range(len(rows) // PAIRS_PER_AUTHOR):
        part = rows[k * PAIRS_PER_AUTHOR : (k + 1) * PAIRS_PER_AUTHOR]
        paths[f"set{k + 1}"] = write_rows(out / f"author{k + 1}.jsonl", part)
        write_rows(out / f"author{k + 1}_perturbed.jsonl", [companions[r["question"]] for r in part])
    return paths


def run(paths: dict[str, Path], out: Path, mode: str, seed: int, steps: int) -> dict:
    from launcher.cli import main

    folder = out / f"{mode}_seed{seed}"
    sets = ",".join(str(p) for name, p in paths.items() if name.startswith("set"))
    overrides = [*UNLEARN, f"train.max_steps={steps}", f"train.seed={seed}", "train.save_every=0"]
    overrides += [f"model.path={paths['model']}", f"data.forget={sets}", f"data.retain={paths['retain']}"]
    overrides += ["eval.max_items=0", "eval.max_new_tokens=48", "logging.progress=false"]
    overrides += [f"sequence.mode={mode}", f"output_dir={folder}", "train.resume=auto"]
    if main(["sequence", *overrides]) != 0:
        raise SystemExit(f"{folder}: ngdiff sequence failed")
    return json.loads((folder / "sequence.json").read_text())


def spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


METRICS = (("forget_rougeL_recall", "ROUGE-L"), ("forget_answer_loss", "loss"), ("forget_truth_ratio", "truth ratio"))


def table(records: dict[tuple[str, int], dict]) -> str:
    first = next(iter(records.values()))
    t = len(first["requests"])
    head = [f"set {j + 1} {label}" for name, label in METRICS for j in range(t)]
    lines = [f"| mode | seeds | after | {' | '.join(head)} | retain ROUGE-L | retain loss |"]
    lines.append("|" + "---|" * (len(head) + 5))
    before = [f"{first['before']['forget'][name][j]:.3f}" for name, _ in METRICS for j in range(t)]
    utility = first["before"]["utility"]
    lines.append(f"| before | - | - | {' | '.join(before)} | {utility['retain_rougeL_recall']:.3f} | "
                 f"{utility['retain_answer_loss']:.3f} |")  # fmt: skip
    for mode in dict.fromkeys(m for m, _ in records):
        runs = [r for (m, _), r in records.items() if m == mode]
        for i in range(t):
            cells = [spread([r["matrix"][name][i][j] for r in runs]) for name, _ in METRICS for j in range(t)]
            keep = [spread([r["utility"][i][k] for r in runs]) for k in ("retain_rougeL_recall", "retain_answer_loss")]
            lines.append(f"| {mode} | {len(runs)} | request {i + 1} | {' | '.join(cells)} | {' | '.join(keep)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default="chain,replay")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from launcher.logs import setup_logging

    setup_logging(0, False)
    paths = build_world(args.out)
    records = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for mode in args.modes.split(","):
            records[(mode, seed)] = run(paths, args.out, mode, seed, args.steps)
    text = table(records)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
