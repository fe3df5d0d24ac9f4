"""The default grid's committed rows (docs/study/) rebuild its committed summary: every number and verdict
line of docs/study.md's results section comes from `ngdiff study report`, not from a hand."""

from __future__ import annotations

from pathlib import Path

from launcher.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "study"
CONFIG = DOCS / "study.yaml"  # the study config as it ran (configs/study/default.yaml then)


def test_the_committed_rows_rebuild_the_committed_summary_and_pictures(tmp_path):
    out = tmp_path / "rebuilt"
    assert (
        main(
            ["study", "report", "--results", str(DOCS / "results.jsonl.gz"), "--config", str(CONFIG), "--out", str(out)]
        )
        == 0
    )
    assert (out / "summary.md").read_text() == (DOCS / "summary.md").read_text()
    for name in ("pareto.png", "pareto_all.png", "lr.png", "autolr.png", "attacks.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # the doc quotes the summary's verdict lines word for word
    doc = (DOCS.parent / "study.md").read_text()
    verdicts = [line for line in (DOCS / "summary.md").read_text().splitlines() if line.startswith("- ngdiff")]
    assert len(verdicts) == 4 + 12 and all(line in doc for line in verdicts)
