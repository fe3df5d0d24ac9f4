"""One study run on CPU with glibc's malloc defaults and with freed heap kept (ngdiff.host_memory).

    python benchmarks/host_memory.py --study-dir /tmp/bench-study [--config configs/study/default.yaml]
        [--method ngdiff] [--lr 0.0316] [--seed 2] [--repeats 2]

Builds the study's world in --study-dir (or finds it there: the world build is timed once), writes the run's
config exactly as `ngdiff study` would, then runs it `--repeats` times in one fresh one-thread process per
mode, as a study worker runs its runs one after another: first with malloc's defaults, then with
`keep_freed_heap()`. Prints each run's wall, user and system seconds and minor page faults, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# a worker-like process: the same run `repeats` times, each into a fresh folder, with its own costs
CHILD = """
import json, resource, shutil, sys, time
from ngdiff.host_memory import keep_freed_heap
mode, config, out, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "kept":
    assert keep_freed_heap()
from launcher.cli import main
for i in range(repeats):
    shutil.rmtree(out, ignore_errors=True)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    assert main(["train", config, f"output_dir={out}"]) == 0
    after = resource.getrusage(resource.RUSAGE_SELF)
    print("RUN " + json.dumps({"wall": time.perf_counter() - start, "user": after.ru_utime - before.ru_utime,
                               "sys": after.ru_stime - before.ru_stime, "faults": after.ru_minflt - before.ru_minflt}))
"""


def run_config_file(args: argparse.Namespace) -> Path:
    """The world (built now unless cached) and the run's config.yaml, as `ngdiff study` makes them."""
    from ngdiff.config import dump_config
    from ngdiff.study.runner import plan_study, prepare_world, run_config
    from ngdiff.study.spec import RunSpec, load_study

    study_dir = Path(args.study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.config, study_dir / "study.yaml")
    spec = load_study(study_dir / "study.yaml")
    start = time.perf_counter()
    world = prepare_world(plan_study(spec, study_dir), progress=False)
    print(f"world: {time.perf_counter() - start:.1f} s (0 when cached) in {world.folder}")
    method = spec.method(args.method)
    run = RunSpec(method.name, args.lr, args.seed, method.overrides)
    cfg = run_config(spec, run, list(world.overrides), study_dir / "bench_run")
    path = study_dir / "bench_run.yaml"
    path.write_text(dump_config(cfg))
    return path


def measure(mode: str, config: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TOP_PAD_"}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    out = Path(args.study_dir) / f"bench_run_{mode}"
    argv = [sys.executable, "-c", CHILD, mode, str(config), str(out), str(args.repeats)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True, cwd=REPO)
    return [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("RUN ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-dir", required=True)
    parser.add_argument("--config", default=str(REPO / "configs" / "study" / "default.yaml"))
    parser.add_argument("--method", default="ngdiff")
    parser.add_argument("--lr", type=float, default=0.0316)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = run_config_file(args)
    results = {mode: measure(mode, config, args) for mode in ("defaults", "kept")}
    print(f"{args.method} at lr {args.lr:g}, seed {args.seed}: {args.repeats} runs per one-thread process")
    print(f"{'':10} {'run':>3} {'wall s':>8} {'user s':>8} {'sys s':>8} {'faults':>10}")
    for mode, runs in results.items():
        for i, r in enumerate(runs, start=1):
            print(f"{mode:10} {i:3d} {r['wall']:8.1f} {r['user']:8.1f} {r['sys']:8.1f} {r['faults']:10.0f}")
    last = {mode: runs[-1] for mode, runs in results.items()}
    d, k = last["defaults"], last["kept"]
    ratio = k["faults"] / max(d["faults"], 1)
    print(f"kept / defaults (last run): wall {k['wall'] / d['wall']:.2f}, faults {ratio:.4f}")


if __name__ == "__main__":
    main()
