"""benchmarks/two_forget_sets.py: its splits and the fairness of its arms (no model is trained)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.two_forget_sets import ARMS, overrides, table, write_splits  # noqa: E402


def demo_folder(tmp_path: Path) -> Path:
    (tmp_path / "demo" / "data").mkdir(parents=True)
    rows = [{"question": f"q{a}-{i}", "answer": f"a{a}-{i}"} for a in range(20) for i in range(20)]
    (tmp_path / "demo" / "data" / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "demo"


def test_splits_are_one_author_four_authors_and_the_fifteen_others(tmp_path):
    paths = write_splits(demo_folder(tmp_path), tmp_path / "data")
    read = {name: [json.loads(line)["question"] for line in p.read_text().splitlines()] for name, p in paths.items()}
    assert {name: len(rows) for name, rows in read.items()} == {"small": 20, "large": 80, "union": 100, "retain": 300}
    assert {q.split("-")[0] for q in read["small"]} == {"q19"}
    assert {q.split("-")[0] for q in read["large"]} == {"q15", "q16", "q17", "q18"}
    assert sorted(read["union"]) == sorted(read["small"] + read["large"])
    assert not set(read["union"]) & set(read["retain"])


def test_arms_differ_only_in_how_the_same_forget_pairs_are_split_into_tasks(tmp_path):
    from ngdiff.config import load_config

    demo = demo_folder(tmp_path)
    paths = write_splits(demo, tmp_path / "data")
    configs = {
        arm: load_config(None, overrides(demo, paths, arm, 3, 40, 0.05, tmp_path / arm), check_sources=False)
        for arm in ARMS
    }
    for arm, cfg in configs.items():
        # the same forget examples per step in all, the same steps, seed, lr, retain set; no stopping rule
        assert cfg.train.forget_batch_size * len(cfg.data.forget) == 8, arm
        assert (cfg.train.max_steps, cfg.train.seed, cfg.optim.lr, cfg.train.stop_forget_loss) == (40, 3, 0.05, 0)
        assert cfg.data.retain == (str(paths["retain"]),)
        assert (cfg.method.combiner, cfg.optim.name, cfg.autolr.enabled) == ("ngdiff", "sgd", True)
    assert configs["union"].data.forget == (str(paths["union"]),)
    assert configs["two"].data.forget == (str(paths["small"]), str(paths["large"]))
    assert configs["two_half"].method.task_weights == (0.5, 0.5, 1.0)


def test_table_gives_mean_and_half_range_over_seeds():
    rows = [
        {"arm": "two", "seed": s, "lr": 0.05, "steps": 20, **dict.fromkeys(("small_rougeL", "large_rougeL"), v),
         **dict.fromkeys(("retain_rougeL", "small_loss", "large_loss", "retain_loss"), 1.0)}
        for s, v in ((1, 0.2), (2, 0.4))
    ]  # fmt: skip
    line = table(rows).splitlines()[-1]
    assert line.startswith("| 0.05 | 20 | two | 2 | 0.300 ± 0.100 | 0.300 ± 0.100 | 1.000 ± 0.000 |")
