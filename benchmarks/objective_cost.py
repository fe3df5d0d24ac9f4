"""Step time of each forget/retain objective relative to GDiff's NLL, one process, the same model and batches.

    python benchmarks/objective_cost.py [--model 5m] [--repeats 5] [--steps 4] [--objectives wga,rmu] [--out F]

Builds one trainer per objective (combiner gdiff, SGD) on the model of benchmarks/step_overhead.py
(`--model 5m`: hidden 256, 4 layers, 5.2M parameters), pre-draws the same batches for all of them, and
times `Trainer.unlearning_step` interleaved round-robin over `--repeats` rounds of `--steps` steps. It
reports the median CPU seconds per step (one torch thread: CPU time does not count the waits for cores
that other processes hold) and its ratio to `nll` (plain GDiff: NLL forget, NLL retain).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> overrides; the first is the baseline. DPO costs what IdkDPO costs (it reads its alternate from
# the records instead of the refusal file), so only idkdpo is timed
OBJECTIVES = {
    "nll": [],
    "npo": ["method.forget_objective=npo"],
    "simnpo": ["method.forget_objective=simnpo"],
    "idk": ["method.forget_objective=idk"],
    "kl_retain": ["method.retain_objective=kl"],
    "idkdpo": ["method.forget_objective=idkdpo"],
    "wga": ["method.forget_objective=wga"],
    "satimp": ["method.forget_objective=satimp"],
    "undial": ["method.forget_objective=undial"],
    "ceu": ["method.forget_objective=ceu"],
    "pdu": ["method.forget_objective=pdu"],
    "rmu": ["method.forget_objective=rmu", "method.retain_objective=rmu", "method.rmu_layer=model.layers.2"],
}


def main() -> None:
    from benchmarks.step_overhead import MODELS, Replay, build_inputs
    from ngdiff.config import load_config
    from ngdiff.pipeline import build_trainer
    from parallel.base import DistContext

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="5m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="forget and retain sequences per step (each)")
    parser.add_argument("--objectives", default="", help="comma list (default: all); nll is always timed")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    chosen = {"nll", *(args.objectives.split(",") if args.objectives else OBJECTIVES)}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        common = build_inputs(Path(tmp), args.model, batch=args.batch)
        trainers = {}
        for name, overrides in OBJECTIVES.items():
            if name in chosen:
                extra = ["method.combiner=gdiff", "optim.name=sgd", "optim.lr=1e-4", "logging.progress=false"]
                cfg = load_config(None, [*common, *extra, *overrides])
                trainer = build_trainer(cfg, DistContext(), max_steps=10**6)
                for task in trainer.tasks:
                    task.stream = Replay(task.stream, args.steps)
                trainers[name] = trainer

        def run(trainer, steps: int) -> float:
            for task in trainer.tasks:
                task.stream.rewind()
            start = time.process_time()
            for _ in range(steps):
                trainer.unlearning_step()
            return (time.process_time() - start) / steps

        for trainer in trainers.values():  # warm-up
            run(trainer, 1)
        rounds: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                rounds[name].append(run(trainer, args.steps))
    median = {name: statistics.median(r) for name, r in rounds.items()}
    lines = ["| objective | CPU ms / step | relative to GDiff (nll) |", "|---|---|---|"]
    lines += [f"| {name} | {1000 * s:.1f} | {s / median['nll']:.2f} |" for name, s in median.items()]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"median_cpu_s": median, "rounds": rounds, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
