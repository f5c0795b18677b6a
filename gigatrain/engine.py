"""The training step loop, over parts composed elsewhere.

``gigatrain.api.parallelize`` (or ``gigatrain.initialize``) applies the parallel techniques to a
model in a fixed order (tensor parallel -> pipeline split -> data parallel / ZeRO) and hands the
results to an ``Engine``:

- *stages* (``apply_pipeline``): run forward and backward over this rank's micro-batches, whether
  the model is whole here or split into pipeline stages;
- a *gradient strategy* (``apply_data_parallel``): reduces gradients over dp, owns the optimizer,
  gathers full state for checkpoints;
- *placements*: where each parameter lives, from which the global norm's bookkeeping and the
  checkpoint writers follow;
- a *precision policy* (dtypes, loss scaling).

The engine only runs them: forward/backward, overflow check, global norm, clip, step. It holds
no pipeline, ZeRO or tensor-parallel branch, and never imports a model or a dataset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .distributed.mesh import Mesh
from .parallel.placement import Placements
from .parallel.resharding import gather_shards, local_shards
from .parallel.strategy import OptimizerFactory, persistent_buffers
from .precision import DynamicLossScaler, PrecisionPolicy
from .profiling import StepProfile

Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = ["Batch", "Engine", "OptimizerFactory", "StepHook", "StepResult", "default_loss"]


@dataclass
class StepResult:
    loss: float            # mean loss over the global batch (unscaled)
    grad_norm: float       # global gradient norm before clipping (nan when the step was skipped)
    skipped: bool          # no update happened on any rank (fp16 overflow, or ``nonfinite``)
    loss_scale: float | None = None
    bubble: float | None = None  # measured pipeline bubble of this step (pp > 1)
    nonfinite: bool = False  # skipped for a NaN/inf loss or gradient that no loss scale explains
    # seconds of this step in forward_s, backward_s, comm_exposed_s, optimizer_s (``StepProfile``)
    times: dict | None = None


class StepHook:
    """Called by ``Engine.train_step`` at fixed points; the base does nothing. Fault injection
    for tests and demonstrations is a hook (``gigatrain.trainer.InjectOverflow``)."""

    def after_backward(self, engine: "Engine", step: int) -> None:
        """Gradients of step ``step`` (1-based) are reduced; nothing is checked or applied yet."""


def default_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model.loss`` when the model defines one (ours do), else cross-entropy."""
    if hasattr(model, "loss"):
        return model.loss
    return nn.functional.cross_entropy


class Engine:
    """Training, evaluation and state of one rank's part of a model.

    Build it with ``gigatrain.api.parallelize`` or ``gigatrain.initialize``. It is a context
    manager: leaving it (or ``close()``) releases what the strategy and the stages hold (host
    buffers, NVMe files, hooks), and the process group if ``initialize`` created it.
    """

    def __init__(self, model: nn.Module, *, mesh: Mesh, stages, strategy, placements: Placements,
                 precision: PrecisionPolicy, grad_clip: float | None = None, loss_fn=None,
                 hooks: Sequence[StepHook] = (),
                 output_gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.mesh = mesh
        self.device = mesh.device
        self.stages = stages
        self.strategy = strategy
        self.placements = placements
        self.precision = precision
        self.grad_clip = grad_clip if grad_clip and grad_clip > 0 else None
        self.loss_fn = loss_fn or default_loss(model)
        self.hooks = list(hooks)
        self.scaler = DynamicLossScaler() if precision.loss_scaling else None
        self.step_count = 0              # optimizer steps taken (or skipped); restored by ``load``
        self.lr_schedule: Callable[[int], float] | None = None  # step -> lr, when none is given
        self.config = None               # the Config it was built from (``initialize``)
        self.owns_process_group = False  # ``initialize`` created it: ``close`` removes it
        # Parameters another rank already counts in the global norm (tied copies; tensor-parallel
        # replicas); the strategy sums over dp itself.
        self._norm_skip = placements.not_counted_here(mesh.coords, axes=("pp", "tp"))
        # Where each step's time goes; the stages and the update below mark their phases.
        self.profile = StepProfile(mesh.stats, self.device)
        # Checkpoints hold whole tensors: each is written where its gathered copy is canonical.
        self._saved_placements = placements.gathered()
        # Makes a split model output whole (tensor-parallel logits); identity otherwise.
        self.output_gather = output_gather or (lambda y: y)
        self._closed = False
        self._pending_save = None        # an asynchronous save still writing (``save``)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.strategy.optimizer

    @property
    def owned(self) -> nn.Module:
        """The parameters this rank trains, under their full-model names."""
        return self.stages.owned

    @property
    def partition_text(self) -> str:
        return self.stages.partition_text

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: feed it the ``dp_rank``-th share of a global batch."""
        return self.mesh.coords["dp"]

    @property
    def dp_size(self) -> int:
        return self.mesh.dims.dp

    def _autocast(self):
        return self.precision.autocast(self.device)

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[Batch], lr: float | None = None) -> StepResult:
        """Forward and backward over this rank's micro-batches, then one optimizer step.

        Gradients are averaged over all micro-batches of all data-parallel ranks, i.e. over the
        global batch, exactly as one process with gradient accumulation would compute them.
        ``lr`` defaults to ``lr_schedule(step_count)`` (``gigatrain.initialize`` sets the
        config's schedule). A step whose loss or global gradient norm is NaN or inf is skipped
        on every rank (``skipped`` and ``nonfinite`` set), except when the strategy already
        applied the update during backward (CPU offload without clipping or loss scaling).
        """
        if lr is None:
            if self.lr_schedule is None:
                raise ValueError("train_step needs lr: this engine has no lr_schedule")
            lr = self.lr_schedule(self.step_count)
        self.model.train()
        self.step_count += 1
        scale = self.scaler.scale if self.scaler else 1.0
        # Strategies that can update during backward (CPU offload) need lr up front, and may
        # only do so when nothing can still change the update: no clipping, no loss scaling, and
        # gradients final at the end of backward (not under a pipeline schedule).
        overlapped = self.strategy.begin_step(
            lr, overlap=(self.grad_clip is None and self.scaler is None
                         and self.stages.updates_may_overlap_backward))
        self.profile.begin()
        local_loss = self.stages.forward_backward(micro_batches, scale, self.strategy, self.loss_fn,
                                                  self._autocast, self.profile)
        with self.profile.phase("optimizer"):
            result = self._update(local_loss, lr, scale, overlapped)
        result.times = self.profile.record()
        return result

    def _update(self, local_loss: torch.Tensor, lr: float, scale: float, overlapped: bool) -> StepResult:
        """After backward: step hooks, the overflow check, the global norm, clipping and the
        strategy's update (or a skip on every rank)."""
        mean_loss = self._mean_over_dp(local_loss)
        for hook in self.hooks:
            hook.after_backward(self, self.step_count)

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
                          self.stages.bubble())

    def _grad_sq_norm(self) -> float:
        """Squared global gradient norm: what this rank owns, each parameter counted once
        (placements decide where), summed over pp and tp (the strategy has summed over dp)."""
        t = torch.tensor([self.strategy.grad_sq_norm(skip=self._norm_skip)], dtype=torch.float64,
                         device=self.device)
        self.mesh.pp.all_reduce(t)
        self.mesh.tp.all_reduce(t)
        return float(t.item())

    # -- forward only ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward_collective(self, x, post: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``post(model(x))`` computed with the whole model, returned on every rank of a pipeline.

        Every rank of the job must call it together with inputs of the same shape: a sharded
        model (ZeRO-3 gathers each block from all dp ranks; a pipeline holds each stage on one
        pp rank) has no rank that can run a forward alone. ``post`` reduces the output where it
        is produced (on the last stage), so only its result travels. Data-parallel ranks may pass
        different inputs and get their own results. The caller chooses train/eval mode.
        """
        with self._autocast():
            return self.stages.forward(x, post)

    @torch.no_grad()
    def predict(self, x, post: Callable[[torch.Tensor], torch.Tensor] = lambda y: y) -> torch.Tensor:
        """Like ``forward_collective``, with the result of data-parallel rank 0 returned on every
        rank, so that decisions taken from it (a sampled token) agree everywhere, and made whole
        where the model's output is split (``output_gather``: tensor-parallel logits). ``post``
        must keep the output's last dimension (``lambda y: y[:, -1]``)."""
        out = self.output_gather(self.forward_collective(x, post)).contiguous()
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

    # -- state ----------------------------------------------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """(parameters and persistent buffers by name, optimizer state by parameter name), full
        and unsharded, on CPU, for what this rank's stages hold. Collective over dp and over the
        axes that shard parameters (tp)."""
        params, optim = self.strategy.full_state()
        params = dict(params)
        for name, b in self._owned_buffers().items():
            params[name] = b.detach().to("cpu").clone()
        return gather_shards(params, optim, self.placements, self.mesh)

    def load_full_state(self, params: dict[str, torch.Tensor],
                        optim: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """Load state saved by ``full_state`` in any layout; a mismatch raises ``ValueError``."""
        params, optim = local_shards(params, optim, self.placements, self.mesh.coords,
                                     {"dp": self.mesh.dims.dp, "pp": self.mesh.dims.pp, "tp": self.mesh.dims.tp})
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

    def checkpoint_writes(self, name: str) -> bool:
        """Whether this rank writes tensor ``name`` of ``full_state``: the canonical copy of its
        placement, so each tensor is written by exactly one rank (buffers: dp = tp = 0)."""
        if name in self._saved_placements:
            return self._saved_placements.writes_here(name, self.mesh.coords)
        c = self.mesh.coords
        return c["dp"] == 0 and c["tp"] == 0

    def checkpoint_part(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], str]:
        """(parameters, optimizer state, file suffix) this rank writes to a checkpoint; collective
        over dp. The suffix names this rank's files (one per pipeline stage)."""
        params, optim = self.full_state()
        mine = {n: t for n, t in params.items() if self.checkpoint_writes(n)}
        part = f"-pp{self.mesh.coords['pp']}" if self.mesh.dims.pp > 1 else ""
        return mine, {n: st for n, st in optim.items() if n in mine}, part

    def save(self, root: str | Path, *, meta: dict | None = None, keep: int = 0, sharded: bool = True,
             async_save: bool = False) -> Path:
        """Write checkpoint ``step_<step_count>`` under ``root``; collective, every rank calls it.

        Sharded (the default, ``checkpoint_sharded``): every rank writes the pieces it holds,
        no rank gathers anything, and an index lets any layout read back only its own slices.
        ``sharded=False`` writes the older format instead (whole tensors, gathered over dp and tp
        and written by one rank per pipeline stage). Saving is atomic: a crash leaves the
        previous checkpoint and ``latest`` intact. ``async_save``: copy the pieces to host memory
        and write them from a background thread; the next ``save``, ``load`` or ``close`` waits
        for it (``wait_for_save``). Returns the checkpoint's path.
        """
        from . import checkpoint as ckpt

        self.wait_for_save()
        meta = dict(meta or {}, world_size=self.mesh.dims.world_size,
                    loss_scaler=self.scaler.state_dict() if self.scaler else None)
        if not sharded:
            params, optim, part = self.checkpoint_part()
            return ckpt.save_checkpoint(root, self.step_count, rank=self.mesh.rank, world_comm=self.mesh.world,
                                        params=params, optim=optim, meta=meta, device=self.device, keep=keep,
                                        writes_tensors=bool(params), part=part)
        from .checkpoint_sharded import save_sharded

        pieces, scalars = self.saved_pieces()
        out = save_sharded(root, self.step_count, rank=self.mesh.rank, world_comm=self.mesh.world, pieces=pieces,
                           scalars=scalars, meta=meta, device=self.device, rng=ckpt.rng_state(self.device),
                           keep=keep, async_save=async_save)
        if async_save:
            self._pending_save = out
            return out.job.final
        return out

    def wait_for_save(self) -> None:
        """Wait until an asynchronous save has written its files (and been published)."""
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            pending.wait()

    def saved_pieces(self):
        """(pieces, scalars) this rank writes to a sharded checkpoint: its strategy's pieces of
        each parameter and optimizer state, where its placement is the canonical copy along pp
        and tp (a tied copy, a tensor-parallel replica are written once) and, for pieces every
        dp rank holds alike, on dp rank 0; persistent buffers on dp = tp = 0."""
        from .checkpoint_sharded import SavedPiece, optim_tid, param_tid

        coords = self.mesh.coords
        pieces, scalars = self.strategy.state_pieces()
        out, kept = [], {}
        for pc in pieces:
            pl = self.placements[pc.name]
            if not pl.canonical(coords, axes=("pp", "tp")) or (pc.replicated and coords["dp"] != 0):
                continue
            tid = param_tid(pc.name) if pc.key is None else optim_tid(pc.name, pc.key)
            out.append(SavedPiece(tid, tuple(pl.shape), self._box(pc.name), pc.start, pc.end, pc.data))
        for (name, key), v in scalars.items():
            if self.placements[name].canonical(coords, axes=("pp", "tp")):
                kept.setdefault(name, {})[key] = v
        if coords["dp"] == 0 and coords["tp"] == 0:
            for name, b in self._owned_buffers().items():
                out.append(SavedPiece(param_tid(name), tuple(b.shape), None, 0, b.numel(),
                                      lambda b=b: b.detach().reshape(-1).to("cpu", torch.float32)))
        return out, kept

    def _box(self, name: str):
        """This rank's tensor-parallel slice of parameter ``name``: (dim, start, length), or None
        (a whole tensor, a buffer)."""
        pl = self.placements.get(name)
        if pl is None or pl.shard is None:
            return None
        axis, dim = pl.shard
        n = pl.shape[dim] // self.mesh.comm(axis).size
        return dim, self.mesh.coords[axis] * n, n

    def load(self, path: str | Path, *, rng: bool = True) -> int:
        """Load a checkpoint directory written in any layout (parameters, optimizer state, loss
        scale, and this rank's RNG state when ``rng``); returns its step, from which
        ``step_count`` continues. From a sharded checkpoint each rank reads only the slices it
        holds. Raises ``CheckpointError`` or ``ValueError`` when it does not fit."""
        from . import checkpoint as ckpt
        from .checkpoint_sharded import is_sharded

        self.wait_for_save()
        if is_sharded(path):
            loaded = ckpt.load_checkpoint(path, self.mesh.rank, tensors=False)
            self._load_pieces(loaded.reader)
        else:
            loaded = ckpt.load_checkpoint(path, self.mesh.rank)
            self.load_full_state(loaded.params, loaded.optim)
        if self.scaler is not None and loaded.meta.get("loss_scaler"):
            self.scaler.load_state_dict(loaded.meta["loss_scaler"])
        if rng and loaded.rng is not None:
            ckpt.set_rng_state(loaded.rng, self.device)
        self.step_count = loaded.step
        return loaded.step

    def _load_pieces(self, reader) -> None:
        """This rank's slices of a sharded checkpoint."""
        self._load_slices(_SlicedSource(reader, self._box))

    def load_weights(self, folder: str | Path) -> None:
        """Parameters and persistent buffers from a consolidated safetensors model (what
        ``gigatrain export`` writes, under the model's parameter names), each rank reading only
        the slices it holds; the optimizer state and ``step_count`` are left as they are.
        Collective only in that every rank must call it. Raises ``ValueError`` when a tensor is
        missing or its shape differs, before changing anything."""
        from .export import ConsolidatedReader

        self.wait_for_save()
        self._load_slices(_WeightsSource(ConsolidatedReader(folder), self._box))

    def _load_slices(self, source) -> None:
        """Check names and whole shapes against the model, then let the strategy read its part."""
        buffers = self._owned_buffers()
        wanted = [(n, tuple(pl.shape)) for n, pl in self.placements.items()]
        wanted += [(n, tuple(b.shape)) for n, b in buffers.items()]
        missing = sorted(n for n, _ in wanted if not source.has(n))
        if missing:
            raise ValueError(f"checkpoint lacks parameters: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for n, shape in wanted:
            if source.shape(n) != shape:
                raise ValueError(f"parameter {n}: checkpoint shape {source.shape(n)} != model {shape}")
        self.strategy.load_pieces(source)
        with torch.no_grad():
            for n, b in buffers.items():
                b.copy_(source.read(n, None, 0, b.numel()).view(b.shape))

    def _owned_buffers(self) -> dict[str, torch.Tensor]:
        """Persistent buffers (e.g. BatchNorm statistics) of the modules this rank runs."""
        mine = {id(b) for b in self.owned.buffers()}
        return {n: b for n, b in persistent_buffers(self.model).items() if id(b) in mine}

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the strategy's and the stages' resources; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.wait_for_save()
        self.strategy.close()
        self.stages.close()
        if self.owns_process_group:
            import torch.distributed as dist

            from .distributed.launch import quiesce

            if dist.is_initialized():
                quiesce(True)
                dist.destroy_process_group()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SlicedSource:
    """A sharded checkpoint seen through this rank's tensor-parallel slices (``PieceSource``)."""

    def __init__(self, reader, box):
        self.reader, self.box = reader, box

    def has(self, name: str) -> bool:
        from .checkpoint_sharded import param_tid

        return self.reader.has(param_tid(name))

    def shape(self, name: str) -> tuple[int, ...]:
        from .checkpoint_sharded import param_tid

        return self.reader.shape(param_tid(name))

    def read(self, name: str, key: str | None, start: int, end: int) -> torch.Tensor:
        from .checkpoint_sharded import optim_tid, param_tid

        return self.reader.read(param_tid(name) if key is None else optim_tid(name, key), self.box(name), start, end)

    def state_keys(self, name: str) -> list[str]:
        return self.reader.state_keys(name)

    def scalar(self, name: str, key: str) -> float | None:
        return self.reader.scalar(name, key)


class _WeightsSource:
    """An exported model (parameters only) seen through this rank's slices (``PieceSource``)."""

    def __init__(self, reader, box):
        self.reader, self.box = reader, box

    def has(self, name: str) -> bool:
        return self.reader.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)

    def read(self, name: str, key: str | None, start: int, end: int) -> torch.Tensor:
        return self.reader.read(name, self.box(name), start, end)

    def state_keys(self, name: str) -> list[str]:
        return []

    def scalar(self, name: str, key: str) -> float | None:
        return None
