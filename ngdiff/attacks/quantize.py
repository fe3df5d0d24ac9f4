"""Round-to-nearest (RTN) weight quantization, applied and undone in place, to test whether "forgotten"
answers come back once the weights are rounded (Zhang et al., ICLR 2025: unlearning with small weight
changes is undone by 4-bit quantization).

Scheme (symmetric absmax RTN, weights of every `nn.Linear` but the output head; activations untouched):
- int8: one scale per output channel, scale = max|w_row| / 127, q = clamp(round(w / scale), -128, 127)
  (LLM.int8's vector-wise absmax quantization, Dettmers et al. 2022, without its outlier split);
- int4: one scale per group of 128 input weights of a row, scale = max|w_group| / 7, q in [-8, 7]
  (the group-wise RTN baseline of GPTQ, Frantar et al. 2023, and AWQ, Lin et al. 2024).
The weights are replaced by q * scale (fake quantization): the numbers a quantized kernel computes with.
Why by hand rather than a library: optimum-quanto and torchao install here, but their 4-bit paths pack
weights for specific kernels (torchao's int4 needs CUDA); this scheme runs identically on CPU and GPU and
is checked against a dequantise-by-hand reference. The output head stays in full precision, as
bitsandbytes' default `llm_int8_skip_modules` keeps `lm_head`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SCHEMES = {"int8": (8, 0), "int4": (4, 128)}  # name -> (bits, group size along the input; 0: whole row)


def rtn_dequantized(weight: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """`weight` (out, in) rounded to `bits`-bit signed integers with absmax scales and mapped back."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    out_features, in_features = w.shape
    group = group_size if 0 < group_size < in_features else in_features
    pad = (-in_features) % group
    padded = torch.nn.functional.pad(w, (0, pad)).reshape(out_features, -1, group)
    scale = padded.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(padded / scale), -qmax - 1, qmax)
    return (q * scale).reshape(out_features, -1)[:, :in_features].to(weight.dtype)


def quantizable_linears(model) -> list[torch.nn.Linear]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


@contextmanager
def quantized(model, scheme: str) -> Iterator[int]:
    """Inside the block the model's linear weights are RTN-quantized per `scheme`; restored after.
    Yields how many layers were quantized."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    bits, group = SCHEMES[scheme]
    layers = quantizable_linears(model)
    saved = [layer.weight.detach().clone() for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(rtn_dequantized(layer.weight, bits, group))
        yield len(layers)
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved, strict=True):
                layer.weight.copy_(weight)
