"""Mixed precision: a frozen policy decided once, and the dynamic loss scaler for fp16.

Parameters, and so the optimizer's master weights, stay fp32; matrix work runs in bf16 or fp16
under autocast. With fp16 the loss is multiplied by a scale before backward so small gradients do
not flush to zero; if any rank sees an inf/NaN gradient the step is skipped on every rank and the
scale is lowered, and after ``growth_interval`` clean steps it is raised again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtypes of one training job, decided once.

    - ``param_dtype``: what the model's parameters (and so their gradients) are stored in;
    - ``reduce_dtype``: what gradients are reduced over dp in;
    - ``compute_dtype``: autocast's dtype for matrix work (None: no autocast, fp32);
    - ``loss_scaling``: dynamic loss scaling (fp16).

    With ``bf16``/``fp16``, plain data parallel keeps fp32 parameters and gradients (autocast
    casts on the fly; the optimizer updates them in place), while ZeRO stages store parameters
    and gradients in the low-precision dtype and keep an fp32 master copy of their shard for the
    optimizer: half the gradient traffic and memory, the same update. ``from_name`` picks that.
    """

    name: str                      # "fp32" | "bf16" | "fp16"
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    compute_dtype: torch.dtype | None
    loss_scaling: bool

    @classmethod
    def from_name(cls, name: str, device: torch.device, zero: int = 0) -> "PrecisionPolicy":
        """The policy for ``precision=name`` ("auto": bf16 on CUDA, fp32 elsewhere) under ZeRO
        stage ``zero``."""
        if name == "auto":
            name = "bf16" if device.type == "cuda" else "fp32"
        if name not in _DTYPES:
            raise ValueError(f"precision must be one of auto, fp32, bf16, fp16; got {name!r}")
        compute = _DTYPES[name]
        stored = compute if (zero and compute is not None) else torch.float32
        return cls(name, stored, stored, compute, name == "fp16")

    def autocast(self, device: torch.device):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)


class DynamicLossScaler:
    """Loss scale that backs off on overflow and grows after a run of clean steps."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.good_steps = 0
        self.skipped_steps = 0

    def found_overflow(self, grads: list[torch.Tensor], comm=None,
                       device: torch.device | None = None) -> bool:
        """True if any gradient on any rank of ``comm`` (a ``distributed.comm.Comm``; None: this
        process alone) is inf or NaN (one tiny all-reduce).

        ``device`` is where the flag is reduced (the group's device: with CPU offload the
        gradients are on the host but NCCL needs a GPU tensor)."""
        device = device or (grads[0].device if grads else torch.device("cpu"))
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        if grads:
            # One fused pass and no host sync per tensor: a norm is inf/NaN iff an entry is.
            norms = torch.stack(torch._foreach_norm([g.float() if g.dtype != torch.float32 else g
                                                     for g in grads]))
            flag = (~torch.isfinite(norms)).any().float().reshape(1).to(device)
        if comm is not None:
            comm.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            self.skipped_steps += 1
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
