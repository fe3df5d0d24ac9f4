"""Sequences of unlearning requests on a CPU world, compared under the study's statistics.

    python benchmarks/sequence_modes.py --out /tmp/seqstats --seeds 1,2,3,4,5,6,7,8 --steps 10
    python benchmarks/sequence_modes.py --world muse --out /tmp/seqmuse --seeds 1,2,3,4 --steps 8
    python benchmarks/sequence_modes.py --out /tmp/again --from docs/sequence_modes   # the comparison only

`--world tofu` (the default, below) serves three TOFU authors; `--world muse` serves MUSE-News's four
sustainability folds (MUSE_WORLD below), with MUSE cells (VerbMem per fold, KnowMem on the retain QA).

The world is the study's CPU world (ngdiff/study/world.py, built once in OUT/world and reused): a tiny
Llama (64 hidden, 2 layers) fine-tuned 60 epochs on three of TOFU's forget05 authors (3 x 20 pairs), 2 retain
authors and 8 real-authors / world-facts items. The requests are those three authors, one each, in file
order; the retain set is the world's. An arm is `<method>-<mode>`; each (arm, seed) is one `ngdiff sequence`
under SGD, 8 forget + 8 retain pairs per step, `--steps` steps per request for every arm, every cell on all
pairs of its set with greedy answers of 48 tokens (the world's length). NGDiff + AutoLR starts at lr 0.1 (the
study's ngdiff+autolr protocol, untuned); GDiff and NPO have no AutoLR, so their constant lr is selected
first, on a seed of its own (`--select-seed`), from `--grids` (see `select_lr`). OUT/comparison.md holds the
end points of every seed and the verdict lines (ngdiff.sequence.compare), OUT/endpoints.png their picture,
OUT/matrix.md the mean +- half range over seeds of every request's scores, OUT/selection.md the selection.

The MUSE world (`--world muse`, ngdiff/study/muse_world.py with `folds: 4`): the MUSE study's tiny Llama (64
hidden, 2 layers) fine-tuned 80 epochs on 12 chunks of 40 words of each of the four folds (the bundled first
16 articles of each), 20 chunks of the retain-side texts and 20 + 20 KnowMem pairs; the retain model on the
retain side only. The requests are the folds in order (data/fold_<k>.jsonl), the retain set the world's;
`data.format=text` and `eval.benchmark=muse`, so every cell is VerbMem on all 12 chunks of its fold (12-word
prompts, MUSE's 128 new tokens) and each row's utility KnowMem on the 20 retain questions. NGDiff + AutoLR
starts at 0.0316, the lr the MUSE study selected for it (docs/study_muse.md), not tuned here.
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
    "forget_split": "forget05",
    "forget_authors": [0, 1, 2],
    "retain_authors": 2,
    "knowledge": ["real_authors", "world_facts"],
    "knowledge_items": 8,
    "max_new_tokens": 48,
    "model": {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 192},
    "finetune": {"epochs": 60, "lr": 0.005, "batch_size": 16, "warmup_steps": 10},
    "eval_items": {"forget": 8, "retain": 8, "real_authors": 8, "world_facts": 8},
}
COMMON = ["optim.name=sgd", "optim.weight_decay=0.0", "train.forget_batch_size=8", "train.retain_batch_size=8"]
# a method = the study's arm of that name (configs/study/default.yaml) under SGD: ngdiff+autolr, and gdiff-sgd /
# NPO under NGDiff's protocol (only the combiner, then the forget objective, differs)
METHODS = {
    "ngdiff": ["method.combiner=ngdiff", "autolr.enabled=true"],
    "gdiff": ["method.combiner=gdiff", "method.gdiff_coefficient=0.5"],
    "npo": [
        "method.combiner=gdiff",
        "method.gdiff_coefficient=0.5",
        "method.forget_objective=npo",
        "method.npo_beta=0.1",
    ],
}
NGDIFF_LR = 0.1  # AutoLR's start, as in the study; not tuned here
# the constant lrs GDiff and NPO are selected from: a first grid of 0.01, 0.0316, 0.1 on the selection seed had
# GDiff forget nothing below 0.1 and collapse at 0.1, and NPO collapse at every lr, so each grid reaches further
GRIDS = "gdiff=0.01/0.0316/0.0562/0.1,npo=0.001/0.00316/0.01/0.0316/0.1"
PAIRS_PER_AUTHOR = 20
MUSE_WORLD = {
    "kind": "muse",
    "model": WORLD["model"],
    "finetune": {"epochs": 80, "lr": 0.005, "batch_size": 8, "warmup_steps": 10},
    "muse": {"chunk_words": 40, "forget_chunks": 12, "retain_chunks": 20, "holdout_chunks": 12, "knowmem_items": 20,
             "verbmem_items": 12, "prompt_words": 12, "folds": 4},
}  # fmt: skip
# a first grid (GDiff 0.0316 to 1, NPO 0.01 to 0.316) collapsed the retain KnowMem at every lr it ran on the
# selection seed (NPO's 0.316 was not run), so each grid reaches lower; the extended grids went from no
# forgetting to a collapse between two neighbours (GDiff 0.01 and 0.0316, NPO 0.0001 and 0.000316), so each
# got the point between them
MUSE_GRIDS = (
    "gdiff=0.001/0.00316/0.01/0.0178/0.0316/0.1/0.316/1,npo=0.0001/0.000178/0.000316/0.001/0.00316/0.01/0.0316/0.1"
)
MUSE_NGDIFF_LR = 0.0316


def study_world(world: dict, out: Path):
    """A study's world (built once in OUT/world and reused) from the world section `world`."""
    from ngdiff.config import load_config
    from ngdiff.study.spec import parse_study
    from ngdiff.study.world import load_or_build, placeholder_overrides

    spec = parse_study(
        {
            "name": "sequence",
            "world": world,
            "lrs": [0.1],
            "eval_every": 5,
            "methods": {"ngdiff": ["method.combiner=ngdiff"]},
        }
    )
    data_cfg = load_config(None, placeholder_overrides(spec), check_sources=False).data
    return load_or_build(spec, out, data_cfg)


def build_muse_world(out: Path) -> dict[str, Path]:
    """The MUSE world with its four folds; the run overrides it gives (text data, MUSE cells) under `extra`."""
    world = study_world(MUSE_WORLD, out)
    keys = dict(item.split("=", 1) for item in world.overrides)
    paths: dict = {"model": Path(keys["model.path"]), "retain": Path(keys["data.retain"])}
    for k in range(1, MUSE_WORLD["muse"]["folds"] + 1):
        paths[f"set{k}"] = Path(keys["data.forget"]).parent / f"fold_{k}.jsonl"  # as the world recorded its data
    skip = ("model.path", "data.forget", "data.retain")
    paths["extra"] = [o for o in world.overrides if not o.startswith(skip)]
    paths["extra"].append(f"sequence.verbmem_prompt_words={MUSE_WORLD['muse']['prompt_words']}")
    return paths


def build_world(out: Path) -> dict[str, Path]:
    """The world (study code), then its forget split cut into one set per author, each with TOFU's
    paraphrased / perturbed answers beside it (truth ratio)."""
    from ngdiff import TOFU_DIR
    from ngdiff.data import load_records
    from ngdiff.demo import write_rows

    world = study_world(WORLD, out)
    keys = dict(item.split("=", 1) for item in world.overrides)
    rows = load_records(keys["data.forget"], ("question", "answer"), "world forget")
    companions = {
        r["question"]: r for r in load_records(str(TOFU_DIR / f"{WORLD['forget_split']}_perturbed.jsonl"), (), "TOFU")
    }
    paths: dict = {"model": Path(keys["model.path"]), "retain": Path(keys["data.retain"])}
    paths["extra"] = [f"eval.max_new_tokens={WORLD['max_new_tokens']}", "data.max_length=128"]
    for k in range(len(rows) // PAIRS_PER_AUTHOR):
        part = rows[k * PAIRS_PER_AUTHOR : (k + 1) * PAIRS_PER_AUTHOR]
        paths[f"set{k + 1}"] = write_rows(out / f"author{k + 1}.jsonl", part)
        write_rows(out / f"author{k + 1}_perturbed.jsonl", [companions[r["question"]] for r in part])
    return paths


def run(paths: dict, folder: Path, arm: str, seed: int, steps: int, lr: float) -> Path:
    """One `ngdiff sequence` of arm `<method>-<mode>` (e.g. ngdiff-replay) in `folder`; its sequence.json.
    `paths`: the world's model, retain set, requests (set1, set2, ...) and its own overrides (`extra`)."""
    from launcher.cli import main

    method, mode = arm.rsplit("-", 1)
    sets = ",".join(str(p) for name, p in paths.items() if name.startswith("set"))
    overrides = [*COMMON, *METHODS[method], f"optim.lr={lr:g}", f"train.max_steps={steps}", f"train.seed={seed}"]
    overrides += [f"model.path={paths['model']}", f"data.forget={sets}", f"data.retain={paths['retain']}"]
    overrides += [*paths["extra"], "eval.max_items=0", "logging.progress=false"]
    overrides += [f"sequence.mode={mode}", f"output_dir={folder}", "train.resume=auto", "train.save_every=0"]
    if main(["sequence", *overrides]) != 0:
        raise SystemExit(f"{folder}: ngdiff sequence failed")
    record = json.loads((folder / "sequence.json").read_text())
    if not all(r["evaluated"] for r in record["requests"]):  # a stop signal: the command exits 0
        raise SystemExit(f"{folder}: the sequence stopped early; rerun the same command to resume it")
    return folder / "sequence.json"


def select_lr(records: dict[float, dict], floor: float = 0.95) -> float:
    """The lr whose sequence forgot most (lowest mean forget ROUGE-L after the last request) among those that
    kept the retain ROUGE-L >= `floor` x the starting model's after every request (the study's utility floor,
    on the retain set); when none kept it, the smallest lr."""
    from ngdiff.sequence.compare import scores_of

    def kept(r: dict) -> bool:
        retain = scores_of(r).retain
        return all(u[retain] >= floor * r["before"]["utility"][retain] for u in r["utility"])

    def forgotten(r: dict) -> float:
        last = r["matrix"][scores_of(r).forget][-1]
        return sum(last) / len(last)

    good = [lr for lr, r in records.items() if kept(r)]
    return min(good, key=lambda lr: (forgotten(records[lr]), lr)) if good else min(records)


def selection(paths: dict, out: Path, arms: list[str], grids: dict[str, list[float]], seed: int, steps: int, ngdiff_lr):
    """Each arm's lr: NGDiff's start lr, the others selected on `seed` (OUT/selection.md says how)."""
    from ngdiff.sequence.compare import scores_of

    lrs, lines = {}, []
    for arm in arms:
        if arm.startswith("ngdiff-"):
            lrs[arm] = ngdiff_lr
            continue
        records = {}
        for lr in grids[arm.rsplit("-", 1)[0]]:
            path = run(paths, out / "selection" / f"{arm}_lr{lr:g}_seed{seed}", arm, seed, steps, lr)
            records[lr] = json.loads(path.read_text())
        lrs[arm] = select_lr(records)
        for lr, r in records.items():
            scores = scores_of(r)
            if not lines:
                lines += [f"| arm | lr | mean forget {scores.forget_label} | lowest retain {scores.retain_label} | "
                          "selected |", "|---|---|---|---|---|"]  # fmt: skip
            last = r["matrix"][scores.forget][-1]
            low = min(u[scores.retain] for u in r["utility"])
            lines.append(f"| {arm} | {lr:g} | {sum(last) / len(last):.3f} | {low:.3f} | {'yes' * (lr == lrs[arm])} |")
    (out / "selection.md").write_text("\n".join(lines) + "\n")
    return lrs


def spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


# per cells' kind: the forget metrics of the table, then its retain metrics
METRICS = {
    "tofu": (
        ("forget_rougeL_recall", "ROUGE-L"),
        ("forget_answer_loss", "loss"),
        ("forget_truth_ratio", "truth ratio"),
    ),
    "muse": (("forget_verbmem", "VerbMem"),),
}
RETAIN_METRICS = {
    "tofu": (("retain_rougeL_recall", "retain ROUGE-L"), ("retain_answer_loss", "retain loss")),
    "muse": (("retain_knowmem", "retain KnowMem"),),
}


def table(records: dict[tuple[str, int], dict]) -> str:
    from ngdiff.sequence.compare import benchmark_of

    first = next(iter(records.values()))
    metrics, retain = METRICS[benchmark_of(first)], RETAIN_METRICS[benchmark_of(first)]
    t = len(first["requests"])
    head = [f"set {j + 1} {label}" for name, label in metrics for j in range(t)] + [label for _, label in retain]
    lines = [f"| arm | seeds | after | {' | '.join(head)} |", "|" + "---|" * (len(head) + 3)]
    before = [f"{first['before']['forget'][name][j]:.3f}" for name, _ in metrics for j in range(t)]
    before += [f"{first['before']['utility'][k]:.3f}" for k, _ in retain]
    lines.append(f"| before | - | - | {' | '.join(before)} |")
    for arm in dict.fromkeys(m for m, _ in records):
        runs = [r for (m, _), r in records.items() if m == arm]
        for i in range(t):
            cells = [spread([r["matrix"][name][i][j] for r in runs]) for name, _ in metrics for j in range(t)]
            cells += [spread([r["utility"][i][k] for r in runs]) for k, _ in retain]
            lines.append(f"| {arm} | {len(runs)} | request {i + 1} | {' | '.join(cells)} |")
    return "\n".join(lines)


ARMS = "ngdiff-chain,ngdiff-replay,ngdiff-adapters,gdiff-chain,npo-chain"
# the comparisons (one Holm family with every end point): the modes under NGDiff + AutoLR, then NGDiff against
# the two baselines under chain
PAIRS = "ngdiff-replay:ngdiff-chain,ngdiff-adapters:ngdiff-chain,ngdiff-chain:gdiff-chain,ngdiff-chain:npo-chain"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--world", choices=("tofu", "muse"), default="tofu", help="TOFU authors or MUSE's folds")
    parser.add_argument("--arms", default=ARMS, help="<method>-<mode>, method in " + ", ".join(METHODS))
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--grids", help=f"method=lr/lr/...: GDiff's and NPO's lrs (tofu: {GRIDS}; muse: {MUSE_GRIDS})")
    parser.add_argument("--select-seed", type=int, default=0)
    parser.add_argument("--pairs", default=PAIRS, help="arm:reference,... (one Holm family)")
    parser.add_argument("--from", dest="source", type=Path, help="compare the <arm>_seed<k>.json there; run nothing")
    args = parser.parse_args()
    from launcher.logs import setup_logging
    from ngdiff.sequence.compare import compare, family, find_runs, load_endpoints, report
    from ngdiff.sequence.compare_plot import plot_endpoints

    setup_logging(0, False)
    if args.source:
        runs = find_runs(args.source)
    else:
        muse = args.world == "muse"
        paths = build_muse_world(args.out) if muse else build_world(args.out)
        arms = args.arms.split(",")
        grid_text = args.grids or (MUSE_GRIDS if muse else GRIDS)
        grids = {m: [float(x) for x in g.split("/")] for m, g in (item.split("=") for item in grid_text.split(","))}
        ngdiff_lr = MUSE_NGDIFF_LR if muse else NGDIFF_LR
        lrs = selection(paths, args.out, arms, grids, args.select_seed, args.steps, ngdiff_lr)
        runs = {}
        for seed in (int(s) for s in args.seeds.split(",")):  # seed by seed: a cut-short benchmark stays paired
            for arm in arms:
                runs[(arm, seed)] = run(paths, args.out / f"{arm}_seed{seed}", arm, seed, args.steps, lrs[arm])
    args.out.mkdir(parents=True, exist_ok=True)
    records = {key: json.loads(path.read_text()) for key, path in sorted(runs.items())}
    (args.out / "matrix.md").write_text(table(records) + "\n")
    points = load_endpoints(runs)
    # an --arms subset (one process of several, say) compares only the pairs whose two arms it ran
    pairs = [pair for pair in (tuple(p.split(":")) for p in args.pairs.split(",")) if {a for a, _ in runs} >= set(pair)]
    text = report(compare(points, family(pairs, benchmark=points[0].benchmark))) if pairs else "no pair of arms ran"
    (args.out / "comparison.md").write_text(text + "\n")
    plot_endpoints(points, args.out / "endpoints.png")
    print(text)


if __name__ == "__main__":
    main()
