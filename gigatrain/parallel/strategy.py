"""The gradient-strategy contract: what the engine may ask of data parallel and every ZeRO stage.

A gradient strategy decides, once at construction, how the gradients of the parameters it is
given are reduced over the data-parallel group, where they and the optimizer states live, and
how the parameters are updated. It owns its optimizer. The engine drives every strategy through
``GradStrategy`` alone; nothing is probed.

One optimizer step, as the engine runs it::

    begin_step(lr, overlap=...)                  before the first micro-step's backward
    for each micro-step:
        set_sync(last micro-step?)
        forward, backward
        after_backward()
    (or, under a pipeline schedule: set_sync(False), the whole schedule, reduce_accumulated())
    grads()                                      fp16 overflow check
    grad_sq_norm(skip=...)                       global norm, clipping coefficient
    step(lr, grad_coef)  or, for a skipped step, nothing
    zero_grad()

``build_grad_strategy`` picks the implementation: ``data_parallel.Stage0Strategy`` (stage 0),
``zero.stage12.ZeroStrategy`` (stages 1, 2) or ``zero.stage3.Stage3Strategy`` (stage 3); with an
optimizer that averages over dp itself after a warm-up (1-bit Adam), stage 1 hands over to stage 0
at the end of the warm-up (``handover.HandOver``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Protocol, runtime_checkable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ..distributed.mesh import Mesh
    from ..precision import PrecisionPolicy
    from .policies import OffloadPolicy, ZeroPolicy

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
"""Builds the optimizer over parameter groups ``{"params": [...], "decay": bool}`` (see
``gigatrain.optim.param_groups``); sharded strategies pass their flat fp32 shard pieces, and with
them ``spans``, ``shard_keys`` and ``shard_comm`` (which parameter each range of a piece belongs
to, and the group holding the other ranges: ``zero.shards.layer_spans``) for layer-wise optimizers
such as LAMB; others ignore them. An optimizer whose ``step`` communicates says so with
``step_communicates = True``: strategies then call it on the main thread only."""

FullState = tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class PipelineGrads:
    """How a pipeline schedule delivers this rank's gradients (``None`` without a pipeline).

    ``chunks``: the modules whose backward passes the schedule runs, each micro-batch's pass of a
    chunk delivering every gradient of that chunk's parameters (the passes of different chunks
    and micro-batches interleave). ``late``: names of parameters whose gradient is complete only
    after the schedule, when the stages have summed the copies of a tied weight that other pp
    ranks hold; they are reduced by ``reduce_accumulated``.

    Strategies that keep full local gradients (stages 0 and 1) need neither: they reduce
    everything after the schedule. Stage 2 reduce-scatters each chunk's buckets as each pass
    ends; stage 3 gathers each block for its forward and backward passes and reduce-scatters it
    as each pass ends.
    """

    chunks: tuple[nn.Module, ...]
    late: frozenset[str] = frozenset()


@runtime_checkable
class GradStrategy(Protocol):
    """How gradients are reduced and parameters updated for one data-parallel group.

    ``optimizer`` is the strategy's own optimizer, built in its constructor by the
    ``OptimizerFactory`` it was given, over whatever tensors it updates (the model's parameters,
    or flat fp32 shards). The engine only reads it (for the learning-rate schedule's groups and
    for memory accounting); updates go through ``step``.

    Every method that communicates is collective over the strategy's group: all its ranks call
    it in the same order.
    """

    optimizer: torch.optim.Optimizer

    def set_sync(self, sync: bool) -> None:
        """Say whether the coming backward is the last micro-step of the step (``True``) or an
        accumulation micro-step (``False``). A strategy may skip communication on accumulation
        micro-steps; after the last one, the reduced gradients must be complete."""

    def begin_step(self, lr: float, *, overlap: bool = False) -> bool:
        """Announce a step before its first backward. ``overlap=True`` promises that ``step``
        will be called with this ``lr`` and ``grad_coef == 1`` and that the step is not skipped,
        which lets a strategy update parameters during backward (CPU offload). Returns whether it
        will: the update then can no longer be skipped or scaled."""

    def after_backward(self) -> None:
        """Finish the reduction started during the backward that just ended (wait for the
        asynchronous collectives, reduce what hooks did not see, e.g. unused parameters)."""

    def reduce_accumulated(self) -> None:
        """Reduce, now, gradients accumulated locally with ``set_sync(False)`` (a pipeline
        schedule interleaves the backward passes of its micro-batches), and finish the
        reductions started during the schedule. Stages 2 and 3 accumulate only the ``late``
        parameters of their ``PipelineGrads`` locally, and raise ``RuntimeError`` when they were
        built without one."""

    def grads(self) -> list[torch.Tensor]:
        """The reduced gradient tensors this rank holds (after ``after_backward``), for the
        overflow check; every element of the model's gradient is in some rank's list."""

    def grad_sq_norm(self, skip: Collection[str] = ()) -> float:
        """Squared L2 norm of the whole reduced gradient of the parameters this strategy was
        given, the same on every rank of the group, leaving out the parameters named in
        ``skip`` (placements say which: a tied copy another pipeline stage counts)."""

    def zero_grad(self) -> None:
        """Clear the gradients for the next step (also after a skipped step)."""

    def step(self, lr: float, grad_coef: float) -> None:
        """Multiply the reduced gradients by ``grad_coef`` (loss-scale removal and clipping),
        update the parameters with learning rate ``lr``, and leave every rank's model with the
        updated values it needs for the next forward."""

    def full_state(self) -> FullState:
        """(parameters by name, optimizer state by parameter name and torch's key): full,
        unsharded fp32 tensors on the CPU, keyed as ``model.named_parameters()`` (a tied weight
        under its first name), so any strategy at any world size can load them. Collective."""

    def load_full_state(self, params: dict[str, torch.Tensor],
                        optim: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """Load state as ``full_state`` returns it, saved by any strategy. ``optim=None`` loads
        the parameters only. Raises ``KeyError`` for a missing parameter and ``ValueError`` for a
        shape mismatch, before changing anything."""

    def state_pieces(self) -> tuple[list, dict[tuple[str, str], float]]:
        """(pieces, scalars): what this rank holds of the parameters and optimizer states, as
        ``zero.shards.StatePiece``s (ranges of each parameter's flattened tensor, ``replicated``
        where every dp rank holds the same), and the scalar states it records, by (parameter
        name, key). No communication: a sharded checkpoint writes them rank by rank."""

    def load_pieces(self, source) -> None:
        """Load this rank's part from ``source`` (a ``zero.shards.PieceSource``: a sharded
        checkpoint saved in any layout), reading only what the rank holds."""

    def host_tensors(self) -> list[torch.Tensor]:
        """Tensors the strategy keeps in host memory for offload (empty without offload), so
        ``memory.measure_model_state_bytes`` counts them as host bytes."""

    def close(self) -> None:
        """Release what outlives Python references (worker threads, offload files, hooks on the
        model). Call once training is over; the strategy must not be used afterwards."""


def build_grad_strategy(zero: int, model: nn.Module, mesh: Mesh, optimizer_factory: OptimizerFactory, *,
                        bucket_mb: float = 25.0, precision: PrecisionPolicy, offload: str | None = "none",
                        offload_dir=None, pipeline: PipelineGrads | None = None, initial=None,
                        **stage_options) -> GradStrategy:
    """The gradient strategy for ZeRO stage ``zero`` (0 = plain data parallel) of ``model``'s
    parameters over ``mesh.dp``, with its optimizer built by ``optimizer_factory``.

    ``offload``: "none", "cpu" (stages 1-3) or "nvme" (stage 3, with ``offload_dir``).
    ``pipeline``: how a pipeline schedule delivers the gradients (stages 2 and 3 use it).
    ``initial``: with stage 3, the ``materialize.LocalValues`` its shard of a meta-device model is
    filled from (other stages need a materialised model).
    ``stage_options`` go to the stage-3 strategy (``units``, ``prefetch``, ``offload_chunk_mb``).
    """
    offload = offload or "none"
    if zero == 0:
        from .data_parallel import Stage0Strategy

        if offload != "none" or stage_options:
            raise ValueError(f"data parallel (zero=0) takes no offload or stage options; got offload={offload!r} "
                             f"and {sorted(stage_options)}")
        return Stage0Strategy(model, mesh, optimizer_factory, bucket_mb=bucket_mb, precision=precision)
    if zero in (1, 2):
        from .zero.stage12 import ZeroStrategy

        if stage_options:
            raise ValueError(f"ZeRO stage {zero} takes no options {sorted(stage_options)}")
        strategy = ZeroStrategy(model, mesh, optimizer_factory, stage=zero, bucket_mb=bucket_mb,
                                precision=precision, offload=offload, offload_dir=offload_dir,
                                pipeline=pipeline if zero == 2 else None)
        return _local_gradients_policy(strategy, zero, model, mesh, optimizer_factory, bucket_mb, precision)
    if zero == 3:
        from .zero.stage3 import Stage3Strategy

        strategy = Stage3Strategy(model, mesh, optimizer_factory, bucket_mb=bucket_mb, precision=precision,
                                  offload=offload, offload_dir=offload_dir, pipeline=pipeline, initial=initial,
                                  **stage_options)
        return _local_gradients_policy(strategy, zero, model, mesh, optimizer_factory, bucket_mb, precision)
    raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero!r}")


def _local_gradients_policy(strategy: GradStrategy, zero: int, model: nn.Module, mesh: Mesh,
                            optimizer_factory: OptimizerFactory, bucket_mb: float,
                            precision: PrecisionPolicy) -> GradStrategy:
    """``strategy`` itself, or, when its optimizer averages over dp itself from each rank's own
    gradients after a warm-up (``local_gradients_after``: 1-bit Adam), ZeRO-1 for the warm-up
    handing over to data parallel for the rest (``handover.HandOver``). Stages 2 and 3 are refused:
    from then on every rank needs its whole gradient and whole parameters, which they exist not
    to hold."""
    if getattr(strategy.optimizer, "local_gradients_after", None) is None or mesh.dp.size == 1:
        return strategy
    if zero != 1:
        strategy.close()
        raise ValueError(f"{type(strategy.optimizer).__name__} with ZeRO stage {zero}: after its warm-up it "
                         "updates every element on every rank from each rank's own whole gradient, which "
                         "stages 2 and 3 exist not to hold; use ZeRO stage 0 or 1")
    from .data_parallel import Stage0Strategy
    from .handover import HandOver

    return HandOver(strategy, lambda: Stage0Strategy(model, mesh, optimizer_factory, bucket_mb=bucket_mb,
                                                     precision=precision))


def apply_data_parallel(owned: nn.Module, mesh: Mesh, zero: ZeroPolicy, offload: OffloadPolicy, *,
                        precision: PrecisionPolicy, optimizer_factory: OptimizerFactory,
                        pipeline: PipelineGrads | None = None, initial=None, **stage_options) -> GradStrategy:
    """The last ``apply_*`` step: data parallelism (or ZeRO stage ``zero.stage``, with
    ``offload``) over ``mesh.dp`` for the parameters this rank trains (``owned``, under their
    full-model names); the returned strategy owns the optimizer ``optimizer_factory`` builds.
    ``pipeline``: the stages' ``PipelineGrads`` when a schedule runs the backward passes;
    ``initial``: where a ZeRO-3 shard of a meta-device model takes its initial values."""
    return build_grad_strategy(zero.stage, owned, mesh, optimizer_factory, bucket_mb=zero.bucket_mb,
                               precision=precision, offload=offload.kind, offload_dir=offload.dir,
                               pipeline=pipeline, initial=initial, **stage_options)


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that belong in a checkpoint (those ``state_dict`` keeps), by full name."""
    out = {}
    for mname, m in model.named_modules():
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set:
                out.setdefault(f"{mname}.{bname}" if mname else bname, b)
    return out


def param_ids(model: nn.Module, names: Collection[str]) -> set[int]:
    """Identities of ``model``'s parameters named in ``names`` (full-model names)."""
    if not names:
        return set()
    return {id(p) for n, p in model.named_parameters() if n in names}
