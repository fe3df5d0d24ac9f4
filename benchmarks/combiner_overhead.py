"""Step time of every combiner relative to GDiff, on the 5M model (or the demo's), in one process or per backend.

    python benchmarks/combiner_overhead.py [--model 5m] [--repeats 5] [--steps 4] [--backends single]

Every combiner runs the same `Trainer.unlearning_step` (two backward passes, the Gram all-reduce, its weights
from the k x k Gram matrix, the combination in place, one optimizer step), on the same pre-drawn batches,
interleaved round-robin over `--repeats` rounds; only the weights differ. Reported per combiner: the median
step time, its ratio to `combiner=gdiff` through the same step (the combiner's own cost: the weights), its
ratio to plain GDiff with one combined backward (`gdiff_one` of benchmarks/step_overhead.py: what the step
costs over the cheapest baseline), and the median time of the weights alone on the step's Gram matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.step_overhead import MODELS, Replay, build_inputs, gdiff_step  # noqa: E402


def worker(args) -> None:
    from ngdiff.combiners import get_combiner
    from ngdiff.config import load_config
    from ngdiff.pipeline import build_trainer
    from parallel.distributed import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(timeout_minutes=5)
    cfg = load_config(None, [*args.overrides, "logging.progress=false"])
    trainer = build_trainer(cfg, ctx, max_steps=10**6)
    for task in trainer.tasks:
        task.stream = Replay(task.stream, args.steps)
    combiners = {name: get_combiner(name) for name in args.combiners.split(",")}
    variants = ["gdiff_one", *combiners]
    last_stats = {}

    def run(variant: str, steps: int) -> float:
        for task in trainer.tasks:
            task.stream.rewind()
        trainer.backend.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            if variant == "gdiff_one":
                gdiff_step(trainer, combined=True)
            else:
                trainer.combine = combiners[variant]
                last_stats[variant] = trainer.unlearning_step().stats
                trainer.step_index += 1
        trainer.backend.barrier()
        return (time.perf_counter() - start) / steps

    for variant in variants:  # warm-up: first passes, TorchJD's imports and solvers' first calls
        run(variant, 2)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(run(variant, args.steps))
    weights_s = {}
    for name, combiner in combiners.items():  # the weights alone, on that combiner's last Gram matrix
        calls = []
        for _ in range(20):
            start = time.perf_counter()
            combiner(last_stats[name], trainer.combiner_options)
            calls.append(time.perf_counter() - start)
        weights_s[name] = statistics.median(calls)
    result = {"backend": cfg.parallel.backend, "world_size": ctx.world_size,
              "median_step_s": {v: statistics.median(t) for v, t in times.items()}, "rounds": times,
              "weights_s": weights_s, "load_average": os.getloadavg()}  # fmt: skip
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(result, indent=1))
    if ctx.distributed:
        torch.distributed.destroy_process_group()


def report(results: dict[str, dict]) -> str:
    lines = []
    for backend, r in results.items():
        t, w = r["median_step_s"], r["weights_s"]
        lines += [f"\n{backend} ({r['world_size']} rank(s)); load average at the end "
                  f"{'/'.join(f'{x:.1f}' for x in r['load_average'])}",
                  "| combiner | step ms | / combiner=gdiff | / GDiff one backward | weights alone ms |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name in w:
            lines.append(
                f"| {name} | {1000 * t[name]:.1f} | {t[name] / t['gdiff']:.3f} | {t[name] / t['gdiff_one']:.3f} "
                f"| {1000 * w[name]:.3f} |"
            )
        lines.append(f"| (GDiff one backward) | {1000 * t['gdiff_one']:.1f} | | 1.000 | |")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.launch import add_worker_arguments, run_worker
    from ngdiff.combiners import COMBINERS

    everything = ["gdiff", *sorted(name for name in COMBINERS if name not in ("gdiff", "krum"))]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per combiner")
    parser.add_argument("--steps", type=int, default=4, help="steps per round")
    parser.add_argument("--backends", default="single", help="comma list of single, ddp, fsdp, zero3")
    parser.add_argument("--model", choices=sorted(MODELS), default="5m", help="demo: 1.4M parameters; 5m: 5.2M")
    parser.add_argument("--batch", type=int, default=8, help="forget and retain sequences per step (each)")
    parser.add_argument("--combiners", default=",".join(everything), help="comma list; gdiff is the baseline")
    parser.add_argument("--out", default="", help="also write all results as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if "gdiff" not in args.combiners.split(","):
        args.combiners = "gdiff," + args.combiners
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = build_inputs(root, args.model, "demo", args.batch)
        results = {}
        for backend in args.backends.split(","):
            result = root / f"{backend}.json"
            worker_cmd = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--repeats",
                          str(args.repeats), "--steps", str(args.steps), "--combiners", args.combiners, "--",
                          *overrides, f"parallel.backend={backend}"]  # fmt: skip
            results[backend] = run_worker(backend, 1 if backend == "single" else 2, worker_cmd, result, backend)
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
