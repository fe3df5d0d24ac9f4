"""Shared fixtures: a tiny Llama with a locally trained tokenizer, and small TOFU splits on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ngdiff import TOFU_DIR
from ngdiff.host_memory import keep_freed_heap

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
keep_freed_heap()  # as the `ngdiff` command does: the in-process tests' forward passes stop faulting pages


def free_port() -> int:
    """A free TCP port on the loopback address, for a test's rendezvous (torchrun, deepspeed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_requested_in_step(index: int):
    """An `on_trainer` hook: a stop request (as a signal handler sets it) arrives during 0-based step `index`,
    so the run checkpoints and ends after `index + 1` steps."""

    def hook(trainer) -> None:
        original = trainer.unlearning_step

        def step():
            trainer.stop_requested = trainer.step_index == index
            return original()

        trainer.unlearning_step = step

    return hook


def tofu_rows(n: int = 400) -> list[dict]:
    with open(TOFU_DIR / "full.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def tiny_run_overrides(model_dir: Path, split: dict[str, Path], *extra: str) -> list[str]:
    """The overrides of a run of the tiny model on the small TOFU split: batches of 4, no progress bar, and
    AutoLR off (plain steps that the tests compare with formulas; the tests of AutoLR turn it on)."""
    return [
        f"model.path={model_dir}",
        f"data.forget={split['forget']}",
        f"data.retain={split['retain']}",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "logging.progress=false",
        "autolr.enabled=false",
        *extra,
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with a 400-token BPE trained on 40 TOFU pairs; built once a session."""
    from ngdiff.modeling import TinyLlamaSpec, build_tiny_model

    rows = tofu_rows(40)
    spec = TinyLlamaSpec(vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model", [r["question"] + " " + r["answer"] for r in rows], spec
    )


@pytest.fixture(scope="session")
def tofu_split(tmp_path_factory) -> dict[str, Path]:
    """forget = 16 rows of the first author, retain = 24 rows of the third and fourth; forget_b = 8 rows of
    the second author (a second forget set, for the k-task runs); forget_alternates = the forget rows, each
    with another author's answer as `alternate` (DPO's preferred answer, of another length)."""
    root = tmp_path_factory.mktemp("tofu")
    rows = tofu_rows(80)
    alternates = [{**row, "alternate": other["answer"]} for row, other in zip(rows[:16], rows[40:56], strict=True)]
    return {
        "forget": write_jsonl(root / "forget.jsonl", rows[:16]),
        "forget_alternates": write_jsonl(root / "forget_alternates.jsonl", alternates),
        "retain": write_jsonl(root / "retain.jsonl", rows[40:64]),
        "forget_b": write_jsonl(root / "forget_b.jsonl", rows[20:28]),
    }
