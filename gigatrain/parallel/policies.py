"""Frozen policies: each parallel technique's choices, decided once, typed.

``plan_from_config`` turns a resolved ``Config`` into a ``ParallelPlan``; the ``apply_*`` steps
take these objects instead of integers, strings and option dicts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..distributed.mesh import ParallelDims
from .pipeline.stages import PipelinePolicy
from .compile import CompilePolicy
from .recompute import RecomputePolicy

if TYPE_CHECKING:
    from ..config import Config

OFFLOAD_KINDS = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class OffloadPolicy:
    """Where the optimizer (and with NVMe, its states) lives: "none", "cpu" or "nvme"."""

    kind: str = "none"
    dir: str | None = None            # NVMe: the folder for the state files
    pin: bool = True                  # CUDA: pinned host buffers (ignored on the CPU)

    def __post_init__(self) -> None:
        if self.kind not in OFFLOAD_KINDS:
            raise ValueError(f"offload must be one of {OFFLOAD_KINDS}, got {self.kind!r}")
        if self.kind == "nvme" and not self.dir:
            raise ValueError("NVMe offload needs a directory (parallel.offload_dir)")


@dataclass(frozen=True)
class ZeroPolicy:
    """ZeRO stage over the dp axis (0 = plain data parallel) and the gradient bucket size."""

    stage: int = 0
    bucket_mb: float = 25.0

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {self.bucket_mb}")


@dataclass(frozen=True)
class TensorParallelPolicy:
    """Tensor (Megatron 1D) parallelism over the tp axis."""

    size: int = 1
    sequence_parallel: bool = False


@dataclass(frozen=True)
class ParallelPlan:
    """Every parallel choice of a job, in the order the ``apply_*`` steps use them."""

    dims: ParallelDims
    tensor: TensorParallelPolicy = field(default_factory=TensorParallelPolicy)
    recompute: RecomputePolicy = field(default_factory=RecomputePolicy)
    compile: CompilePolicy = field(default_factory=CompilePolicy)
    pipeline: PipelinePolicy = field(default_factory=PipelinePolicy)
    zero: ZeroPolicy = field(default_factory=ZeroPolicy)
    offload: OffloadPolicy = field(default_factory=OffloadPolicy)
    precision: str = "fp32"           # fp32 | bf16 | fp16 | auto (resolved for the device)
    grad_clip: float | None = None


def plan_from_config(cfg: "Config", example_batch=None) -> ParallelPlan:
    """The plan of a config already resolved for its world size (``resolve_for_world``).

    ``example_batch``: one micro-batch ``(inputs, targets)``, needed only when the pipeline is
    balanced by measured time (``parallel.pp_balance=time``).
    """
    p, t = cfg.parallel, cfg.train
    if p.dp is None:
        raise ValueError("plan_from_config needs a config resolved for its world size (parallel.dp is null)")
    return ParallelPlan(
        dims=ParallelDims(dp=p.dp, pp=p.pp, tp=p.tp),
        tensor=TensorParallelPolicy(size=p.tp, sequence_parallel=bool(getattr(p, "sequence_parallel", False))),
        recompute=RecomputePolicy(t.recompute),
        compile=CompilePolicy(t.compile),
        pipeline=PipelinePolicy(schedule=p.pp_schedule, microbatches=p.pp_microbatches or cfg.grad_accum,
                                virtual=p.pp_virtual, balance=p.pp_balance,
                                example_batch=example_batch if p.pp_balance == "time" else None,
                                transport=p.pp_transport, timeout_s=p.timeout_s),
        zero=ZeroPolicy(stage=p.zero, bucket_mb=p.bucket_mb),
        offload=OffloadPolicy(kind=p.offload if p.zero else "none",
                              dir=p.offload_dir if p.zero and p.offload == "nvme" else None),
        precision=cfg.precision,
        grad_clip=t.grad_clip,
    )
