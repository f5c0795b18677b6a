"""Activation recomputation (checkpointing): trade compute in backward for activation memory.

``apply_recompute(model, policy)`` is one ``apply_*`` step, after tensor parallel and before the
pipeline split and ZeRO (``gigatrain.api.parallelize``):

- ``full``: every child of ``model.blocks`` keeps only its input for backward; its forward runs
  again inside backward (``torch.utils.checkpoint``, non-reentrant). Per block and micro-batch
  this keeps ``s b h`` values instead of Korthikanti et al.'s ``s b h (34 + 5 a s / h)`` bytes.
- ``selective``: only the attention core (score matmul, softmax, dropout, weighted sum) is
  recomputed, the part whose saved tensors grow with the square of the sequence (the
  ``5 a s / h`` term) while costing few FLOPs to redo. Models declare that core as an
  ``attention_core(q, k, v, ...)`` method of their attention modules; nothing else is touched.

The modules are wrapped in place by replacing the instance's ``forward`` (or ``attention_core``),
never by inserting wrapper modules: parameter names, stage-3 units, pipeline partitions and
checkpoints see the same model. Module hooks still run around the wrapped call, so a ZeRO-3 unit
is gathered by its forward pre-hook before the first forward, and by its output-gradient hook
before backward reaches the block, which is before the recomputation needs the parameters.

Recomputation replays the same operations on the same inputs with the RNG state of the first
pass (``preserve_rng_state``), so losses and gradients are bit-identical with and without it.
Outside autograd (evaluation, sampling) nothing is recomputed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class RecomputePolicy:
    """Which activations are recomputed in backward: "none", "selective" or "full"."""

    mode: str = "none"

    def __post_init__(self) -> None:
        if self.mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {self.mode!r}")


def checkpointed(fn):
    """``fn`` recomputed in backward instead of keeping what it saves; plain ``fn`` when no
    gradient is being recorded."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    run.recomputed = True
    return run


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that declare an ``attention_core`` (the selective policy's targets)."""
    return [m for m in model.modules() if callable(getattr(type(m), "attention_core", None))]


def apply_recompute(model: nn.Module, policy: RecomputePolicy) -> nn.Module:
    """Make ``model`` recompute activations in backward as ``policy`` says; returns ``model``.

    Raises ``ValueError`` when the model lacks what the mode needs: ``full`` needs
    ``model.blocks`` (an ``nn.ModuleList`` or ``nn.Sequential``), ``selective`` at least one
    module with an ``attention_core`` method. Applying the same mode twice changes nothing.
    """
    if policy.mode == "none":
        return model
    if policy.mode == "full":
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(f"train.recompute=full recomputes each child of model.blocks, and "
                             f"{type(model).__name__} has no blocks list: use recompute=none, or give the "
                             f"model its transformer blocks as an nn.ModuleList named `blocks`.")
        for block in blocks:
            _recompute(block, "forward")
        return model
    targets = attention_modules(model)
    if not targets:
        raise ValueError(f"train.recompute=selective recomputes attention cores, and {type(model).__name__} "
                         f"declares none (an `attention_core(q, k, v)` method on its attention modules): use "
                         f"recompute=full or none.")
    for m in targets:
        _recompute(m, "attention_core")
    return model


def _recompute(owner: nn.Module, method: str) -> None:
    """Replace ``owner.method`` by its checkpointed version, once."""
    fn = getattr(owner, method)
    if not getattr(fn, "recomputed", False):
        setattr(owner, method, checkpointed(fn))


def saved_activation_bytes(module: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """Bytes autograd keeps for backward while ``module(*inputs)`` runs forward (the measurement
    behind the recomputation figures).

    Every tensor saved for backward is caught by a saved-tensor hook, and each storage is counted
    once; parameters are left out (they are not activations). A checkpointed region saves
    through its own hooks, so what it keeps is its inputs, which the returned ``inputs`` counts
    (the block input is counted there in every mode, as whatever keeps it). Returns
    ``{"inputs": ..., "other": ..., "total": ...}``.
    """
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    ins = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in ins:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*inputs)
    del out
    other = sum(seen.values())
    return {"inputs": sum(ins.values()), "other": other, "total": other + sum(ins.values())}
