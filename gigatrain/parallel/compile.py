"""``torch.compile``, one transformer block at a time.

``apply_compile(model, policy)`` runs after recomputation and before the pipeline split and ZeRO
(``gigatrain.api.parallelize``). It compiles each child of ``model.blocks`` separately, and only
its ``forward``: module hooks (ZeRO-3's gather and release, which communicate) stay outside the
compiled code and run eagerly around every call, and a pipeline can still cut the model between
any two blocks. The stem and the head stay eager: they hold little compute and, under a
pipeline, the tied embedding exchange.

All blocks share one ``forward`` code object, so dynamo keeps one cache entry per block; the
cache limit is raised to the number of blocks so that none of them silently falls back to eager.

Modes are torch's: ``default``, ``reduce-overhead`` (CUDA graphs; on the CPU the same as default)
and ``max-autotune``. Compilation on the CPU needs a C++ compiler (inductor generates C++).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class CompilePolicy:
    """How each block's forward is compiled: "none" or a ``torch.compile`` mode."""

    mode: str = "none"

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.mode!r}")


def compile_problem(device: torch.device) -> str | None:
    """Why blocks cannot be compiled on ``device`` (None when they can)."""
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return ("train.compile needs a C++ compiler on the CPU (inductor generates C++): install g++ "
                "(apt-get install g++) or set train.compile=none.")
    return None


def apply_compile(model: nn.Module, policy: CompilePolicy, device: torch.device | None = None) -> nn.Module:
    """Compile every child of ``model.blocks`` with ``torch.compile(mode=policy.mode)``; returns
    ``model``. Compilation itself happens at the first forward. Raises ``ValueError`` with the
    fix when the model has no blocks list or ``device`` cannot compile."""
    if policy.mode == "none":
        return model
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(f"train.compile compiles each child of model.blocks, and {type(model).__name__} has "
                         f"no blocks list: use compile=none, or compile the model yourself.")
    problem = compile_problem(device or next(model.parameters()).device)
    if problem:
        raise ValueError(problem)
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(blocks))
    mode = None if policy.mode == "default" else policy.mode
    for block in blocks:
        if not getattr(block.forward, "compiled", False):
            fwd = torch.compile(block.forward, mode=mode)
            fwd.compiled = True
            block.forward = fwd
    return model
