"""Composition of the parallel techniques into one training step.

The engine takes a model, an optimizer factory and batches; it never imports a model or a dataset,
so any ``nn.Module`` with a loss works. Choices are made once, at construction:

- a *gradient strategy* (data parallel / ZeRO stage) that owns how gradients are reduced, which
  parameters the optimizer sees, and how full state is gathered for checkpoints;
- a *precision policy* (autocast dtype, loss scaling);

and ``train_step`` only runs them: forward/backward over the micro-batches, reduce, check for
overflow, clip by the global norm, step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .distributed.mesh import Mesh
from .parallel.strategy import OptimizerFactory, build_grad_strategy, persistent_buffers
from .precision import DynamicLossScaler, PrecisionPolicy

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PipelinePlan:
    """How to split the model over the pp axis (see ``gigatrain.parallel.pipeline``)."""

    schedule: str = "1f1b"            # naive | gpipe | 1f1b | interleaved | zb
    microbatches: int = 1             # micro-batches per step per data-parallel rank
    virtual: int = 1                  # model chunks per rank (interleaved, zb)
    balance: object = "params"        # params | time | uniform | list of blocks per stage
    example_batch: object = None      # (inputs, targets) of one micro-batch, for balance="time"


@dataclass
class StepResult:
    loss: float            # mean loss over the global batch (unscaled)
    grad_norm: float       # global gradient norm before clipping (nan when the step was skipped)
    skipped: bool          # no update happened on any rank (fp16 overflow, or ``nonfinite``)
    loss_scale: float | None = None
    bubble: float | None = None  # measured pipeline bubble of this step (pp > 1)
    nonfinite: bool = False  # skipped for a NaN/inf loss or gradient that no loss scale explains


def _default_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if hasattr(model, "loss"):
        return model.loss
    return nn.functional.cross_entropy


class Engine:
    """Train ``model`` over ``mesh`` with data parallelism over the ``dp`` axis.

    ``grad_strategy`` is built from ``zero`` (0 = plain data parallel); the optimizer is created
    by ``optimizer_factory`` over the parameter groups (``{"params": [...], "decay": bool}``, see
    ``gigatrain.optim.param_groups``) that the strategy exposes.
    """

    def __init__(self, model: nn.Module, mesh: Mesh, optimizer_factory: OptimizerFactory, *,
                 precision: PrecisionPolicy, grad_clip: float | None = None, zero: int = 0,
                 bucket_mb: float = 25.0, loss_fn=None, strategy_options: dict | None = None,
                 pipeline: PipelinePlan | None = None):
        self.mesh = mesh
        self.device = mesh.device
        # With a pipeline each rank moves only its own stages to the device (in _build_pipeline).
        self.model = model.to(self.device) if mesh.pp.size == 1 else model
        self.precision = precision
        self.grad_clip = grad_clip if grad_clip and grad_clip > 0 else None
        self.loss_fn = loss_fn or _default_loss(model)
        self.runtime = None
        self.partition_text = ""
        owned = self.model
        if mesh.pp.size > 1:
            owned = self._build_pipeline(pipeline or PipelinePlan())
        self.owned = owned  # the parameters this rank trains, under their full-model names
        self.strategy = build_grad_strategy(zero, owned, mesh, optimizer_factory, bucket_mb=bucket_mb,
                                            precision=precision, **(strategy_options or {}))
        self.optimizer = self.strategy.optimizer
        self.scaler = DynamicLossScaler() if precision.loss_scaling else None

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[Batch], lr: float,
                   inject_overflow: bool = False) -> StepResult:
        """Forward and backward over this rank's micro-batches, then one optimizer step.

        Gradients are averaged over all micro-batches of all data-parallel ranks, i.e. over the
        global batch, exactly as one process with gradient accumulation would compute them.
        A step whose loss or global gradient norm is NaN or inf is skipped on every rank
        (``skipped`` and ``nonfinite`` set), except when the strategy already applied the update
        during backward (CPU offload without clipping or loss scaling), which cannot be undone.
        """
        self.model.train()
        scale = self.scaler.scale if self.scaler else 1.0
        # Strategies that can update during backward (CPU offload) need lr up front, and may
        # only do so when nothing can still change the update: no clipping, no loss scaling.
        # (Not under a pipeline, whose micro-batches reduce only after the whole schedule.)
        overlapped = self.strategy.begin_step(lr, overlap=(self.grad_clip is None and self.scaler is None
                                                           and self.runtime is None))
        if self.runtime is None:
            local_loss = self._local_forward_backward(micro_batches, scale)
        else:
            local_loss = self._pipeline_forward_backward(micro_batches, scale)
        mean_loss = self._mean_over_dp(local_loss)

        if inject_overflow:
            self.strategy.grads()[0].view(-1)[0] = float("inf")
        skipped = False
        if self.scaler is not None:
            skipped = self.scaler.found_overflow(self.strategy.grads(), comm=self.mesh.world,
                                                 device=self.device)
            self.scaler.update(skipped)
        if skipped:
            self.strategy.zero_grad()
            # At the smallest loss scale an overflow is no longer the scale's fault.
            return StepResult(mean_loss, float("nan"), True, scale,
                              nonfinite=scale <= self.scaler.min_scale)

        inv_scale = 1.0 / scale
        norm = math.sqrt(self._grad_sq_norm()) * inv_scale
        if not (math.isfinite(norm) and math.isfinite(mean_loss)) and not overlapped:
            # NaN > grad_clip is false, so this update would write NaN into every weight. The norm
            # and the loss are global, so every rank skips together.
            self.strategy.zero_grad()
            return StepResult(mean_loss, norm, True, self.scaler.scale if self.scaler else None,
                              nonfinite=True)
        coef = inv_scale
        if self.grad_clip is not None and norm > self.grad_clip:
            coef *= self.grad_clip / (norm + 1e-6)
        self.strategy.step(lr, coef)
        self.strategy.zero_grad()
        return StepResult(mean_loss, norm, False, self.scaler.scale if self.scaler else None,
                          self._bubble())

    def _local_forward_backward(self, micro_batches: Sequence[Batch], scale: float) -> torch.Tensor:
        """Gradient accumulation over this rank's micro-batches; only the last one communicates."""
        n = len(micro_batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            self.strategy.set_sync(i == n - 1)
            with self.precision.autocast(self.device):
                out = self.model(x)
                loss = self.loss_fn(out, y)
            loss_sum += loss.detach().double()
            (loss * (scale / n)).backward()
            self.strategy.after_backward()
        return loss_sum / n

    # -- pipeline parallel ----------------------------------------------------------------------
    def _build_pipeline(self, plan: PipelinePlan) -> nn.Module:
        from .parallel.pipeline import (Partition, PipelineRuntime, build_schedule, build_stage_modules,
                                        partition_model)

        pp = self.mesh.pp
        n_stages = pp.size * plan.virtual
        part, text = partition_model(self.model, n_stages, plan.balance,
                                     example_batch=plan.example_batch, pp=pp.size)
        # Every rank must use the same cut; measured times differ per rank, so rank 0 decides.
        bounds = torch.tensor(part.bounds, dtype=torch.int64, device=self.device)
        self.mesh.world.broadcast(bounds, src=0)
        if tuple(bounds.tolist()) != part.bounds:
            part = Partition(tuple(bounds.tolist()))
        for chunk in build_stage_modules(self.model, part, pp.rank, pp.size, plan.virtual):
            chunk.to(self.device)
        self.partition = part
        self.partition_text = text
        schedule = build_schedule(plan.schedule, pp.size, plan.microbatches, plan.virtual)
        self._pp_scale = 1.0
        self.runtime = PipelineRuntime(self.model, part, schedule, pp_group=pp,
                                       virtual=plan.virtual, record=True,
                                       loss_fn=lambda out, y: self.loss_fn(out, y) * self._pp_scale)
        self._tied = self.runtime._tied if self.runtime._tie_peer is not None else []
        return StagePart(self.model, self.runtime.parameters(), self.runtime.chunks)

    def _pipeline_forward_backward(self, micro_batches: Sequence[Batch], scale: float) -> torch.Tensor:
        """Run the schedule, accumulating locally, then reduce everything over dp at once.

        The pipeline interleaves the backward passes of different micro-batches, so buckets are
        not reduced during backward here; the tied-embedding gradient is completed by the runtime
        first, then the strategy reduces all buckets.
        """
        self.strategy.set_sync(False)
        self._pp_scale = scale
        with self.precision.autocast(self.device):
            loss = self.runtime.step(micro_batches)
        self.strategy.reduce_accumulated()
        return torch.tensor(loss / scale, dtype=torch.float64, device=self.device)

    def _grad_sq_norm(self) -> float:
        """Squared global gradient norm over every parameter of the model, each counted once."""
        pp = self.mesh.pp
        if pp.size == 1:
            return self.strategy.grad_sq_norm()
        # The tied embedding's gradient also lives on the first stage: count it there only.
        exclude = self._tied if (self._tied and pp.rank == pp.size - 1) else ()
        sq = self.strategy.grad_sq_norm(exclude=exclude) if exclude else self.strategy.grad_sq_norm()
        t = torch.tensor([sq], dtype=torch.float64, device=self.device)
        pp.all_reduce(t)
        return float(t.item())

    def _bubble(self) -> float | None:
        """Measured bubble of the last pipeline step: 1 - sum(busy) / (pp x longest rank span)."""
        if self.runtime is None or not self.runtime.records:
            return None
        comp = [r for r in self.runtime.records if r.action.is_compute]
        busy = sum(r.end - r.start for r in comp)
        span = max(r.end for r in comp) - min(r.start for r in comp)
        t = torch.tensor([busy, span], dtype=torch.float64, device=self.device)
        s = t.clone()
        self.mesh.pp.all_reduce(s)                      # total busy
        self.mesh.pp.all_reduce(t, op=torch.distributed.ReduceOp.MAX)   # longest span
        return 1.0 - s[0].item() / (self.mesh.pp.size * t[1].item()) if t[1] > 0 else 0.0

    def timeline_records(self) -> list:
        """This rank's records of the last pipeline step (empty without a pipeline)."""
        return list(self.runtime.records) if self.runtime is not None else []

    @torch.no_grad()
    def forward_collective(self, x, post: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``post(model(x))`` computed with the whole model, returned on every rank of a pipeline.

        Every rank of the job must call it together with inputs of the same shape: a sharded
        model (ZeRO-3 gathers each block from all dp ranks; a pipeline holds each stage on one
        pp rank) has no rank that can run a forward alone. ``post`` reduces the output where it
        is produced (on the last stage), so only its result travels. Data-parallel ranks may pass
        different inputs and get their own results. The caller chooses train/eval mode.
        """
        with self.precision.autocast(self.device):
            if self.runtime is not None:
                return self.runtime.forward_only(x, post)
            return post(self.model(x))

    @torch.no_grad()
    def predict(self, x, post: Callable[[torch.Tensor], torch.Tensor] = lambda y: y) -> torch.Tensor:
        """Like ``forward_collective``, with the result of data-parallel rank 0 returned on every
        rank, so that decisions taken from it (a sampled token) agree everywhere."""
        out = self.forward_collective(x, post).contiguous()
        self.mesh.dp.broadcast(out, src=0)
        return out

    @torch.no_grad()
    def eval_step(self, micro_batches: Sequence[Batch]) -> tuple[float, float | None]:
        """Mean loss (and accuracy for classifiers) over the global batch, without updating.

        Collective like ``forward_collective``: every rank calls it with its own micro-batches.
        """
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count

        for x, y in micro_batches:
            y = y.to(self.device)

            def stats(out, y=y):
                loss = self.loss_fn(out, y).double()
                if out.dim() == 2 and y.dim() == 1:
                    correct = (out.argmax(-1) == y).sum().double()
                    return torch.stack([loss, correct, torch.tensor(float(y.numel()), dtype=torch.float64,
                                                                    device=out.device)])
                return torch.stack([loss, loss.new_zeros(()), loss.new_zeros(())])

            totals += self.forward_collective(x, stats).to(self.device)
        n = max(1, len(micro_batches))
        mean = self._mean_over_dp(totals[0] / n)
        acc = self._mean_over_dp(totals[1] / totals[2]) if totals[2] > 0 else None
        self.model.train()
        return mean, acc

    def _mean_over_dp(self, value: torch.Tensor) -> float:
        dp = self.mesh.dp
        if dp.size > 1:
            value = value.clone()
            dp.all_reduce(value)
            value /= dp.size
        return float(value.item())

    # -- state for checkpoints ------------------------------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """(parameters and persistent buffers by name, optimizer state by parameter name), full
        and unsharded, on CPU."""
        params, optim = self.strategy.full_state()
        params = dict(params)
        for name, b in self._owned_buffers().items():
            params[name] = b.detach().to("cpu").clone()
        return params, optim

    def load_full_state(self, params: dict[str, torch.Tensor],
                        optim: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """Load state saved by ``full_state`` in any layout; a mismatch raises ``ValueError``."""
        try:
            self.strategy.load_full_state(params, optim)
        except KeyError as e:
            raise ValueError(str(e).strip("'\"")) from None
        with torch.no_grad():
            for name, b in self._owned_buffers().items():
                if name in params:
                    if tuple(params[name].shape) != tuple(b.shape):
                        raise ValueError(f"buffer {name}: checkpoint shape {tuple(params[name].shape)} "
                                         f"!= model {tuple(b.shape)}")
                    b.copy_(params[name])

    def _owned_buffers(self) -> dict[str, torch.Tensor]:
        """Persistent buffers (e.g. BatchNorm statistics) of the modules this rank runs."""
        mine = {id(b) for b in self.owned.buffers()}
        return {n: b for n, b in persistent_buffers(self.model).items() if id(b) in mine}


class StagePart(nn.Module):
    """The parameters one pipeline rank trains, named as in the full model.

    Gradient strategies and checkpoints see only this rank's parameters, under the names they
    have in the full model, so a checkpoint written by pipeline stages loads into any layout.
    """

    def __init__(self, model: nn.Module, params, chunks):
        super().__init__()
        ids = {id(p) for p in params}
        self._named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
        self.chunks = nn.ModuleList(chunks)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from ((prefix + n, p) for n, p in self._named)

    def parameters(self, recurse: bool = True):
        yield from (p for _, p in self._named)

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("StagePart only groups parameters; the pipeline runtime runs the stages")
