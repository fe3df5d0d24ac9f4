"""`ngdiff plan`'s prediction against the measured peak memory of real NGDiff steps on CPU.

    python benchmarks/plan_check.py [--backends single,fsdp,zero3] [--ranks 2] [--out docs/plan_check.json]

A Llama of 134M parameters (hidden 768, 12 layers, intermediate 2048, vocab 32000; random init from a
config, no weights read) runs the project's own step (`Trainer.unlearning_step`: two backward passes,
the stash, the Gram all-reduce, AdamW) on `single` (one process), `fsdp` (torchrun) and `zero3`
(deepspeed launcher), gloo, 1 torch thread per rank, every sequence exactly `max_length` tokens.

Measured per rank: the peak resident set (VmHWM) over the timed steps minus the resident set of the
process before the model was built (Python, torch, transformers, DeepSpeed and the process group: the
runtime a GPU run does not put on the GPU). The high-water mark is reset (`/proc/self/clear_refs`)
after one warm-up step, so loading peaks are excluded, as they are from the planner, which models the
steady state of a step. Workers run with `MALLOC_MMAP_THRESHOLD_=65536` so that glibc returns each freed
tensor to the OS (`--glibc-heap` keeps the default, under which the heap retains freed gradient and
gather buffers and the resident set overstates live memory: by half again under fsdp and zero3).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Return freed heap to the OS, then restart the high-water mark at the current resident set."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


class PhaseTrace:
    """Peak resident set per phase of the step, sampled every 10 ms by a thread (`--trace`)."""

    def __init__(self):
        import threading

        self.phase, self.peaks, self.stop = "setup", {}, False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.stop:
            rss = rss_kib("VmRSS") / 1024
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            time.sleep(0.01)

    def wrap(self, owner, name: str, label) -> None:
        inner = getattr(owner, name)

        def traced(*a, **k):
            self.phase = label(*a) if callable(label) else label
            try:
                return inner(*a, **k)
            finally:
                self.phase = f"after {self.phase}"

        setattr(owner, name, traced)


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    from ngdiff.config import load_config
    from ngdiff.pipeline import build_trainer
    from parallel.distributed import init_distributed

    cfg = load_config(None, args.overrides)
    if cfg.parallel.backend == "zero3":
        import deepspeed  # noqa: F401  (its import is runtime, not model memory)
    from transformers import AutoModelForCausalLM, LlamaConfig

    ctx = init_distributed(timeout_minutes=20)
    measured = {}

    def build():
        """The baseline is taken here: tokenizer, data and engine exist, the model does not yet."""
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        measured["baseline"] = rss_kib("VmRSS")
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(LlamaConfig(**MODEL))

    trainer = build_trainer(cfg, ctx, max_steps=100, build_model=build)
    backend, baseline = trainer.backend, measured["baseline"]
    trainer.unlearning_step()  # warm-up: optimizer state exists from here on
    trace = None
    if args.trace:
        trace = PhaseTrace()
        role = {id(task.objective): task.role for task in trainer.tasks}
        trace.wrap(trainer, "accumulate", lambda objective, _: role[id(objective)])
        trace.wrap(backend, "step", "optimizer step")
    reset_peak()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.unlearning_step()
    seconds = (time.perf_counter() - start) / args.steps
    row = {"rank": ctx.rank, "baseline_mib": baseline / 1024, "peak_mib": rss_kib("VmHWM") / 1024, "step_s": seconds}
    if trace is not None:
        trace.stop = True
        row["phase_peaks_mib"] = trace.peaks
    rows = [row]
    if ctx.distributed:
        rows = [None] * ctx.world_size
        torch.distributed.all_gather_object(rows, row)
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(rows))
    if ctx.distributed:
        torch.distributed.destroy_process_group()


def build_inputs(root: Path, max_length: int, model: dict = MODEL) -> list[str]:
    """A small tokenizer, `model` as config.json, and text records long enough that every sequence is
    `max_length` tokens."""
    from ngdiff import TOFU_DIR
    from ngdiff.modeling import train_tokenizer

    rows = [json.loads(line) for line in (TOFU_DIR / "full.jsonl").read_text().splitlines()[:400]]
    texts = [r["question"] + " " + r["answer"] for r in rows]
    tokenizer = train_tokenizer(texts, 2000)
    (root / "tok").mkdir()
    tokenizer.save_pretrained(root / "tok")
    (root / "tok" / "config.json").write_text(json.dumps({"model_type": "llama", **model}))
    pairs = max(12, max_length // 16)  # a QA pair is 40-80 tokens of this tokenizer
    records = [" ".join(texts[(i * pairs + j) % len(texts)] for j in range(pairs)) for i in range(32)]
    for name in ("forget", "retain"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    return [f"model.path={root / 'tok'}", "data.format=text", f"data.forget={root / 'forget.jsonl'}",
            f"data.retain={root / 'retain.jsonl'}", f"data.max_length={max_length}",
            "optim.name=adamw", "optim.lr=1e-5", "logging.progress=false", f"output_dir={root / 'out'}"]  # fmt: skip


def launch(backend: str, ranks: int, overrides: list[str], args, root: Path) -> list[dict]:
    from benchmarks.launch import run_worker

    result = root / f"{backend}.json"
    worker = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--steps", str(args.steps),
              *(["--trace"] if args.trace else []), "--", *overrides]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1"}
    if not args.glibc_heap:  # freed tensors go back to the OS at once: the resident set tracks live bytes
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    return run_worker(backend, ranks, worker, result, backend, **env)


def predict(overrides: list[str], ranks: int) -> dict:
    from transformers import LlamaConfig

    from ngdiff.config import load_config
    from ngdiff.memory_plan import model_shape, plan, settings_from_config

    cfg = load_config(None, overrides)
    return plan(model_shape(LlamaConfig(**MODEL)), settings_from_config(cfg, ranks), 2**40).as_dict()


def main() -> None:
    from benchmarks.launch import add_worker_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_arguments(parser)
    parser.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    parser.add_argument("--backends", default="single,fsdp,zero3")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the sharded backends")
    parser.add_argument("--batch", type=int, default=4, help="global forget and retain batch size")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--glibc-heap", action="store_true", help="keep glibc's default heap (it retains freed memory)")
    parser.add_argument("--trace", action="store_true", help="also record the peak resident set per phase")
    parser.add_argument("--out", default="", help="also write all results as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = [*build_inputs(root, args.max_length), f"train.forget_batch_size={args.batch}",
                  f"train.retain_batch_size={args.batch}", *args.overrides]  # fmt: skip
        for backend in args.backends.split(","):
            ranks = 1 if backend == "single" else args.ranks
            overrides = [*common, f"parallel.backend={backend}"]
            predicted = predict(overrides, ranks)
            measured = launch(backend, ranks, overrides, args, root)
            peak = max(r["peak_mib"] - r["baseline_mib"] for r in measured)
            rows.append({"backend": backend, "ranks": ranks, "overrides": args.overrides, "predicted": predicted,
                         "measured": measured, "measured_mib": peak,
                         "ratio": predicted["total_bytes"] / 2**20 / peak})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print("| backend | ranks | predicted MiB/rank | measured MiB/rank (peak RSS - runtime) | predicted / measured |")
    print("|---|---|---|---|---|")
    for r in rows:
        total = r["predicted"]["total_bytes"] / 2**20
        print(f"| {r['backend']} | {r['ranks']} | {total:.0f} | {r['measured_mib']:.0f} | {r['ratio']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
