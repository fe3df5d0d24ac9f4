"""Peak host memory of every rank through load, one step and export, in units of the model's fp32 size M.

    python benchmarks/load_memory.py [--ranks 4] [--backends fsdp zero3] [--hidden 1024 --layers 10] [--lora]

The driver writes a random Llama (default: hidden 1024, 10 layers, MLP 2816, vocab 32000: 194M
parameters, M = 741 MiB) as an ordinary safetensors model directory, then runs `run_training` (SGD,
one NGDiff step, export of `final/`) on `--ranks` CPU ranks: fsdp under torchrun, zero3 under the
deepspeed launcher. Each rank measures its resident set size: the baseline after process group start
and the import of the libraries and the model's code, then the peak of each phase (load = tokenizer,
data, model build and sharding; step = `Trainer.fit`; export = `Trainer.export`), resetting the
kernel's high-water mark (VmHWM, via /proc/self/clear_refs) between phases.
Printed: (peak - baseline) / M per rank and phase, and the export's own part (its peak minus what the
rank held when the step ended).

With N ranks and SGD the steady state is 3/N M per rank (parameter shard, gradient shard, NGDiff's
retain-gradient stash). Goal (issue 9): every rank but 0 stays <= 1.0 M (fsdp), <= 1.5 M (zero3).

`--lora` trains LoRA adapters (r 8 on every projection) and exports them alone (`export.lora=adapter`):
only the frozen base scales with the model, so a rank should load about 1/N M, and the export, which
writes a few MiB of adapters, should add nothing that scales with M (its own column about 0). The goal
column does not apply (it is a full-weight run's); numbers in docs/lora.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("load", "step", "export")
GOAL = {"fsdp": 1.0, "zero3": 1.5}
LORA = ["model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16", "export.lora=adapter"]


# ------------------------------------------------------------------------------------------ worker
def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def import_model_code(cfg) -> None:
    """Import what the run will import anyway (the model's architecture module, DeepSpeed), so the
    baseline holds the libraries' code (~160 MiB for transformers' Llama) and the phases only data."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(cfg.model.path))]
    if cfg.parallel.backend == "zero3":
        import deepspeed  # noqa: F401


def warm_runtime() -> None:
    """Run the kernels and collectives of a step once on a tiny Llama, so the baseline holds the runtime's
    first-use cost (libtorch code pages faulted in, gloo and thread buffers: ~60-120 MiB per rank whatever
    the model size) and the phases only what scales with the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1))  # fmt: skip
    ids = torch.randint(0, 512, (1, 64))
    tiny(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(tiny.parameters(), lr=0.1).step()
    probe = torch.ones(1 << 16)
    for src in range(torch.distributed.get_world_size()):
        torch.distributed.broadcast(probe, src)
        torch.distributed.reduce(probe, src)
    torch.distributed.all_reduce(probe)
    del tiny, ids, probe


def worker(spec_path: str) -> None:
    import torch

    from ngdiff.config import load_config
    from ngdiff.pipeline import run_training
    from parallel.distributed import init_distributed, shutdown_distributed

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    ctx = init_distributed(timeout_minutes=30)
    cfg = load_config(None, spec["overrides"])
    import_model_code(cfg)
    if spec.get("warm", True):
        warm_runtime()
    torch.distributed.barrier()
    baseline = rss_kib("VmRSS")
    record = {"rank": ctx.rank, "baseline_kib": baseline, "reset_works": reset_peak(), "peak_kib": {}, "seconds": {}}
    record["marks"] = []  # (label, peak since the previous mark, RSS now): where inside a phase the peak is
    started, phase_peak = [time.perf_counter()], [0]

    def mark(label: str) -> None:
        peak = rss_kib("VmHWM")
        record["marks"].append((label, peak, rss_kib("VmRSS")))
        phase_peak[0] = max(phase_peak[0], peak)
        reset_peak()

    def close_phase(name: str) -> None:
        mark(name)
        record["peak_kib"][name], phase_peak[0] = phase_peak[0], 0
        record.setdefault("end_kib", {})[name] = rss_kib("VmRSS")
        record["seconds"][name] = time.perf_counter() - started[0]
        started[0] = time.perf_counter()

    def hooks(trainer) -> None:
        close_phase("load")
        fit, export, accumulate = trainer.fit, trainer.export, trainer.accumulate

        def timed_fit():
            results = fit()
            close_phase("step")
            return results

        def timed_export(directory):
            export(directory)
            close_phase("export")

        def marked_accumulate(objective, batches):
            out = accumulate(objective, batches)
            mark("backward")  # retain, then forget: the peak up to the end of each backward
            return out

        trainer.fit, trainer.export, trainer.accumulate = timed_fit, timed_export, marked_accumulate

    run_training(cfg, ctx, on_trainer=hooks)
    Path(spec["out"], f"rank{ctx.rank}.json").write_text(json.dumps(record))
    shutdown_distributed()


# ------------------------------------------------------------------------------------------ driver
def build_model(directory: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """A random Llama with a small local BPE tokenizer (token ids < vocab); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ngdiff import TOFU_DIR
    from ngdiff.modeling import train_tokenizer

    with open(TOFU_DIR / "full.jsonl") as f:
        texts = [" ".join(json.loads(line).values()) for _, line in zip(range(400), f, strict=False)]
    tokenizer = train_tokenizer(texts, 2000)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def launch(backend: str, ranks: int, spec: Path, log: Path, timeout: float) -> None:
    """The worker on `ranks` ranks (torchrun, or the deepspeed launcher for zero3), its output to `log`."""
    from benchmarks.launch import launcher_prefix, worker_env

    env = worker_env(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    with open(log, "w") as f:
        proc = subprocess.run([*launcher_prefix(backend, ranks), __file__, "--worker", str(spec)], stdout=f,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{backend}: exited with {proc.returncode}\n{log.read_text()[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--backends", nargs="+", default=["fsdp", "zero3"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra config overrides for every run")
    parser.add_argument("--timeout", type=float, default=3000)
    parser.add_argument("--cold", action="store_true", help="baseline before the runtime first runs (warm_runtime)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters, export the adapters alone")
    parser.add_argument("--work", default="", help="folder to keep the model and runs in (default: a temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()  # the deepspeed launcher appends --local_rank
    if args.worker:
        return worker(args.worker)

    work = Path(args.work or tempfile.mkdtemp(prefix="load_memory_"))
    model_dir = work / "model"
    params = build_model(model_dir, args.hidden, args.layers, args.intermediate, args.vocab)
    m_kib = params * 4 / 1024
    from ngdiff import TOFU_DIR

    lines = (TOFU_DIR / "full.jsonl").read_text().splitlines(keepends=True)
    forget, retain = work / "forget.jsonl", work / "retain.jsonl"
    forget.write_text("".join(lines[:16]))
    retain.write_text("".join(lines[40:64]))
    lora = ", LoRA adapters exported alone" if args.lora else ""
    size = f"{params / 1e6:.1f}M parameters, M = fp32 size = {m_kib / 1024:.0f} MiB"
    print(f"model: {size}; {args.ranks} CPU ranks{lora}")
    rows_out = []
    for backend in args.backends:
        out = work / backend
        out.mkdir(parents=True, exist_ok=True)
        overrides = [f"model.path={model_dir}", f"data.forget={forget}", f"data.retain={retain}",
                     "data.max_length=64", "train.max_steps=1", f"train.forget_batch_size={args.ranks}",
                     f"train.retain_batch_size={args.ranks}", "optim.name=sgd", "optim.lr=1e-4",
                     "autolr.enabled=false", "logging.progress=false", f"parallel.backend={backend}",
                     f"output_dir={out / 'run'}", *(LORA if args.lora else []), *args.overrides]  # fmt: skip
        spec = out / "spec.json"
        spec.write_text(json.dumps({"overrides": overrides, "out": str(out), "warm": not args.cold}))
        began = time.perf_counter()
        launch(backend, args.ranks, spec, out / "launch.log", args.timeout)
        wall = time.perf_counter() - began
        for rank in range(args.ranks):
            r = json.loads((out / f"rank{rank}.json").read_text())
            extra = {p: (r["peak_kib"][p] - r["baseline_kib"]) / m_kib for p in PHASES}
            # what the export itself adds on top of what the rank held when the step ended
            extra["export_own"] = (r["peak_kib"]["export"] - r["end_kib"]["step"]) / m_kib
            rows_out.append((backend, rank, r["baseline_kib"] / 1024, extra, r["seconds"], r["reset_works"]))
            if rank == 1:
                marks = ", ".join(f"{label} {(peak - r['baseline_kib']) / m_kib:.2f}" for label, peak, _ in r["marks"])
                print(f"{backend} rank 1, peak (M) up to each mark: {marks}")
        print(f"{backend}: {wall:.0f} s wall")
    print("\n| backend | rank | baseline MiB | load (M) | step (M) | export (M) | export's own (M) | max (M) | goal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend, rank, base, extra, _, reset in rows_out:
        worst = max(extra[p] for p in PHASES)
        goal = "rank 0" if rank == 0 else ("met" if worst <= GOAL[backend] else f"MISSED (> {GOAL[backend]})")
        goal = "-" if args.lora else goal  # the goal is a full-weight run's; LoRA's load and export: see the docs
        note = "" if reset else " (no VmHWM reset: cumulative)"
        print(f"| {backend} | {rank} | {base:.0f} | {extra['load']:.2f} | {extra['step']:.2f} | "
              f"{extra['export']:.2f} | {extra['export_own']:.2f} | {worst:.2f} | {goal}{note} |")  # fmt: skip
    (work / "result.json").write_text(json.dumps(rows_out, indent=1))
    print(f"\nresults and logs under {work}")


if __name__ == "__main__":
    main()
