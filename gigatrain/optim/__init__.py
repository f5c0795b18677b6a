"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import torch
import torch.nn as nn

from .schedules import lr_at


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay applies to matrices and embeddings, not to biases and norm scales
    (GPT-2/nanoGPT convention). Sharded strategies use this to split their flat buffers."""
    return p.dim() >= 2


def param_groups(named_params) -> list[dict]:
    """Split (name, parameter) pairs into ``{"params": [...], "decay": bool}`` groups."""
    decay, no_decay = [], []
    seen = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if decays(name, p) else no_decay).append(p)
    return [g for g in ({"params": decay, "decay": True}, {"params": no_decay, "decay": False})
            if g["params"]]


def build_optimizer(tcfg, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer named by ``tcfg.optimizer`` over ``groups``.

    ``groups`` are ``{"params": [...], "decay": bool}`` dicts (see ``param_groups``); decaying
    groups get ``tcfg.weight_decay``, the others none. Strategies that shard parameters pass their
    flat shards here, so every layout runs the same optimizer with the same hyper-parameters.
    """
    given_groups = groups
    groups = [{"params": g["params"], "weight_decay": tcfg.weight_decay if g["decay"] else 0.0}
              for g in groups]
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum)
    if tcfg.optimizer == "adamw":
        kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=1e-8, **kwargs)
    if tcfg.optimizer == "lamb":
        from .lamb import Lamb

        # Sharded strategies say which parameter each range of a flat piece belongs to.
        for g, given in zip(groups, given_groups):
            g.update({k: given[k] for k in ("spans", "shard_keys", "shard_comm") if k in given})
        return Lamb(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=1e-6)
    if tcfg.optimizer == "onebit_adam":
        from .onebit import OneBitAdam

        # The data-parallel group its compressed all-reduce runs over (plain data parallel; ZeRO-1's
        # shard pieces carry none: over them it is AdamW until the hand-over to data parallel).
        for g, given in zip(groups, given_groups):
            g["dp_comm"] = given.get("dp_comm")
        return OneBitAdam(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=1e-8, warmup=tcfg.onebit_warmup)
    raise ValueError(f"unknown optimizer {tcfg.optimizer!r}: use adamw, lamb, onebit_adam or sgd")


__all__ = ["build_optimizer", "decays", "lr_at", "param_groups"]
