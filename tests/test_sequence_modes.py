"""benchmarks/sequence_modes.py: its per-request table and its lr selection (no model is trained)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.sequence_modes import table  # noqa: E402


def record(rouge_after_2: float, retain: float) -> dict:
    metrics = ("forget_rougeL_recall", "forget_answer_loss", "forget_truth_ratio")
    utility = {"retain_rougeL_recall": retain, "retain_answer_loss": 0.5}
    return {
        "requests": [{}, {}],
        "before": {"forget": {m: [1.0, 1.0] for m in metrics}, "utility": utility},
        "matrix": {m: [[0.1, 0.9], [0.2, rouge_after_2]] for m in metrics},
        "utility": [utility, utility],
    }


def test_table_gives_each_request_row_as_mean_and_half_range_over_seeds():
    lines = table({("chain", 1): record(0.3, 0.8), ("chain", 2): record(0.5, 0.6)}).splitlines()
    assert lines[2] == "| before | - | - | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 0.800 | 0.500 |"
    assert lines[4].startswith("| chain | 2 | request 2 | 0.200 ± 0.000 | 0.400 ± 0.100 |")
    assert lines[4].endswith("| 0.700 ± 0.100 | 0.500 ± 0.000 |")


def run_record(forget_last: list[float], retain: list[float], before: float = 0.8) -> dict:
    return {
        "before": {"utility": {"retain_rougeL_recall": before}},
        "matrix": {"forget_rougeL_recall": [[0.5] * len(forget_last), forget_last]},
        "utility": [{"retain_rougeL_recall": r} for r in retain],
    }


def test_select_lr_takes_the_most_forgetting_lr_that_kept_the_retain_floor():
    from benchmarks.sequence_modes import select_lr

    records = {
        0.01: run_record([0.6, 0.6], [0.8, 0.8]),  # kept, forgot little
        0.0316: run_record([0.2, 0.3], [0.79, 0.77]),  # kept (floor 0.76), forgot most of the kept
        0.1: run_record([0.0, 0.0], [0.8, 0.1]),  # forgot all by collapsing after request 2
    }
    assert select_lr(records) == 0.0316
    collapsed = {lr: run_record([0.0, 0.0], [0.1, 0.1]) for lr in (0.1, 0.01)}
    assert select_lr(collapsed) == 0.01  # none kept the floor: the smallest lr


def muse_record(verbmem_after_2: float, knowmem: list[float]) -> dict:
    return {
        "requests": [{}, {}],
        "evaluation": {"benchmark": "muse"},
        "before": {"forget": {"forget_verbmem": [80.0, 70.0]}, "utility": {"retain_knowmem": 99.0}},
        "matrix": {"forget_verbmem": [[20.0, 60.0], [30.0, verbmem_after_2]]},
        "utility": [{"retain_knowmem": k} for k in knowmem],
    }


def test_a_muse_sequence_is_tabled_and_selected_by_verbmem_and_knowmem():
    from benchmarks.sequence_modes import select_lr

    lines = table({("chain", 1): muse_record(10.0, [99.0, 95.0]), ("chain", 2): muse_record(30.0, [97.0, 93.0])})
    assert lines.splitlines()[0] == "| arm | seeds | after | set 1 VerbMem | set 2 VerbMem | retain KnowMem |"
    assert lines.splitlines()[2] == "| before | - | - | 80.000 | 70.000 | 99.000 |"
    assert lines.splitlines()[4] == "| chain | 2 | request 2 | 30.000 ± 0.000 | 20.000 ± 10.000 | 94.000 ± 1.000 |"
    # floor 0.95 x 99 = 94.05: 0.1 forgot most but fell to 93 after request 2; 0.01 kept it
    records = {0.01: muse_record(50.0, [99.0, 96.0]), 0.1: muse_record(5.0, [98.0, 93.0])}
    assert select_lr(records) == 0.01
