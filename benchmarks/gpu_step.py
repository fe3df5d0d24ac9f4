"""NGDiff against GDiff on one GPU: step time, tokens/s, model-FLOP utilisation and peak memory.

    python benchmarks/gpu_step.py                  # ~1.1B Llama, bf16, single and fsdp (world size 1)
    python benchmarks/gpu_step.py --tiny           # the same code path in seconds on CPU (a smoke test)

The model is a Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 key/value heads,
intermediate 5632, vocab 32000), randomly initialised from a config: nothing is downloaded. Data are
TOFU text records long enough that every sequence is exactly `--seq-len` tokens. Per backend, the
two variants run interleaved, `--rounds` rounds of `--steps` steps after `--warmup` steps each:
  ngdiff     the project's `Trainer.unlearning_step` (retain backward, stash, forget backward, Gram
             all-reduce, in-place combination, AdamW step)
  gdiff_one  GDiff as one combined backward of c0 * L_R - (1 - c0) * L_F (the cheapest baseline)
MFU = model FLOPs per step / step time / the GPU's peak dense bf16 FLOP/s, with model FLOPs
= 6 N T + 12 L h s T (PaLM, appendix B; N the non-embedding parameters plus the head, T tokens per
step, s the sequence length). Peak memory is `torch.cuda.max_memory_allocated` over a variant's rounds,
printed next to `ngdiff plan`'s prediction for the same run. Goals on an H100: NGDiff / GDiff <= 1.10,
MFU >= 40%. The whole run takes about 3 minutes on an H100 (most of it building the model twice).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2000, tie_word_embeddings=False)  # fmt: skip
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, SXM where both exist
VARIANTS = ("ngdiff", "gdiff_one")


def model_flops_per_step(shape, tokens: int, seq_len: int) -> float:
    """6 N T + 12 L h s T, N without the input embedding (a lookup, no FLOPs)."""
    dense = shape.params - shape.vocab * shape.hidden
    return 6.0 * dense * tokens + 12.0 * shape.layers * shape.hidden * seq_len * tokens


def peak_tflops(device, given: float) -> float:
    import torch

    if given:
        return given
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def run_backend(backend_name: str, overrides: list[str], model: dict, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.step_overhead import gdiff_step
    from ngdiff.config import load_config
    from ngdiff.memory_plan import model_shape, plan, settings_from_config
    from ngdiff.pipeline import build_trainer
    from parallel.distributed import init_distributed, shutdown_distributed

    cfg = load_config(None, [*overrides, f"parallel.backend={backend_name}"])
    ctx = init_distributed()
    hf_config = LlamaConfig(**model)

    def build():
        torch.manual_seed(0)
        with torch.device(ctx.device):  # initialise on the GPU: a 1B model's CPU init takes minutes
            return AutoModelForCausalLM.from_config(hf_config)

    cuda = ctx.device.type == "cuda"
    trainer = build_trainer(cfg, ctx, max_steps=10**6, build_model=build)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(ctx.device)

    def run(variant: str, steps: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            if variant == "ngdiff":
                trainer.unlearning_step()
            else:
                gdiff_step(trainer, combined=True)
        sync()
        return (time.perf_counter() - start) / steps

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, int] = {}
    for variant in VARIANTS:
        run(variant, args.warmup)
    for _ in range(args.rounds):
        for variant in VARIANTS:
            if cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            times[variant].append(run(variant, args.steps))
            if cuda:
                peaks[variant] = max(peaks.get(variant, 0), torch.cuda.max_memory_allocated(ctx.device))
    shape = model_shape(hf_config)
    predicted = plan(shape, settings_from_config(cfg, 1), 2**50).total_bytes
    tokens = (cfg.train.forget_batch_size + cfg.train.retain_batch_size) * cfg.data.max_length
    flops = model_flops_per_step(shape, tokens, cfg.data.max_length)
    peak = peak_tflops(ctx.device, args.peak_tflops)
    result = {"backend": backend_name, "device": torch.cuda.get_device_name(ctx.device) if cuda else "cpu",
              "parameters": shape.params, "tokens_per_step": tokens, "model_tflop_per_step": flops / 1e12,
              "peak_tflops": peak, "rounds_s": times, "planned_bytes": predicted}  # fmt: skip
    for variant, values in times.items():
        seconds = statistics.median(values)
        result[variant] = {
            "step_s": seconds,
            "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / (peak * 1e12) if peak else None,
            "peak_memory_bytes": peaks.get(variant),
        }
    result["ngdiff_over_gdiff"] = result["ngdiff"]["step_s"] / result["gdiff_one"]["step_s"]
    shutdown_distributed()
    return result


def free_device_memory() -> None:
    """Drop the finished backend's model and optimizer before the next one is built."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(results: list[dict]) -> str:
    lines = ["| backend | variant | step s | tokens/s | MFU | peak GPU memory GiB | planned GiB | NGDiff / GDiff |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for variant in VARIANTS:
            v = r[variant]
            mfu = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "n/a"
            memory = f"{v['peak_memory_bytes'] / 2**30:.2f}" if v["peak_memory_bytes"] else "n/a"
            planned = f"{r['planned_bytes'] / 2**30:.2f}" if variant == "ngdiff" else ""
            ratio = f"{r['ngdiff_over_gdiff']:.3f}" if variant == "ngdiff" else ""
            lines.append(f"| {r['backend']} | {variant} | {v['step_s']:.3f} | {v['tokens_per_s']:.0f} | {mfu} "
                         f"| {memory} | {planned} | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU, fp32: exercises the code path")
    parser.add_argument("--backends", default="single,fsdp")
    parser.add_argument("--batch", type=int, default=8, help="forget and retain sequences per step (each)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak dense bf16 TFLOP/s (default: by name)")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.gradient_checkpointing=true")
    args = parser.parse_args(argv)
    model = TINY if args.tiny else LLAMA_1B
    if args.tiny:
        args.batch, args.seq_len, args.warmup, args.steps, args.rounds = 2, 32, 1, 1, 1
    from benchmarks.plan_check import build_inputs

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        common = build_inputs(Path(tmp), args.seq_len, model)
        common += [f"train.forget_batch_size={args.batch}", f"train.retain_batch_size={args.batch}",
                   f"train.precision={'fp32' if args.tiny else 'bf16'}", *args.overrides]  # fmt: skip
        for backend in args.backends.split(","):
            results.append(run_backend(backend, common, model, args))
            print(json.dumps(results[-1]), flush=True)
            free_device_memory()
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
