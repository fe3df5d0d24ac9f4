"""`ngdiff sequence` with MUSE cells (`eval.benchmark=muse`): three requests, each a chunk set of one of MUSE-News's
sustainability folds, on a tiny Llama whose tokenizer was trained on those texts.

Every forget cell must equal VerbMem of ngdiff.eval.muse.evaluate_muse on that request's final model with the
set's texts cut into VerbMem prompts, every utility cell its KnowMem retain; the end points read the MUSE
scores; a MUSE sequence stopped in request 2 resumes to the uninterrupted one's models and matrix; bad input is
one line before anything trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher import run as launcher_run
from launcher.cli import main
from ngdiff import MUSE_DIR
from ngdiff.eval.muse import MUSE_FILES, evaluate_muse, verbmem_row
from ngdiff.modeling import TinyLlamaSpec, build_tiny_model, load_tokenizer
from ngdiff.study.muse_world import FOLD_ARTICLES, RETAIN_TEXTS, word_chunks
from tests.conftest import write_jsonl
from tests.test_sequence import stopping_in_request_2

WORDS, PROMPT_WORDS, ITEMS = 16, 5, 2


def fold_texts(k: int) -> list[str]:
    return word_chunks(json.loads((MUSE_DIR / FOLD_ARTICLES[k - 1]).read_text()), WORDS, 4)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Folds 1-3 (4 chunks of 16 words each), 4 retain-side chunks, and the tiny model; its tokenizer learnt
    the folds' and the retain side's text."""
    root = tmp_path_factory.mktemp("muse_sequence")
    paths = {f"fold{k}": write_jsonl(root / f"fold_{k}.jsonl", [{"text": t} for t in fold_texts(k)]) for k in (1, 2, 3)}
    retain = word_chunks(json.loads((MUSE_DIR / RETAIN_TEXTS).read_text()), WORDS, 4)
    paths["retain"] = write_jsonl(root / "retain.jsonl", [{"text": t} for t in retain])
    texts = [*retain, *(t for k in (1, 2, 3) for t in fold_texts(k))]
    spec = TinyLlamaSpec(vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    paths["model"] = build_tiny_model(root / "model", texts, spec)
    return paths


def overrides(world: dict[str, Path], out: Path, *extra: str, folds: str = "123") -> list[str]:
    return [
        f"model.path={world['model']}",
        "data.forget=" + ",".join(str(world[f"fold{k}"]) for k in folds),
        f"data.retain={world['retain']}",
        "data.format=text",
        "data.max_length=64",
        "eval.benchmark=muse",
        f"eval.max_items={ITEMS}",
        f"sequence.verbmem_prompt_words={PROMPT_WORDS}",
        "sequence.mode=chain",
        "train.forget_batch_size=2",
        "train.retain_batch_size=2",
        "train.max_steps=2",
        "optim.lr=0.01",
        "autolr.enabled=false",
        "logging.progress=false",
        f"output_dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def chain(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("muse_chain") / "seq"
    assert main(["sequence", *overrides(world, out)]) == 0
    return out


def direct_muse(model_dir: Path, texts: list[str], folder: Path) -> tuple[dict[str, list], dict[str, float]]:
    """evaluate_muse on a MUSE layout whose VerbMem prompts are `texts` cut after PROMPT_WORDS words (the
    other files the bundled ones), `ITEMS` items of each."""
    for name in MUSE_FILES.values():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MUSE_DIR / name, folder / name)
    (folder / MUSE_FILES["verbmem"]).write_text(json.dumps([verbmem_row(t, PROMPT_WORDS) for t in texts]))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return evaluate_muse(model, load_tokenizer(str(model_dir)), data_dir=folder, max_items=ITEMS)


def test_each_cell_is_muses_evaluation_of_that_requests_final_model(chain, tmp_path):
    record = json.loads((chain / "sequence.json").read_text())
    assert record["evaluation"]["benchmark"] == "muse" and record["evaluation"]["verbmem_prompt_words"] == PROMPT_WORDS
    assert list(record["matrix"]) == ["forget_verbmem"]
    assert all(r["evaluated"] and r["steps"] == 2 and len(r["forget"]) == 1 for r in record["requests"])
    rows = [record["before"]["forget"]["forget_verbmem"], *record["matrix"]["forget_verbmem"]]
    utility = [record["before"]["utility"], *record["utility"]]
    models = [Path(record["before"]["model"]), *(chain / f"request_{i}" / "final" for i in (1, 2, 3))]
    for i, model_dir in enumerate(models):
        row = chain / "eval" / ("before" if i == 0 else f"request_{i}")
        for j in range(3):
            items, direct = direct_muse(model_dir, fold_texts(j + 1)[:ITEMS], tmp_path / f"{i}{j}")
            assert rows[i][j] == direct["verbmem_f"], (i, j)
            # the same continuations of the same prompts (each text's first 5 words), scored the same way
            assert json.loads((row / f"forget_{j + 1}" / "items.json").read_text()) == {"verbmem_f": items["verbmem_f"]}
        assert utility[i] == {"retain_knowmem": direct["knowmem_r"]}
        assert json.loads((row / "retain" / "items.json").read_text()) == {"knowmem_r": items["knowmem_r"]}
    # the cells are the requests' evaluation: no request ran a MUSE suite of its own at its end
    assert all(not (chain / f"request_{i}" / "eval").exists() for i in (1, 2, 3))
    assert (chain / "sequence.png").stat().st_size > 10_000


def test_the_end_points_of_a_muse_sequence_are_verbmem_and_knowmem(chain):
    from ngdiff.sequence.compare import family, sequence_endpoint

    record = json.loads((chain / "sequence.json").read_text())
    point = sequence_endpoint("ngdiff-chain", 1, chain / "sequence.json")
    last = record["matrix"]["forget_verbmem"][-1]
    assert point.benchmark == "muse"
    assert point.values == {
        "forget_mean": sum(last) / 3,
        "forget_worst": max(last),
        "relapse": last[0] - record["matrix"]["forget_verbmem"][0][0],
        "retain": record["utility"][-1]["retain_knowmem"],
    }
    labels = [c.label for c in family([("a", "b")], benchmark="muse")]
    assert labels == [
        "a vs b on mean forget VerbMem",
        "a vs b on worst set's forget VerbMem",
        "a vs b on set 1 relapse (VerbMem)",
        "a vs b on retain KnowMem",
    ]


def test_a_muse_sequence_stopped_in_request_2_resumes_to_the_same_models_and_matrix(
    chain, world, tmp_path, monkeypatch
):
    out = tmp_path / "seq"
    args = ["sequence", *overrides(world, out)]
    install = launcher_run.install_stop_handlers
    monkeypatch.setattr(launcher_run, "install_stop_handlers", stopping_in_request_2(install))
    assert main(args) == 0  # stopped after request 2's first step, with a checkpoint
    assert (out / "request_2" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    assert not (out / "request_2" / "final").exists()
    monkeypatch.setattr(launcher_run, "install_stop_handlers", install)
    assert main([*args, "train.resume=auto"]) == 0
    for i in (1, 2, 3):
        a, b = (load_file(d / f"request_{i}" / "final" / "model.safetensors") for d in (out, chain))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
    ours, theirs = (json.loads((d / "sequence.json").read_text()) for d in (out, chain))
    assert ours["matrix"] == theirs["matrix"] and ours["utility"] == theirs["utility"]


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (("data.format=tofu",), "eval.benchmark=muse scores each request's set by VerbMem on its texts"),
        (("eval.benchmark=none",), "data.format=text sets have no question/answer evaluation"),
        (("sequence.verbmem_prompt_words=0",), "sequence.verbmem_prompt_words must be at least 1"),
        (("eval.benchmark=none", "data.format=tofu"), "sequence.verbmem_prompt_words is read by eval.benchmark=muse"),
        (("sequence.verbmem_prompt_words=16",), "text 1 has 16 words, none left to continue"),
        (("eval.data_dir={empty}",), "MUSE file knowmem/retain2_qa.json not found"),
    ],
)
def test_bad_muse_input_is_one_line_before_any_training(world, tmp_path, capsys, extra, said):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    extra = tuple(e.format(empty=tmp_path / "empty") for e in extra)
    assert main(["sequence", *overrides(world, out, *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err, err
    assert not out.exists()
