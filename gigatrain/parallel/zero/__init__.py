"""ZeRO: optimizer states (stage 1), gradients (stage 2) and parameters (stage 3) sharded over the
data-parallel group, optionally with the optimizer offloaded to the CPU.

``build_zero_strategy`` returns the gradient strategy the Engine drives (same interface as
``gigatrain.engine.Stage0Strategy``); ``memory.model_state_bytes`` is the matching memory formula.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no imports at package import time: data_parallel imports .buckets from here
    import torch.nn as nn

    from ...distributed.mesh import Mesh
    from ...precision import PrecisionPolicy


def build_zero_strategy(zero: int, model: nn.Module, mesh: Mesh, *, bucket_mb: float,
                        precision: PrecisionPolicy, offload: str | None = "none", offload_dir=None):
    """The ZeRO strategy for stage ``zero`` (1, 2 or 3) of ``model`` over ``mesh.dp``.

    ``offload``: "none" or "cpu" (stages 1-3), "nvme" (stage 3, with ``offload_dir``).
    """
    if zero in (1, 2):
        from .stage12 import ZeroStrategy

        return ZeroStrategy(model, mesh, stage=zero, bucket_mb=bucket_mb, precision=precision,
                            offload=offload, offload_dir=offload_dir)
    if zero == 3:
        from .stage3 import Stage3Strategy  # imported lazily: written separately

        return Stage3Strategy(model, mesh, bucket_mb=bucket_mb, precision=precision,
                              offload=offload or "none", offload_dir=offload_dir)
    raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero!r}")


__all__ = ["build_zero_strategy"]
