"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import torch
import torch.nn as nn

from .schedules import lr_at


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings, not biases and norm scales (GPT-2/nanoGPT convention)."""
    decay, no_decay = [], []
    seen = set()
    for _, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(tcfg, named_params, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer named by ``tcfg.optimizer`` over ``named_params`` (name, parameter) pairs."""
    named_params = list(named_params)
    if tcfg.optimizer == "sgd":
        groups = param_groups(named_params, tcfg.weight_decay)
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum)
    if tcfg.optimizer == "adamw":
        groups = param_groups(named_params, tcfg.weight_decay)
        kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=1e-8, **kwargs)
    raise ValueError(f"unknown optimizer {tcfg.optimizer!r}: use adamw or sgd")


__all__ = ["build_optimizer", "lr_at", "param_groups"]
