"""Step-time and memory overhead of NGDiff against GDiff, per backend, on 2 CPU ranks.

    python benchmarks/step_overhead.py [--repeats 6] [--steps 8] [--out docs/bench.json]

The driver builds a small Llama (hidden 128, 4 layers, 1.4M parameters), then launches one worker per
backend (`single` in one process; `ddp`, `fsdp` under torchrun; `zero3` under the deepspeed launcher).
Each worker times, interleaved round-robin over `--repeats` rounds of `--steps` steps:
  ngdiff       the real `Trainer.unlearning_step` (two backward passes, Gram all-reduce, combination)
  gdiff_two    GDiff with the same two backward passes, each reduced, no clone, no Gram
  gdiff_one    GDiff as one combined backward of c0 * L_R - (1 - c0) * L_F
  ngdiff_autolr  NGDiff with AutoLR every 4 steps (timed over whole blocks of 4)
and reports per-rank model state from the engine's own tensors (parameters, gradients, optimizer state,
NGDiff's retain-gradient copy, AutoLR's update copy) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("ngdiff", "gdiff_two", "gdiff_one", "ngdiff_autolr")
PLAIN_VARIANTS = ("plain_ngdiff", "plain_gdiff_one")  # one process only: plain PyTorch loops on the same model
# the model of the overhead measurement of issue 9 (5.2M parameters) and the demo's (1.4M)
MODELS = {"demo": dict(), "5m": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)}


# ------------------------------------------------------------------------------------------ worker
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def gdiff_step(trainer, combined: bool, c0: float = 0.5) -> None:
    """Plain GDiff with local-mean losses: the baseline whose cost NGDiff is compared with."""
    backend = trainer.backend
    backend.zero_grad()
    batches = [(task.objective, task.stream.next(), c0 if task.role == "retain" else -(1 - c0))
               for task in trainer.tasks]  # fmt: skip
    if combined:  # one forward per task, one backward through both graphs
        total = 0.0
        for objective, micro, weight in batches:
            batch = trainer.to_device(micro[0])
            with backend.autocast():
                total = total + weight * objective.loss_sum(backend.model, batch) / max(objective.count(batch), 1)
        with backend.micro_batch(last=True):
            backend.backward(total * backend.gradient_scale, last_micro_batch=True)
    else:  # two backward passes, each reduced by the engine, accumulating into the same gradients
        for objective, micro, weight in batches:
            batch = trainer.to_device(micro[0])
            with backend.micro_batch(last=True):
                with backend.autocast():
                    loss = weight * objective.loss_sum(backend.model, batch) / max(objective.count(batch), 1)
                backend.backward(loss * backend.gradient_scale, last_micro_batch=True)
    backend.step(trainer.lr)


class Replay:
    """The same pre-drawn batches, in the same order, for every variant (identical work per step)."""

    def __init__(self, stream, count: int):
        self.batches = [stream.next() for _ in range(count)]
        self.position = 0

    def next(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def rewind(self) -> None:
        self.position = 0


def plain_losses(model, micro_batches) -> list[torch.Tensor]:
    """Token-mean NLL of each micro-batch of one task, the way a plain PyTorch loop writes it."""
    import torch.nn.functional as F

    losses = []
    for batch in micro_batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1)))
    return losses


def plain_ngdiff_step(model, optimizer, retain, forget) -> None:
    """NGDiff in plain PyTorch: two backward passes, the retain gradient kept by reference, `_foreach`
    norms and combination, one optimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    sum(plain_losses(model, retain)).backward()
    g_r = [p.grad for p in params]
    optimizer.zero_grad(set_to_none=True)
    sum(plain_losses(model, forget)).backward()
    g_f = [p.grad for p in params]
    norm_r = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g_r)))
    norm_f = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g_f)))
    torch._foreach_mul_(g_f, -1.0 / float(norm_f))
    torch._foreach_add_(g_f, g_r, alpha=1.0 / float(norm_r))
    optimizer.step()


def plain_gdiff_step(model, optimizer, retain, forget, c0: float = 0.5) -> None:
    """GradDiff in plain PyTorch: one backward of c0 L_R - (1 - c0) L_F."""
    optimizer.zero_grad(set_to_none=True)
    (c0 * sum(plain_losses(model, retain)) - (1 - c0) * sum(plain_losses(model, forget))).backward()
    optimizer.step()


def worker(args) -> None:
    from ngdiff.config import load_config
    from ngdiff.pipeline import build_trainer
    from parallel.distributed import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(timeout_minutes=5)
    cfg = load_config(None, [*args.overrides, "logging.progress=false", "autolr.every=4"])
    trainer = build_trainer(cfg, ctx, max_steps=10**6)
    backend = trainer.backend
    # AutoLR draws probe batches too: 2 x steps covers every variant's draws of a round
    for task in trainer.tasks:
        task.stream = Replay(task.stream, 2 * args.steps)
    retain_stream, forget_stream = (task.stream for task in trainer.tasks)
    variants = VARIANTS + (PLAIN_VARIANTS if cfg.parallel.backend == "single" else ())
    variants = tuple(v for v in variants if not args.variants or v in args.variants.split(","))

    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    # CPU seconds of the NGDiff step spent inside its two accumulate() calls and the optimizer step:
    # the rest is the step's own bookkeeping (stash, Gram sums, all-reduce, combination)
    inside = {"seconds": 0.0}

    def cpu_timed(function):
        def timed(*a, **k):
            start = time.process_time()
            try:
                return function(*a, **k)
            finally:
                inside["seconds"] += time.process_time() - start

        return timed

    trainer.accumulate, backend.step = cpu_timed(trainer.accumulate), cpu_timed(backend.step)
    bookkeeping: list[float] = []

    def run(variant: str, steps: int) -> float:
        """Wall seconds per step; this process's CPU seconds per step go to `cpu_times` (with one torch
        thread, CPU time does not count the waits for cores that other processes hold)."""
        trainer.autolr.cfg.enabled = variant == "ngdiff_autolr"
        forget_stream.rewind()
        retain_stream.rewind()
        backend.barrier()
        inside["seconds"] = 0.0
        cpu_start = time.process_time()
        start = time.perf_counter()
        for _ in range(steps):
            if variant.startswith("ngdiff"):
                trainer.unlearning_step()
                trainer.step_index += 1
            elif variant.startswith("plain"):
                plain = plain_ngdiff_step if variant == "plain_ngdiff" else plain_gdiff_step
                plain(backend.model, backend.optimizer, retain_stream.next(), forget_stream.next())
            else:
                gdiff_step(trainer, combined=variant == "gdiff_one")
        backend.barrier()
        cpu_times[variant].append((time.process_time() - cpu_start) / steps)
        if variant == "ngdiff":
            bookkeeping.append(cpu_times[variant][-1] - inside["seconds"] / steps)
        return (time.perf_counter() - start) / steps

    for variant in variants:  # warm-up (DeepSpeed traces its prefetch order on the first passes)
        run(variant, 4)
    trainer.step_index = 0
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rounds in [*cpu_times.values(), bookkeeping]:
        rounds.clear()  # drop the warm-up
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(run(variant, args.steps))

    grads = backend.local_grads()
    params = backend.local_params()
    memory = {
        "params_mb": tensor_bytes(params) / 2**20,
        "grads_mb": tensor_bytes(grads) / 2**20,
        "optimizer_mb": optimizer_state_bytes(backend.optimizer) / 2**20,
        "ngdiff_retain_copy_mb": tensor_bytes(grads) / 2**20,  # the one extra gradient shard
        "autolr_update_copy_mb": tensor_bytes(params) / 2**20,  # the one extra parameter shard
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    medians = {v: statistics.median(t) for v, t in times.items()}
    result = {"backend": cfg.parallel.backend, "world_size": ctx.world_size, "median_step_s": medians,
              "median_cpu_s": {v: statistics.median(t) for v, t in cpu_times.items()}, "rounds": times,
              "cpu_rounds": cpu_times,
              "ngdiff_bookkeeping_cpu_s": statistics.median(bookkeeping) if bookkeeping else None,
              "load_average": os.getloadavg(), "memory": memory}  # fmt: skip
    gathered = [None] * ctx.world_size
    if ctx.distributed:
        torch.distributed.all_gather_object(gathered, memory)
    else:
        gathered = [memory]
    result["memory_per_rank"] = gathered
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(result, indent=1))
    if ctx.distributed:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------ driver
def build_inputs(root: Path, model: str = "demo", split: str = "demo", batch: int = 8) -> list[str]:
    """The model (`MODELS`), its tokenizer, and the data: `demo` (40 forget / 360 retain pairs of the
    first 20 authors) or `forget10` (TOFU forget10 = the last 400 pairs, retain90 = the first 3600)."""
    from ngdiff import TOFU_DIR
    from ngdiff.modeling import TinyLlamaSpec, build_tiny_model

    rows = [json.loads(line) for line in (TOFU_DIR / "full.jsonl").read_text().splitlines()]
    forget, retain = (rows[:40], rows[40:400]) if split == "demo" else (rows[3600:], rows[:3600])
    texts = [r["question"] + " " + r["answer"] for r in rows[:400]]
    model_dir = build_tiny_model(root / "model", texts, TinyLlamaSpec(**MODELS[model]))
    for name, part in (("forget", forget), ("retain", retain)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return [f"model.path={model_dir}", f"data.forget={root / 'forget.jsonl'}", f"data.retain={root / 'retain.jsonl'}",
            f"train.forget_batch_size={batch}", f"train.retain_batch_size={batch}", "data.max_length=128",
            "optim.name=adamw", "optim.lr=1e-5", f"output_dir={root / 'out'}"]  # fmt: skip


def launch(backend: str, overrides: list[str], args, root: Path) -> dict:
    from benchmarks.launch import run_worker

    result = root / f"{backend}.json"
    worker = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--repeats", str(args.repeats),
              "--steps", str(args.steps), "--variants", args.variants, "--", *overrides,
              f"parallel.backend={backend}"]  # fmt: skip
    return run_worker(backend, 2, worker, result, backend)


def report(results: dict[str, dict]) -> str:
    single = results.get("single", {}).get("memory")

    def ratio(t: dict, a: str, b: str) -> str:
        return f"{t[a] / t[b]:.3f}" if a in t and b in t else "-"

    lines = ["| backend | NGDiff / GDiff(two bwd) | NGDiff / GDiff(one bwd) | AutoLR(4) / none | NGDiff step ms "
             "| model state MB/rank (params+grads+optim) | vs 1 process | NGDiff extra MB | AutoLR extra MB "
             "| peak RSS MB/rank |", "|" + "---|" * 10]  # fmt: skip
    for name, r in results.items():
        t, m = r["median_step_s"], r["memory"]
        state = m["params_mb"] + m["grads_mb"] + m["optimizer_mb"]
        share = f"{state / (single['params_mb'] + single['grads_mb'] + single['optimizer_mb']):.2f}" if single else "-"
        rss = "/".join(f"{x['peak_rss_mb']:.0f}" for x in r["memory_per_rank"])
        lines.append(
            f"| {name} | {ratio(t, 'ngdiff', 'gdiff_two')} | {ratio(t, 'ngdiff', 'gdiff_one')} "
            f"| {ratio(t, 'ngdiff_autolr', 'ngdiff')} | {1000 * t.get('ngdiff', float('nan')):.1f} | {state:.2f} "
            f"| {share} | {m['ngdiff_retain_copy_mb']:.2f} | {m['autolr_update_copy_mb']:.2f} | {rss} |"
        )
    if "plain_ngdiff" in results.get("single", {}).get("median_step_s", {}):
        lines += ["", "| one process, median of rounds | NGDiff ms | plain NGDiff loop ms "
                  "| plain GradDiff (one bwd) ms | NGDiff / plain NGDiff | NGDiff / plain GradDiff |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for clock, key in (("wall", "median_step_s"), ("CPU time", "median_cpu_s")):
            t = results["single"][key]
            lines.append(
                f"| {clock} | {1000 * t['ngdiff']:.1f} | {1000 * t['plain_ngdiff']:.1f} "
                f"| {1000 * t.get('plain_gdiff_one', float('nan')):.1f} | {ratio(t, 'ngdiff', 'plain_ngdiff')} "
                f"| {ratio(t, 'ngdiff', 'plain_gdiff_one')} |"
            )
        own = results["single"].get("ngdiff_bookkeeping_cpu_s")
        if own is not None:
            lines.append(
                f"\nNGDiff step's own work (CPU time outside forward/backward and the optimizer): {1000 * own:.1f} ms"
            )
        load = results["single"]["load_average"]
        lines.append(
            f"\nload average at the end of the single run (1/5/15 min): {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    from benchmarks.launch import add_worker_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_arguments(parser)
    parser.add_argument("--repeats", type=int, default=6, help="interleaved rounds per variant")
    parser.add_argument("--steps", type=int, default=8, help="steps per round (a multiple of 4)")
    parser.add_argument("--backends", default="single,ddp,fsdp,zero3")
    parser.add_argument("--model", choices=sorted(MODELS), default="demo", help="demo: 1.4M parameters; 5m: 5.2M")
    parser.add_argument(
        "--split", choices=["demo", "forget10"], default="demo", help="forget10: TOFU forget10/retain90"
    )
    parser.add_argument("--batch", type=int, default=8, help="forget and retain sequences per step (each)")
    parser.add_argument("--variants", default="", help="comma list to time (default: all that apply)")
    parser.add_argument("--out", default="", help="also write all results as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = build_inputs(root, args.model, args.split, args.batch)
        results = {b: launch(b, overrides, args, root) for b in args.backends.split(",")}
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
