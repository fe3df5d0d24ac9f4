"""The trainer on one process: the exact NGDiff update, accumulation, logging, resume, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.cli import main
from ngdiff.config import load_config
from ngdiff.data import TaskStream, encode_task
from ngdiff.metrics_log import read_jsonl
from ngdiff.modeling import load_tokenizer
from ngdiff.objectives import NLL
from ngdiff.pipeline import run_training
from parallel.base import DistContext
from tests.conftest import stop_requested_in_step, tiny_run_overrides, tofu_rows, write_jsonl


def config(tiny_model_dir, tofu_split, out, *extra):
    return load_config(None, tiny_run_overrides(tiny_model_dir, tofu_split, f"output_dir={out}", *extra))


def first_global_batch(cfg, tokenizer, source: str, seed: int):
    examples = encode_task(cfg.data, tokenizer, source, "x")
    stream = TaskStream(
        examples, 4, rank=0, world_size=1, micro_batch=0, seed=seed, pad_id=tokenizer.pad_token_id, name="x"
    )
    return stream.next()[0]


def test_one_ngdiff_sgd_step_is_the_formula(tiny_model_dir, tofu_split, tmp_path):
    lr = 0.05
    cfg = config(tiny_model_dir, tofu_split, tmp_path / "run", "optim.name=sgd", f"optim.lr={lr}", "train.max_steps=1")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]

    def mean_nll_grad(batch):
        loss = NLL().loss_sum(model, batch) / NLL().count(batch)
        return torch.autograd.grad(loss, params)

    g_r = mean_nll_grad(first_global_batch(cfg, tokenizer, cfg.data.retain[0], cfg.train.seed + 1))
    g_f = mean_nll_grad(first_global_batch(cfg, tokenizer, cfg.data.forget[0], cfg.train.seed))
    norm_r = torch.sqrt(sum((g * g).sum() for g in g_r))
    norm_f = torch.sqrt(sum((g * g).sum() for g in g_f))
    expected = [p.detach() - lr * (gr / norm_r - gf / norm_f) for p, gr, gf in zip(params, g_r, g_f, strict=True)]

    outcome = run_training(cfg, DistContext())
    got = [p.detach() for p in outcome.trainer.backend.model.parameters() if p.requires_grad]
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True)) < 1e-6
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["grad_norm_retain"] == pytest.approx(float(norm_r), rel=1e-5)
    assert row["grad_norm_forget"] == pytest.approx(float(norm_f), rel=1e-5)
    assert row["w_retain"] == pytest.approx(1 / float(norm_r), rel=1e-5)
    assert row["w_forget"] == pytest.approx(-1 / float(norm_f), rel=1e-5)
    cos = sum((a * b).sum() for a, b in zip(g_r, g_f, strict=True)) / (norm_r * norm_f)
    assert row["cos_retain_forget"] == pytest.approx(float(cos), rel=1e-4, abs=1e-6)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # safetensors, loadable
    torch.testing.assert_close(dict(final.named_parameters())["lm_head.weight"], got[-1])


def final_params(outcome) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in outcome.trainer.backend.model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("combiner", ["ngdiff", "mgda"])
def test_micro_batches_accumulate_exactly(tiny_model_dir, tofu_split, tmp_path, combiner):
    runs = []
    for micro in (0, 1):
        cfg = config(
            tiny_model_dir,
            tofu_split,
            tmp_path / f"m{micro}",
            "optim.name=adamw",
            "optim.lr=1e-3",
            "train.max_steps=3",
            f"train.micro_batch_size={micro}",
            f"method.combiner={combiner}",
        )
        runs.append(final_params(run_training(cfg, DistContext())))
    assert max_diff(*runs) < 1e-5


def test_autolr_metrics_and_gradient_ascent_without_retain(tiny_model_dir, tofu_split, tmp_path):
    cfg = config(
        tiny_model_dir,
        tofu_split,
        tmp_path / "a",
        "train.max_steps=5",
        "autolr.enabled=true",
        "autolr.every=2",
        "optim.lr=1e-3",
    )
    run_training(cfg, DistContext())
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert {"autolr/probe_loss_-1", "autolr/probe_loss_+0", "autolr/probe_loss_+1", "autolr/A"} <= set(rows[0])
    assert "autolr/A" not in rows[1] and "autolr/A" in rows[2]  # steps 0, 2, 4 (0-based) probe
    assert all(-1 <= r["cos_retain_forget"] <= 1 for r in rows)
    ga = config(
        tiny_model_dir,
        tofu_split,
        tmp_path / "ga",
        "method.combiner=ga",
        "method.retain_objective=none",
        "train.max_steps=3",
        "optim.name=sgd",
        "optim.lr=0.5",
    )
    ga_rows = [r for r in (run_training(ga, DistContext()).results)]
    assert all(r.weights == (0.0, -1.0) for r in ga_rows)
    assert ga_rows[-1].loss_forget > ga_rows[0].loss_forget  # ascent raises the forget loss


def test_npo_and_kl_objectives_run_with_a_reference(tiny_model_dir, tofu_split, tmp_path):
    cfg = config(
        tiny_model_dir,
        tofu_split,
        tmp_path / "npo",
        "method.forget_objective=npo",
        "method.retain_objective=kl",
        "train.max_steps=2",
        "optim.lr=1e-3",
    )
    results = run_training(cfg, DistContext()).results
    first = results[0]
    assert first.loss_retain == pytest.approx(0.0, abs=1e-6)  # KL to itself at the start
    assert first.loss_forget == pytest.approx(
        2 / 0.1 * torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), rel=1e-5
    )  # log ratio 0 at the start: (2/beta) log sigmoid(0)


def test_stop_request_checkpoints_and_resume_matches_an_uninterrupted_run(tiny_model_dir, tofu_split, tmp_path):
    extra = (
        "train.max_steps=6",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "autolr.enabled=true",
        "autolr.every=2",
        "method.combiner=rlw",
    )
    straight = final_params(run_training(config(tiny_model_dir, tofu_split, tmp_path / "s", *extra), DistContext()))

    first = run_training(
        config(tiny_model_dir, tofu_split, tmp_path / "r", *extra), DistContext(), on_trainer=stop_requested_in_step(2)
    )
    assert first.trainer.step_index == 3 and first.final_dir is None
    assert (tmp_path / "r" / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    (tmp_path / "r" / "checkpoints" / ".step_00000005.partial").mkdir()  # a crash mid-save is ignored
    resumed = run_training(
        config(tiny_model_dir, tofu_split, tmp_path / "r", *extra, "train.resume=auto"), DistContext()
    )
    assert resumed.trainer.step_index == 6
    assert max_diff(straight, final_params(resumed)) < 1e-6
    steps = [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cli_trains_text_data_from_overrides_only(tiny_model_dir, tmp_path):
    rows = tofu_rows(24)
    forget = write_jsonl(tmp_path / "f.jsonl", [{"text": r["answer"]} for r in rows[:8]])
    retain = write_jsonl(tmp_path / "r.jsonl", [{"text": r["answer"]} for r in rows[8:]])
    out = tmp_path / "out"
    code = main(
        [
            "train",
            f"model.path={tiny_model_dir}",
            "data.format=text",
            f"data.forget={forget}",
            f"data.retain={retain}",
            "method.combiner=ngdiff",
            "optim.name=sgd",
            "optim.lr=0.01",
            "train.max_steps=2",
            "train.forget_batch_size=4",
            "train.retain_batch_size=4",
            "logging.progress=false",
            f"output_dir={out}",
        ]
    )
    assert code == 0
    exported = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in start.items()}
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert any(not torch.equal(exported[k], start[k]) for k in start), "two SGD steps left the model unchanged"
    assert load_tokenizer(str(out / "final")).bos_token == "<s>"
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert "method" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["optim.lr=-1"], "optim.lr must be positive"),
        (["train.forget_batch_size=64"], "the forget set holds 16 examples, fewer than train.forget_batch_size=64"),
        (["data.max_length=3"], "data.max_length=3 leaves record 1 "),
        (["parallel.backend=nccl"], "unknown parallel.backend 'nccl'"),
    ],
)
def test_cli_reports_bad_input_in_one_line(tiny_model_dir, tofu_split, tmp_path, capsys, args, message):
    code = main(
        [
            "train",
            f"model.path={tiny_model_dir}",
            f"data.forget={tofu_split['forget']}",
            f"data.retain={tofu_split['retain']}",
            f"output_dir={tmp_path / 'o'}",
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "final").exists()


def test_cli_refuses_an_output_dir_with_another_run(tiny_model_dir, tofu_split, tmp_path, capsys):
    base = [
        "train",
        f"model.path={tiny_model_dir}",
        f"data.forget={tofu_split['forget']}",
        f"data.retain={tofu_split['retain']}",
        f"output_dir={tmp_path / 'o'}",
        "train.max_steps=1",
        "train.forget_batch_size=4",
        "train.retain_batch_size=4",
        "logging.progress=false",
    ]
    assert main(base) == 0
    assert main([*base, "optim.lr=0.1"]) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert main([*base, "optim.lr=0.1", "--overwrite"]) == 0


def test_metrics_log_step_time_throughput_and_peak_memory(tiny_model_dir, tofu_split, tmp_path):
    from ngdiff.metrics_log import peak_memory_mb

    cfg = config(tiny_model_dir, tofu_split, tmp_path / "run", "train.max_steps=2", "autolr.enabled=false")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    retain = first_global_batch(cfg, tokenizer, cfg.data.retain[0], cfg.train.seed + 1)
    forget = first_global_batch(cfg, tokenizer, cfg.data.forget[0], cfg.train.seed)
    first_step_tokens = int(retain["attention_mask"].sum() + forget["attention_mask"].sum())
    rss_before = peak_memory_mb("cpu")
    run_training(cfg, DistContext())
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["step_seconds"] > 0
        assert rss_before <= row["peak_memory_mb"] <= peak_memory_mb("cpu")
    # both tasks' non-padding input tokens over the step's wall time
    assert rows[0]["tokens_per_second"] * rows[0]["step_seconds"] == pytest.approx(first_step_tokens, rel=1e-9)
    assert rows[0]["peak_memory_mb"] <= rows[1]["peak_memory_mb"]
