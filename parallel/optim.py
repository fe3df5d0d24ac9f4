"""Torch optimizers from the config; every backend builds its optimizer here."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_cfg) -> torch.optim.Optimizer:
    """SGD or AdamW. Both steps are linear in lr, which AutoLR relies on to rescale a step exactly."""
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay
        )
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=optim_cfg.lr,
            betas=tuple(optim_cfg.betas),
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
        )
    raise ValueError(f"unknown optim.name {optim_cfg.name!r}; choose sgd or adamw")


def grads_of(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The parameters' gradients, made zero where a backward left none, so callers can write in place."""
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
