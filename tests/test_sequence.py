"""`ngdiff sequence`: three unlearning requests on the tiny TOFU world, through the command line.

The matrix must hold exactly what `ngdiff eval` gives on each request's final model; a sequence stopped in
request 2 and rerun must end bit for bit where an uninterrupted one does; bad input is one line before any
training (no folder is made)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher import run as launcher_run
from launcher.cli import main
from ngdiff.demo import with_companions
from ngdiff.metrics_log import read_jsonl
from tests.conftest import stop_requested_in_step, tofu_rows, write_jsonl

EVAL = ("eval.max_items=3", "eval.max_new_tokens=4", "eval.batch_size=4")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """The first author's 16 pairs split into three requests of 5, 5 and 6; sets a and b have TOFU's
    paraphrased / perturbed answers beside them (truth ratio), c has none (its truth ratio is null)."""
    root = tmp_path_factory.mktemp("sequence_sets")
    rows = tofu_rows(16)
    parts = {"a": rows[:5], "b": rows[5:10], "c": rows[10:]}
    paths = {name: write_jsonl(root / f"{name}.jsonl", part) for name, part in parts.items()}
    for name in ("a", "b"):
        write_jsonl(root / f"{name}_perturbed.jsonl", with_companions(parts[name]))
    paths["retain"] = write_jsonl(root / "retain.jsonl", tofu_rows(64)[40:64])
    return paths


def overrides(model: Path, sets: dict[str, Path], out: Path, *extra: str, forget: str = "abc") -> list[str]:
    return [
        f"model.path={model}",
        "data.forget=" + ",".join(str(sets[name]) for name in forget),
        f"data.retain={sets['retain']}",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "train.max_steps=2",
        "autolr.enabled=false",
        "logging.progress=false",
        *EVAL,
        f"output_dir={out}",
        *extra,
    ]


def final_params(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "final" / "model.safetensors")


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stopping_in_request_2(install):
    """`install` (launcher.run's install_stop_handlers), then a stop request in request 2's first step: the
    sequence stops there with a step-1 checkpoint."""

    def hook(trainer) -> None:
        install(trainer)
        if Path(trainer.cfg.output_dir).name == "request_2":
            stop_requested_in_step(0)(trainer)

    return hook


@pytest.fixture(scope="module")
def sequences(tiny_model_dir, sets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sequences")
    for mode in ("chain", "replay"):
        assert main(["sequence", *overrides(tiny_model_dir, sets, root / mode, f"sequence.mode={mode}")]) == 0
    return {"chain": root / "chain", "replay": root / "replay"}


def eval_json(capsys, model: Path, forget: Path, retain: Path, out: Path) -> dict:
    capsys.readouterr()
    flags = ["--max-items", "3", "--max-new-tokens", "4", "--batch-size", "4", "--json", "--output", str(out)]
    assert main(["eval", "--model", str(model), "--forget", str(forget), "--retain", str(retain), *flags]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["chain", "replay"])
def test_the_matrix_is_ngdiff_eval_of_each_requests_final_model_on_each_set(sequences, sets, mode, capsys, tmp_path):
    out = sequences[mode]
    record = json.loads((out / "sequence.json").read_text())
    assert [r["index"] for r in record["requests"]] == [1, 2, 3]
    assert all(r["mode"] == mode and r["steps"] == 2 and r["evaluated"] for r in record["requests"])
    starts = [r["start_model"] for r in record["requests"]]
    assert starts[1:] == [str(out / "request_1" / "final"), str(out / "request_2" / "final")]
    assert {"forget_rougeL_recall", "forget_answer_loss", "forget_truth_ratio"} <= set(record["matrix"])
    # truth ratio where the set has its *_perturbed companion (a, b), null for c, whatever the row
    assert [row[2] for row in record["matrix"]["forget_truth_ratio"]] == [None, None, None]
    losses, before_losses = record["matrix"]["forget_answer_loss"], record["before"]["forget"]["forget_answer_loss"]
    assert all(isinstance(x, float) for row in losses for x in row)
    assert all(losses[j][j] > before_losses[j] for j in range(3))  # each request pushed its own set's loss up
    assert all(row[0] is not None and row[1] is not None for row in record["matrix"]["forget_truth_ratio"])
    for i in range(3):
        final = out / f"request_{i + 1}" / "final"
        for j, name in enumerate("abc"):
            scored = eval_json(capsys, final, sets[name], sets["retain"], tmp_path / f"{i}{j}")
            for metric, rows in record["matrix"].items():
                assert len(rows) == 3 and all(len(row) == 3 for row in rows)
                assert rows[i][j] == scored.get(metric), (metric, i, j)
        assert record["utility"][i] == {k: v for k, v in scored.items() if k.startswith("retain_")}
    before = eval_json(capsys, Path(record["before"]["model"]), sets["a"], sets["retain"], tmp_path / "before")
    assert record["before"]["forget"]["forget_answer_loss"][0] == before["forget_answer_loss"]
    assert (out / "sequence.png").stat().st_size > 10_000


def test_chain_forgets_one_set_per_request_and_replay_all_sets_so_far(sequences, sets):
    import yaml

    def run_config(mode: str, index: int) -> dict:
        return yaml.safe_load((sequences[mode] / f"request_{index}" / "config.yaml").read_text())

    assert [run_config("chain", i)["data"]["forget"] for i in (1, 2, 3)] == [[str(sets[n])] for n in "abc"]
    replayed = [run_config("replay", i)["data"]["forget"] for i in (1, 2, 3)]
    assert replayed == [[str(sets["a"])], [str(sets["b"]), str(sets["a"])], [str(sets[n]) for n in "cab"]]
    weights = [run_config("replay", i)["method"]["task_weights"] for i in (1, 2, 3)]
    assert weights == [[], [1.0, 0.5, 1.0], [1.0, 0.25, 0.25, 1.0]]
    # a request's config.yaml is an ordinary run's: no sequence section, and `ngdiff train` reads it back
    from ngdiff.config import load_config

    assert "sequence" not in run_config("chain", 2)
    load_config(sequences["chain"] / "request_2" / "config.yaml", single_run=True)
    assert yaml.safe_load((sequences["chain"] / "config.yaml").read_text())["sequence"]["mode"] == "chain"
    # request 1 is the same run in both modes; request 2 differs only by replaying set a, and that shows
    chain, replay = sequences["chain"], sequences["replay"]
    assert same_params(final_params(chain / "request_1"), final_params(replay / "request_1"))
    assert not same_params(final_params(chain / "request_2"), final_params(replay / "request_2"))


def test_a_sequence_stopped_in_request_2_resumes_bit_for_bit(
    sequences, tiny_model_dir, sets, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "replay"
    args = overrides(tiny_model_dir, sets, out, "sequence.mode=replay")
    install = launcher_run.install_stop_handlers
    monkeypatch.setattr(launcher_run, "install_stop_handlers", stopping_in_request_2(install))
    assert main(["sequence", *args]) == 0
    assert (out / "request_2" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    assert not (out / "request_2" / "final").exists() and not (out / "request_3").exists()
    record = json.loads((out / "sequence.json").read_text())
    assert [r["evaluated"] for r in record["requests"]] == [True, False, False]
    assert record["matrix"]["forget_answer_loss"][1] == [None, None, None]
    monkeypatch.setattr(launcher_run, "install_stop_handlers", install)

    capsys.readouterr()
    assert main(["sequence", *args]) == 2  # a started sequence continues only when asked to
    assert "pass train.resume=auto to continue the sequence" in capsys.readouterr().err
    request_1 = (out / "request_1" / "final" / "model.safetensors").stat().st_mtime_ns
    first_steps: dict[str, int] = {}  # the step each request's rerun starts from

    def record_first_step(trainer) -> None:
        install(trainer)
        original = trainer.unlearning_step

        def step():
            first_steps.setdefault(Path(trainer.cfg.output_dir).name, trainer.step_index)
            return original()

        trainer.unlearning_step = step

    monkeypatch.setattr(launcher_run, "install_stop_handlers", record_first_step)
    assert main(["sequence", *args, "train.resume=auto"]) == 0
    assert first_steps == {"request_2": 1, "request_3": 0}  # request 1 skipped, request 2 from its checkpoint
    assert (out / "request_1" / "final" / "model.safetensors").stat().st_mtime_ns == request_1  # not retrained
    assert [r["step"] for r in read_jsonl(out / "request_2" / "metrics.jsonl")] == [1, 2]
    for index in (1, 2, 3):
        folder = f"request_{index}"
        assert same_params(final_params(out / folder), final_params(sequences["replay"] / folder)), folder
    resumed = json.loads((out / "sequence.json").read_text())
    straight = json.loads((sequences["replay"] / "sequence.json").read_text())
    assert resumed["matrix"] == straight["matrix"] and resumed["utility"] == straight["utility"]


def test_a_request_appended_to_a_finished_sequence_runs_alone(tiny_model_dir, sets, tmp_path):
    out = tmp_path / "chain"
    two = overrides(tiny_model_dir, sets, out, "sequence.mode=chain", "train.resume=auto", forget="ab")
    assert main(["sequence", *two]) == 0
    first = (out / "request_2" / "final" / "model.safetensors").stat().st_mtime_ns
    three = overrides(tiny_model_dir, sets, out, "sequence.mode=chain", "train.resume=auto", forget="abc")
    assert main(["sequence", *three]) == 0
    assert (out / "request_2" / "final" / "model.safetensors").stat().st_mtime_ns == first
    record = json.loads((out / "sequence.json").read_text())
    assert [r["evaluated"] for r in record["requests"]] == [True, True, True]
    assert all(len(row) == 3 and None not in row for row in record["matrix"]["forget_answer_loss"])
    changed = overrides(tiny_model_dir, sets, out, "sequence.mode=chain", "train.resume=auto", forget="acb")
    assert main(["sequence", *changed]) == 2  # request 2's set is not the one it was trained on: refused


@pytest.mark.parametrize(
    ("extra", "forget", "said"),
    [
        ((), "a", "needs two or more unlearning requests in data.forget"),
        (("sequence.mode=undo",), "abc", "sequence.mode must be one of 'chain', 'replay', 'adapters'"),
        (("sequence.mode=adapters", "model.lora.target_modules=wq,wv"), "ab", "has no Linear module named by"),
        (("sequence.mode=adapters", "export.lora=adapter"), "ab", "needs export.lora=merged"),
        (("sequence.replay_share=0",), "ab", "sequence.replay_share must be positive"),
        (("sequence.mode=chain", "sequence.replay_share=0.3"), "ab", "read by sequence.mode=replay only"),
        (("method.task_weights=1,1,1",), "ab", "method.task_weights is set per request by ngdiff sequence"),
        (
            ("data.format=text",),
            "ab",
            "data.format=text sets have no question/answer evaluation: set eval.benchmark=muse",
        ),
        ((), "aba", "names " + "{a} twice (requests 1 and 3)"),
        (("method.combiner=krum",), "ab", "request 1 of the sequence"),
    ],
)
def test_bad_input_is_one_line_before_any_training(tiny_model_dir, sets, tmp_path, capsys, extra, forget, said):
    out = tmp_path / "out"
    assert main(["sequence", *overrides(tiny_model_dir, sets, out, *extra, forget=forget)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ngdiff: config error: ")
    assert said.format(a=sets["a"]) in err
    assert not out.exists()


def test_bad_data_in_the_last_request_is_named_before_the_first_trains(tiny_model_dir, sets, tmp_path, capsys):
    rows = tofu_rows(30)[20:30]
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows[:6], {"question": "Who?", "answer": ""}, *rows[6:]])
    small = write_jsonl(tmp_path / "small.jsonl", rows[:3])
    for third, said in ((bad, f"{bad}"), (small, "holds 3 examples, fewer than train.forget_batch_size=4")):
        out = tmp_path / third.stem
        args = overrides(tiny_model_dir, sets, out, forget="ab")
        args[1] += f",{third}"
        assert main(["sequence", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("ngdiff: error: request 3 of the sequence"), err
        assert said in err
        assert not out.exists()


@pytest.mark.parametrize(("command", "key"), [("train", "sequence.mode=chain"), ("slurm", "sequence.mode=replay")])
def test_sequence_keys_are_refused_by_a_single_run(tiny_model_dir, sets, tmp_path, capsys, command, key):
    args = overrides(tiny_model_dir, sets, tmp_path / "out", key, forget="a")  # the default value too
    slurm = ["slurm", "submit", "--nodes", "1", "--gpus-per-node", "1", "--dry-run"]
    argv = [*slurm, *args] if command == "slurm" else ["train", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sequence.mode is read by `ngdiff sequence` only; a single run (ngdiff train, ngdiff slurm submit)" in err
    assert not (tmp_path / "out").exists()


def test_a_stop_signal_while_scoring_stops_before_the_next_request(tiny_model_dir, sets, tmp_path, monkeypatch):
    from launcher import sequence_cli

    out = tmp_path / "chain"
    args = overrides(tiny_model_dir, sets, out, "sequence.mode=chain", forget="ab")
    score, handler = sequence_cli.evaluate_sets, signal.getsignal(signal.SIGUSR1)

    def signalled(cfg, ctx, model, eval_sets, folder) -> None:
        score(cfg, ctx, model, eval_sets, folder)
        if folder.name == "request_1":  # as Slurm's warning before preemption would, mid-scoring
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(sequence_cli, "evaluate_sets", signalled)
    assert main(["sequence", *args]) == 0
    assert (out / "request_1" / "final").is_dir() and not (out / "request_2").exists()
    assert [r["evaluated"] for r in json.loads((out / "sequence.json").read_text())["requests"]] == [True, False]
    assert signal.getsignal(signal.SIGUSR1) is handler  # the process's handlers as before the sequence
    monkeypatch.setattr(sequence_cli, "evaluate_sets", score)
    assert main(["sequence", *args, "train.resume=auto"]) == 0
    assert [r["evaluated"] for r in json.loads((out / "sequence.json").read_text())["requests"]] == [True, True]


def test_adapters_mode_trains_a_merged_lora_adapter_per_request(tiny_model_dir, sets, tmp_path):
    import yaml

    out = tmp_path / "adapters"
    args = overrides(tiny_model_dir, sets, out, "sequence.mode=adapters", "optim.lr=1.0", forget="ab")
    assert main(["sequence", *args]) == 0
    start = load_file(tiny_model_dir / "model.safetensors")
    for index in (1, 2):
        folder = out / f"request_{index}"
        run = yaml.safe_load((folder / "config.yaml").read_text())
        assert run["model"]["lora"]["enabled"] is True and run["export"]["lora"] == "merged"
        assert not (folder / "final" / "adapter_config.json").exists()  # a whole model the next request loads
        final = final_params(folder)
        assert final.keys() == start.keys()
        # the adapters touch the targeted projections only; the embeddings and norms stay as they were
        changed = {k for k in final if not torch.equal(final[k], start[k])}
        assert changed and all(k.endswith("proj.weight") for k in changed), changed
        assert run["model"]["path"] == (str(tiny_model_dir) if index == 1 else str(out / "request_1" / "final"))
        start = final


def test_the_resume_hint_of_a_stopped_sequence_is_the_same_command_with_resume_auto(monkeypatch):
    from launcher.signals import resume_hint

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["sequence", "cfg.yaml", "sequence.mode=chain", "--overwrite", "train.resume=never"]
    assert (
        resume_hint(argv)
        == "resume with train.resume=auto: ngdiff sequence cfg.yaml sequence.mode=chain train.resume=auto"
    )
