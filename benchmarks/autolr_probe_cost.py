"""Step time with AutoLR every 4 steps, probing a fresh batch vs the step's own batch, against no AutoLR.

    python benchmarks/autolr_probe_cost.py --demo /tmp/autolr/demo [--rounds 6]

One process, the demo's fine-tuned model and splits (`ngdiff demo`), NGDiff + AdamW, 8 forget + 8
retain per step, max length 128. The three modes run interleaved in rounds of 8 steps (two AutoLR
steps each) on the same trainer, so machine load hits them alike; prints the median wall-clock and
process-CPU ratio of each AutoLR mode to no AutoLR. (`benchmarks/step_overhead.py` times the default
mode per backend; this isolates what `autolr.probe_batch` changes.)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("off", "fresh", "step")


class _Measured(Exception):
    """Stops the training loop once the trainer has been timed."""


def main() -> None:
    from ngdiff.config import load_config
    from ngdiff.pipeline import run_training
    from parallel.base import DistContext

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="output folder of `ngdiff demo`")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/autolr/probe_cost"))
    args = parser.parse_args()
    cfg = load_config(
        None,
        [
            f"model.path={args.demo / 'finetuned'}",
            f"data.forget={args.demo / 'data' / 'forget.jsonl'}",
            f"data.retain={args.demo / 'data' / 'retain.jsonl'}",
            "data.max_length=128",
            "optim.name=adamw",
            "optim.lr=1e-5",
            "autolr.enabled=true",
            "autolr.every=4",
            "train.max_steps=1",
            "train.forget_batch_size=8",
            "train.retain_batch_size=8",
            "logging.progress=false",
            f"output_dir={args.out_dir}",
        ],
    )

    def measure(trainer) -> None:
        wall: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                trainer.cfg.autolr.enabled = mode != "off"
                trainer.cfg.autolr.probe_batch = "step" if mode == "off" else mode
                w, c = time.perf_counter(), time.process_time()
                for index in range(8):
                    trainer.step_index = index
                    trainer.unlearning_step()
                wall[mode].append(time.perf_counter() - w)
                cpu[mode].append(time.process_time() - c)
        base_wall, base_cpu = statistics.median(wall["off"]), statistics.median(cpu["off"])
        print(f"no AutoLR: {1000 * base_wall / 8:.1f} ms/step (wall)")
        for mode in MODES[1:]:
            print(
                f"AutoLR every 4, probe_batch={mode}: wall {statistics.median(wall[mode]) / base_wall:.3f}x, "
                f"cpu {statistics.median(cpu[mode]) / base_cpu:.3f}x"
            )
        raise _Measured

    with contextlib.suppress(_Measured):
        run_training(cfg, DistContext(), on_trainer=measure)


if __name__ == "__main__":
    main()
