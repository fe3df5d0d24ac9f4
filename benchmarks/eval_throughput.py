"""Evaluation throughput on CPU: TOFU questions per second, batched (16) vs one-at-a-time greedy generation.

    python benchmarks/eval_throughput.py [--items 32] [--max-new-tokens 32] [--batch-size 16] [--threads 1]

Builds the demo-sized tiny Llama (random weights: every answer runs to max_new_tokens, so the
comparison is not flattered by early stops), generates for the same prompts both ways in one process,
checks the texts are identical, and prints items/s and the ratio. One torch thread by default: on a
small shared CPU, OpenMP threads spinning against other processes make tiny matrix products erratic.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ngdiff import TOFU_DIR
from ngdiff.data.tokenize import prompt_ids
from ngdiff.eval.generation import generate_greedy_ids
from ngdiff.modeling import TinyLlamaSpec, build_tiny_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    rows = [json.loads(line) for line in (TOFU_DIR / "full.jsonl").read_text().splitlines()[:400]]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", [r["question"] + " " + r["answer"] for r in rows])
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = load_tokenizer(str(model_dir))
    prompts = [prompt_ids(tokenizer, r["question"]) for r in rows[: args.items]]
    generate_greedy_ids(model, tokenizer, prompts[:2], 4, 2)  # warm-up

    def timed(batch_size: int) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        out = generate_greedy_ids(model, tokenizer, prompts, args.max_new_tokens, batch_size)
        return time.perf_counter() - start, out

    t_single, single = timed(1)
    t_batched, batched = timed(args.batch_size)
    spec = TinyLlamaSpec()
    print(f"model: tiny Llama {spec.num_layers}x{spec.hidden_size}, torch threads {torch.get_num_threads()}")
    print(f"{args.items} TOFU questions, {args.max_new_tokens} new tokens, identical texts: {single == batched}")
    print(f"one at a time : {args.items / t_single:7.2f} items/s")
    print(f"batched ({args.batch_size:>2})  : {args.items / t_batched:7.2f} items/s")
    print(f"speed-up      : {t_single / t_batched:7.2f}x")


if __name__ == "__main__":
    main()
