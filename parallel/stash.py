"""The gradient stash: one copy of this rank's gradient shards, kept aside while the forget
gradient is computed (NGDiff needs both at once for the Gram matrix and the combination).

It is the largest buffer NGDiff adds over plain training (one gradient shard), so it can be kept in
bf16 (half the bytes, ~3 significant digits) and/or in pinned CPU memory (no device memory at all).
Iterating gives the tensors back one at a time, in fp32 on the gradients' device, so a bf16 or
offloaded stash never materialises as a whole fp32 device copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _host_copy(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    pin = grad.device.type != "cpu" and torch.cuda.is_available()
    host = torch.empty(grad.shape, dtype=dtype, device="cpu", pin_memory=pin)
    host.copy_(grad.detach(), non_blocking=pin)  # read back only through the same stream (see __iter__)
    return host


class GradientStash:
    """A copy of `grads` in `dtype` ("fp32" | "bf16"), in (pinned) CPU memory when `offload`."""

    def __init__(self, grads: Sequence[torch.Tensor], dtype: str = "fp32", offload: bool = False, owned: bool = False):
        """`owned`: nothing else writes `grads` any more (the engine let go of them), so an fp32 stash on
        their device keeps the tensors themselves instead of a copy."""
        if dtype not in DTYPES:
            raise ValueError(f"parallel.stash_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.devices = [g.device for g in grads]
        if offload:
            self.tensors = [_host_copy(g, self.dtype) for g in grads]
        else:
            self.tensors = [g.detach().to(self.dtype, copy=not owned) for g in grads]

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """fp32 tensors on the gradients' devices, converted one at a time (the stash itself when it is fp32
        and on the device)."""
        for tensor, device in zip(self.tensors, self.devices, strict=True):
            yield tensor.to(device=device, dtype=torch.float32, non_blocking=True)

    def add_to(self, targets: list[torch.Tensor], alpha: float) -> None:
        """`targets += alpha * stash`: one fused `_foreach` call when the stash is fp32 on the targets'
        devices, else tensor by tensor, so a bf16 or offloaded stash is converted one tensor at a time."""
        if self.dtype == torch.float32 and all(t.device == d for t, d in zip(self.tensors, self.devices, strict=True)):
            torch._foreach_add_(targets, self.tensors, alpha=alpha)
            return
        for target, tensor in zip(targets, self, strict=True):
            target.add_(tensor, alpha=alpha)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
