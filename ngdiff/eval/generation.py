"""Batched greedy generation with left padding: the same text as one prompt at a time, much faster."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens.

    Prompts are left-padded so every row's last prompt token sits at the same position; the
    attention mask (and the position ids derived from it) keep padding out of the computation.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[row, width - len(prompt) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced_gpus,
        )
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return outputs
