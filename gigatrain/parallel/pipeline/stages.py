"""``apply_pipeline``: split a model over the pp axis and run its forward and backward passes.

The engine asks the object returned here for one thing per step, "forward and backward over
these micro-batches", and never needs to know whether a pipeline exists:

- ``SingleStage`` (pp = 1): the whole model on this rank, gradient accumulation over the
  micro-batches, the gradient strategy told which micro-step is the last (only it communicates);
- ``PipelineStages`` (pp > 1): this rank's stages, the schedule run by ``PipelineRuntime``, then
  every bucket reduced over dp at once (the schedule interleaves micro-batches' backward passes).

Both expose the parameters this rank trains under their full-model names (``owned``), their
placements, a collective forward-only pass (evaluation, sampling), and what the last step
measured (bubble, per-action timeline).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ...distributed.comm import Comm
from ..placement import Placements

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PipelinePolicy:
    """How to split the model over the pp axis (see ``gigatrain.parallel.pipeline``)."""

    schedule: str = "1f1b"            # naive | gpipe | 1f1b | interleaved | zb
    microbatches: int = 1             # micro-batches per step per data-parallel rank
    virtual: int = 1                  # model chunks per rank (interleaved, zb)
    balance: object = "params"        # params | time | uniform | list of blocks per stage
    example_batch: object = None      # (inputs, targets) of one micro-batch, for balance="time"
    transport: str = "auto"           # auto (shared memory between CPU ranks of a host) | backend
    timeout_s: float = 600.0          # a shared-memory receive fails after waiting this long


class SingleStage:
    """The whole model on this rank (pp = 1)."""

    partition_text = ""
    # Nothing runs between backward and the optimizer step, so an update may overlap backward.
    updates_may_overlap_backward = True
    pipeline_grads = None               # one backward per micro-batch, over the whole model

    def __init__(self, model: nn.Module, placements: Placements, device: torch.device):
        from ..materialize import to_device

        self.model = to_device(model, device)
        self.owned = self.model
        self.placements = placements
        self.device = device

    def forward_backward(self, micro_batches: Sequence[Batch], scale: float, strategy, loss_fn,
                         autocast, profile) -> torch.Tensor:
        """Gradient accumulation over this rank's micro-batches; only the last one communicates.
        Returns this rank's mean loss (float64, on the device). ``profile``: a
        ``profiling.StepProfile`` that gets the forward and backward phases."""
        n = len(micro_batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            strategy.set_sync(i == n - 1)
            with profile.phase("forward"), autocast():
                loss = loss_fn(self.model(x), y)
            loss_sum += loss.detach().double()
            with profile.phase("backward"):
                (loss * (scale / n)).backward()
                strategy.after_backward()
        return loss_sum / n

    def forward(self, x, post: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return post(self.model(x))

    def bubble(self) -> float | None:
        return None

    def records(self) -> list:
        return []

    def close(self) -> None:
        pass


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


class PipelineStages:
    """This rank's stages of a pipeline over ``pp`` (pp > 1)."""

    # The schedule's backward passes of different micro-batches interleave: gradients are final
    # only once the whole schedule (and the tied-weight exchange) has run.
    updates_may_overlap_backward = False

    def __init__(self, model: nn.Module, pp: Comm, policy: PipelinePolicy, placements: Placements,
                 device: torch.device, loss_fn, world: Comm):
        from ..strategy import PipelineGrads
        from .partition import Partition, partition_model
        from ..materialize import is_meta, to_device
        from .runtime import PipelineRuntime, build_stage_modules, tied_parameters
        from .schedules import build_schedule

        if policy.balance == "time" and is_meta(model):
            raise ValueError("parallel.pp_balance=time measures the blocks by running them, which a model on "
                             "the meta device cannot: use pp_balance=params or uniform, or build it materialised")
        self.model, self.pp, self.policy, self.device = model, pp, policy, device
        n_stages = pp.size * policy.virtual
        part, text = partition_model(model, n_stages, policy.balance, example_batch=policy.example_batch,
                                     pp=pp.size)
        # Every rank must use the same cut; measured times differ per rank, so rank 0 decides.
        bounds = torch.tensor(part.bounds, dtype=torch.int64, device=device)
        world.broadcast(bounds, src=0)
        if tuple(bounds.tolist()) != part.bounds:
            part = Partition(tuple(bounds.tolist()))
        for chunk in build_stage_modules(model, part, pp.rank, pp.size, policy.virtual):
            to_device(chunk, device)
        self.partition, self.partition_text = part, text
        self._scale = 1.0
        schedule = build_schedule(policy.schedule, pp.size, policy.microbatches, policy.virtual)
        self.runtime = PipelineRuntime(model, part, schedule, pp_group=pp, virtual=policy.virtual,
                                       record=True, loss_fn=lambda out, y: loss_fn(out, y) * self._scale,
                                       device=device, transport=policy.transport, timeout_s=policy.timeout_s)
        if pp.size > 1:
            via = ("shared memory (parallel.pp_transport=auto, CPU ranks of one host)" if self.runtime.shared_memory
                   else f"the {dist.get_backend(pp.group)} backend")
            self.partition_text += f"\npipeline messages through {via}"
        self.owned = StagePart(model, self.runtime.parameters(), self.runtime.chunks)
        self.placements = stage_placements(model, self.owned, placements, pp.size)
        tied = {id(p) for p in tied_parameters(model)}
        # Tied copies are summed across pp ranks after the schedule (the runtime does it): the
        # strategy must reduce them over dp only then.
        self.pipeline_grads = PipelineGrads(
            tuple(self.runtime.chunks), frozenset(n for n, p in self.owned.named_parameters() if id(p) in tied))

    def forward_backward(self, micro_batches: Sequence[Batch], scale: float, strategy, loss_fn,
                         autocast, profile) -> torch.Tensor:
        """Run the schedule, accumulating locally, then reduce everything over dp at once (the
        tied-embedding gradient is completed by the runtime first). ``profile`` gets the
        schedule's compute actions as forward (F) and backward (B, W) and its waits as
        communication."""
        strategy.set_sync(False)
        self._scale = scale
        blocked = profile.stats.blocked_s
        with autocast():
            loss = self.runtime.step(micro_batches)
        profile.add("comm", profile.stats.blocked_s - blocked)
        for r in self.runtime.records:
            if r.action.is_compute:
                profile.add("forward" if r.action.kind == "F" else "backward", r.end - r.start)
        with profile.phase("backward"):
            strategy.reduce_accumulated()
        return torch.tensor(loss / scale, dtype=torch.float64, device=self.device)

    def forward(self, x, post: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self.runtime.forward_only(x, post)

    def bubble(self) -> float | None:
        """Measured bubble of the last step: 1 - sum(busy) / (pp x longest rank span)."""
        comp = [r for r in self.runtime.records if r.action.is_compute]
        if not comp:
            return None
        busy = sum(r.end - r.start for r in comp)
        span = max(r.end for r in comp) - min(r.start for r in comp)
        t = torch.tensor([busy, span], dtype=torch.float64, device=self.device)
        s = t.clone()
        self.pp.all_reduce(s)                                            # total busy
        self.pp.all_reduce(t, op=torch.distributed.ReduceOp.MAX)          # longest span
        return 1.0 - s[0].item() / (self.pp.size * t[1].item()) if t[1] > 0 else 0.0

    def records(self) -> list:
        """This rank's per-action records of the last step."""
        return list(self.runtime.records)

    def write_timeline(self, path: Path, title: str, is_main: bool) -> None:
        """Gather the last step's compute records of this pipeline and plot them (on ``is_main``).
        Collective over pp."""
        from .schedules import B, F, W
        from .timeline import Record, plot_timeline

        kinds = {"F": 0, "B": 1, "W": 2}
        recs = [r for r in self.runtime.records if r.action.is_compute]
        n = torch.tensor([len(recs)], dtype=torch.int64, device=self.device)
        self.pp.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        rows = torch.full((int(n.item()), 5), -1.0, dtype=torch.float64)
        for i, r in enumerate(recs):
            rows[i] = torch.tensor([kinds[r.action.kind], r.action.stage, r.action.mb, r.start, r.end])
        rows = rows.to(self.device)
        gathered = torch.empty((self.pp.size,) + tuple(rows.shape), dtype=torch.float64, device=self.device)
        self.pp.all_gather(gathered.view(-1), rows.view(-1))
        if not is_main:
            return
        cls = {0: F, 1: B, 2: W}
        records = [Record(rank, cls[int(k)](int(s), int(m)), a, b)
                   for rank in range(self.pp.size) for k, s, m, a, b in gathered[rank].cpu().tolist() if k >= 0]
        plot_timeline(records, path, title=title, n_ranks=self.pp.size)

    def close(self) -> None:
        self.runtime.close()


def stage_placements(model: nn.Module, owned: nn.Module, placements: Placements, pp: int) -> Placements:
    """The placements of the parameters ``owned`` holds (one pp rank's stages): those of the
    whole model restricted to them, the tied stem/head weights marked as copies on the first and
    the last pp rank (the first one counts)."""
    from .runtime import tied_parameters

    out = placements.restrict([n for n, _ in owned.named_parameters()])
    tied = {id(p) for p in tied_parameters(model)}
    for n, p in owned.named_parameters():
        if id(p) in tied:
            out.update(n, copies=(0, pp - 1))
    return out


def apply_pipeline(model: nn.Module, pp: Comm, policy: PipelinePolicy, placements: Placements, *,
                   device: torch.device, loss_fn, world: Comm) -> SingleStage | PipelineStages:
    """Split ``model`` over ``pp`` as ``policy`` says; with one pp rank the model stays whole.

    Only this rank's stages move to ``device``. Returns the object that runs forward and backward
    for the engine; its ``placements`` are restricted to this rank's parameters, with tied copies
    marked.
    """
    if pp.size == 1:
        return SingleStage(model, placements, device)
    return PipelineStages(model, pp, policy, placements, device, loss_fn, world)
