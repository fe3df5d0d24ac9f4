"""Peak memory and step time of a LoRA NPO + NGDiff step against the full-parameter step, on CPU.

    python benchmarks/lora_step.py [--model 5m] [--steps 8] [--out docs/lora_step.json]

Builds a small Llama (`step_overhead.MODELS`), then runs the real pipeline (`run_training`: NPO forget
objective, NLL retain, NGDiff, AdamW, AutoLR every 4 steps) once per (backend, LoRA on/off), each in
its own launch so peak RSS is per run: `single` in one process, `fsdp` on 2 ranks under torchrun. It
reports the median time of `Trainer.unlearning_step` (the first two steps dropped), the trainable
parameters, the engine's model state per rank (parameters + gradients + optimizer state) and the peak
RSS per rank. Full training's NPO reference is a second (frozen) model; LoRA's is the same model with
adapters disabled.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.launch import add_worker_arguments, run_worker  # noqa: E402
from benchmarks.step_overhead import build_inputs, optimizer_state_bytes, tensor_bytes  # noqa: E402

LORA = ["model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16"]
COMMON = ["method.forget_objective=npo", "method.combiner=ngdiff", "autolr.enabled=true", "autolr.every=4"]


def worker(args) -> None:
    import torch

    from ngdiff.config import load_config
    from ngdiff.pipeline import run_training
    from parallel.distributed import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(timeout_minutes=5)
    cfg = load_config(None, [*args.overrides, "logging.progress=false", f"train.max_steps={args.steps}"])
    times: list[float] = []
    memory: dict[str, float] = {}

    def timed(trainer) -> None:
        step = trainer.unlearning_step

        def run():
            start = time.perf_counter()
            result = step()
            times.append(time.perf_counter() - start)
            backend = trainer.backend
            memory["state_mb"] = (
                tensor_bytes(backend.local_params())
                + tensor_bytes(g for g in backend.local_grads())
                + optimizer_state_bytes(backend.optimizer)
            ) / 2**20
            return result

        trainer.unlearning_step = run

    outcome = run_training(cfg, ctx, on_trainer=timed)
    backend = outcome.trainer.backend
    trainable = sum(p.numel() for p in backend.module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in backend.module.parameters() if not p.requires_grad)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"step_ms": 1000 * statistics.median(times[2:]), "peak_rss_mb": peak, **memory}
    result.update(trainable=trainable, frozen=frozen)
    gathered = [None] * ctx.world_size
    if ctx.distributed:
        torch.distributed.all_gather_object(gathered, result)
    else:
        gathered = [result]
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(gathered, indent=1))


def launch(backend: str, overrides: list[str], root: Path, name: str, steps: int) -> list[dict]:
    result = root / f"{name}.json"
    worker = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--steps", str(steps), "--",
              *overrides, f"parallel.backend={backend}", f"output_dir={root / name}"]  # fmt: skip
    return run_worker(backend, 2, worker, result, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    parser.add_argument("--model", default="5m", choices=["demo", "5m"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = build_inputs(root, args.model)
        for backend in ("single", "fsdp"):
            for label, extra in (("full", []), ("lora", LORA)):
                name = f"{backend}_{label}"
                results[name] = launch(backend, [*inputs, *COMMON, *extra], root, name, args.steps)
    print("| backend | ranks | training | trainable params | step ms | trainable state MB/rank | peak RSS MB/rank |")
    print("|---|---|---|---|---|---|---|")
    for name, ranks in results.items():
        backend, label = name.split("_")
        first = ranks[0]
        rss = "/".join(f"{r['peak_rss_mb']:.0f}" for r in ranks)
        print(
            f"| {backend} | {len(ranks)} | {label} | {first['trainable']:,} | {first['step_ms']:.1f} | "
            f"{first['state_mb']:.2f} | {rss} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
