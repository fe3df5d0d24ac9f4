"""Batched greedy generation with left padding: the same text as one prompt at a time, much faster."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


def generation_model(model):
    """The module that has `.generate` (unwraps DDP / DeepSpeed engines; FSDP2 modules have it)."""
    while not hasattr(model, "generate") and hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def generate_greedy_ids(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    synced_gpus: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (EOS and padding removed), in prompt order.

    Prompts are sorted by length before batching (less padding, same results) and left-padded so every
    row's last prompt token sits at the same position; the attention mask (and the position ids HF
    derives from it) keep padding out of the computation. `synced_gpus` keeps every rank stepping until
    all ranks are done, which sharded engines (ZeRO-3, FSDP) need because each step is a collective.
    """
    model = generation_model(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    synced = synced_gpus and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
            mask[r, width - len(prompts[i]) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
        for r, i in enumerate(rows):
            row = generated[r, width:].tolist()
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            results[i] = [t for t in row if t != pad_id]
        if on_batch is not None:
            on_batch(len(rows))
    if was_training:
        model.train()
    return results


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens and stripped."""
    ids = generate_greedy_ids(model, tokenizer, prompts, max_new_tokens, batch_size, synced_gpus)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
