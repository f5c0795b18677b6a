"""ZeRO stages 1 and 2 over the data-parallel group, optionally with the optimizer on the CPU.

Layout
------
Trainable parameters are grouped into flat buckets (``GradBuckets``, padded to a multiple of the
dp size N, so each bucket splits into N equal shards). The parameters of a bucket live in one flat
buffer and every ``param.data`` is a view into it, so an updated bucket comes back with one
in-place all-gather. Rank r owns shard r of every bucket: the fp32 master of that range (with fp32
parameters and no offload the parameters themselves are the master: no copy), the optimizer
states, and the reduced gradient. Parameters are ordered so that inside each bucket the
weight-decay ones come first; a shard is then at most two optimizer Parameters (flat fp32 views),
one per decay group, so weight decay applies exactly as in one process, and the optimizer can
update the shards bucket by bucket (it steps only the Parameters that have a gradient).

With bf16/fp16 precision the model's parameters and gradients are kept in that dtype (2 bytes) and
the fp32 master lives in the shard, which gives the ZeRO paper's model-state bytes per rank
(``memory.model_state_bytes``): stage 1 ``2P + 2P + 12P/N``, stage 2 ``2P + 14P/N`` with Adam.

Stage 1: full low-precision gradient buffers (autograd accumulates into them across micro-steps).
On the last micro-step each bucket is reduce-scattered in place (its own shard of the buffer
receives the average) as soon as backward completes it.

Stage 2: no full gradient buffer. A parameter's gradient is copied into its bucket's buffer (taken
from a small pool) the moment autograd has accumulated it, ``param.grad`` is dropped, and the
complete bucket is reduce-scattered asynchronously into the rank's persistent gradient shard while
backward goes on; the buffer returns to the pool when the reduce-scatter is done. Launching a
bucket first finishes all but the last ``MAX_IN_FLIGHT`` reduce-scatters, so only a few bucket
buffers ever exist at once (the pool is emptied after every step's backward). Gradient
accumulation: stage 2 reduce-scatters on *every* micro-step and accumulates into the shard. The
alternative, accumulating locally until the last micro-step, needs a full gradient buffer during
accumulation, which is exactly the memory stage 2 exists to remove; the price is one extra
reduce-scatter (P(N-1)/N elements) per extra micro-step. Stage 1 keeps the full buffer anyway, so
it accumulates locally and communicates once per step.

Offload (``offload="cpu"``, see ``offload.py``): master and optimizer states on the host, gradient
shards stream to the host in the parameter dtype as buckets complete, the CPU updates one bucket
shard at a time and the new low-precision shard is copied back and all-gathered (the all-gather of
bucket k overlaps the CPU update of bucket k+1). Updating a bucket *during* backward is only
correct once nothing can still change its gradient's scale: the global gradient norm (clipping)
and the fp16 overflow decision need every bucket first, and the learning rate of the step must be
known. So the overlapped update runs only when the caller announces the step with
``begin_step(lr, overlap=True)``, promising no clipping, no loss scaling (``grad_coef == 1``) and
no skipped step; otherwise the update waits for ``step``.

Under a pipeline (``PipelineGrads``) a step runs one backward pass per micro-batch and chunk, in
the schedule's order, interleaved with other passes. Stage 1 accumulates locally and reduces after
the schedule, as without one. Stage 2 plans its buckets per chunk (a bucket never spans two
chunks), counts each chunk's passes separately, and reduce-scatters a chunk's buckets as each of
its passes delivers them (a zero-bubble schedule's W pass, for its parameter gradients); the
in-flight buffer leaves the bucket at launch, so the chunk's next pass may fill it again. The
tied weight's copies on the first and last stage are summed across pp ranks after the schedule,
so those parameters (``late``) accumulate locally and leave in ``reduce_accumulated``.

What differs between the two stages (when a bucket is reduce-scattered, where the reduced shard
and the accumulated gradients live) is a small policy object, ``_Stage1Reduce`` or
``_Stage2Reduce``, chosen once at construction; the rest of the strategy, the optimizer over the
shards, the host update (``offload.HostShard``) and the name-keyed state (``shards.StateCodec``)
are the same code for both. The interface is ``gigatrain.parallel.strategy.GradStrategy``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ...distributed.mesh import Mesh
from ...optim import decays
from ...precision import PrecisionPolicy
from ..strategy import param_ids
from .buckets import Bucket, GradBuckets, remove_hooks
from .offload import HostShard, Worker
from .shards import (Segment, StateCodec, TorchStates, attach_pieces, decay_pieces, layer_spans, local_sq_norm,
                     optimizer_over, torch_step)

if TYPE_CHECKING:
    from ..strategy import OptimizerFactory, PipelineGrads

OFFLOAD_CHOICES = ("none", "cpu")
_META = torch.device("meta")


@dataclass
class _Shard(Segment):
    """This rank's part ``[lo, hi)`` of one bucket and where its optimizer inputs live."""

    bucket: Bucket
    pflat: torch.Tensor                # all of the bucket's parameters; param.data are views
    master: torch.Tensor | None        # fp32 master of [lo, hi); None when pflat[lo:hi] is it
    grad: torch.Tensor                 # reduced gradient of [lo, hi), parameter dtype
    fresh: bool = True                 # grad holds nothing of this step: next delivery overwrites
    event: object = None               # CUDA event of the last device->host gradient copy

    def param_shard(self) -> torch.Tensor:
        return self.pflat[self.lo:self.hi]


class _BufferPool:
    """Flat gradient buffers for the stage-2 buckets in flight, reused within a backward."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.numel, self.dtype, self.device = numel, dtype, device
        self.free: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        return self.free.pop() if self.free else torch.empty(self.numel, dtype=self.dtype, device=self.device)

    def give(self, base: torch.Tensor) -> None:
        self.free.append(base)

    def clear(self) -> None:
        self.free.clear()


class _Overlap:
    """Book-keeping of one step whose host update runs during backward."""

    def __init__(self, lr: float):
        self.lr = lr
        self.submitted = 0
        self.partials: list[float] = []


# -- what differs between stage 1 and stage 2 ------------------------------------------------------
class _Stage1Reduce:
    """Stage 1: autograd accumulates into full gradient buckets across micro-steps; on the last
    micro-step each bucket is reduce-scattered in place, into this rank's part of the buffer."""

    bucket_device: torch.device | None = None     # resident buffers, on the compute device

    def __init__(self, zs: ZeroStrategy):
        self.zs = zs
        # Divide by N after the reduce-scatter, on the shard only, except with fp16, whose sum
        # could overflow.
        self.prescale = zs.param_dtype == torch.float16 and zs.comm.size > 1

    def grad_home(self, b: Bucket, lo: int, hi: int, offset: int) -> torch.Tensor:
        return b.buffer[lo:hi]

    def install(self) -> None:
        self.zs.buckets.attach_grads()

    def communicates(self, sync: bool) -> bool:
        return sync

    def launch(self, sh: _Shard) -> torch.Tensor:
        """Prepare ``sh``'s bucket for its reduce-scatter and return where the result goes."""
        if self.prescale:
            sh.bucket.buffer.div_(self.zs.comm.size)
        return sh.bucket.buffer[sh.lo:sh.hi]

    def issued(self, sh: _Shard) -> None:
        """The bucket's buffer is resident and reduced in place: nothing to hand over."""

    def landed(self, sh: _Shard, out: torch.Tensor, issued) -> None:
        n = self.zs.comm.size
        if not self.prescale and n > 1:
            out.div_(n)                 # the sum -> the average, on the shard only

    def keep(self, sh: _Shard, out: torch.Tensor) -> None:
        """``out`` is the gradient shard itself: nothing to add."""

    def backward_done(self, sync: bool) -> None:
        pass

    def zero_grad(self) -> None:
        self.zs.buckets.zero_()

    def reduce_accumulated(self) -> None:
        zs = self.zs
        zs.buckets.reset()
        zs._sync = True
        zs.after_backward()

    def close(self) -> None:
        pass


class _Stage2Reduce:
    """Stage 2: no full gradient buffer. Each gradient is copied (divided by N) into its bucket's
    buffer, taken from a small pool, as soon as autograd has accumulated it; a complete bucket is
    reduce-scattered on every micro-step and added into this rank's gradient shard."""

    bucket_device = _META       # placeholders until a bucket is in flight

    def __init__(self, zs: ZeroStrategy):
        self.zs = zs
        self.grad_flat = None if zs.offload else torch.zeros(zs.shard_numel, dtype=zs.param_dtype,
                                                               device=zs.device)
        self._slot: dict[int, tuple[Bucket, int]] = {}
        self._handles: list = []
        self.pool: _BufferPool | None = None

    def grad_home(self, b: Bucket, lo: int, hi: int, offset: int) -> torch.Tensor:
        return self.grad_flat[offset:offset + hi - lo]

    def install(self) -> None:
        zs = self.zs
        self.pool = _BufferPool(max(b.padded_numel for b in zs.buckets.buckets), zs.param_dtype, zs.device)
        for b in zs.buckets.buckets:
            for p, o in zip(b.params, b.offsets):
                self._slot[id(p)] = (b, o)
        for p in zs.buckets.params:   # registered first: runs before the bucket counter
            if id(p) not in zs.late:
                self._handles.append(p.register_post_accumulate_grad_hook(self._take_grad))

    def _take_grad(self, p: torch.Tensor) -> None:
        """Move a just-accumulated gradient into its bucket and drop ``param.grad``."""
        b, o = self._slot[id(p)]
        if b.buffer.device.type == "meta":
            self._acquire(b)
        dst = b.buffer[o:o + p.numel()].view_as(p)
        if id(p) in b.state["arrived"]:
            # A second pass before the bucket left (it waits for an unused parameter of a
            # pipeline chunk): accumulate.
            dst.add_(p.grad / self.zs.comm.size)
        else:
            # Divided on the way in (free: the copy happens anyway) so the sum is the average.
            torch.div(p.grad, self.zs.comm.size, out=dst)
        b.state["arrived"].add(id(p))
        p.grad = None

    def _acquire(self, b: Bucket) -> None:
        base = self.pool.take()
        b.state["base"] = base
        b.state["arrived"] = set()
        b.buffer = base[:b.padded_numel]
        b.buffer[b.numel:].zero_()   # padding; every parameter's range is written or zeroed

    def communicates(self, sync: bool) -> bool:
        return True

    def launch(self, sh: _Shard) -> torch.Tensor:
        b = sh.bucket
        if b.buffer.device.type == "meta":      # no parameter of it got a gradient
            self._acquire(b)
        arrived = b.state["arrived"]
        if len(arrived) < len(b.params):        # unused parameters: zero their ranges
            for p, o in zip(b.params, b.offsets):
                if id(p) not in arrived:
                    b.buffer[o:o + p.numel()].zero_()
        if sh.fresh and not self.zs.offload:
            # Under a pipeline the next pass of this chunk may launch the bucket again before
            # this reduce-scatter lands: that one must add, not overwrite.
            sh.fresh = False
            return sh.grad
        return torch.empty(sh.shard_numel, dtype=self.zs.param_dtype, device=self.zs.device)

    def issued(self, sh: _Shard) -> torch.Tensor:
        """Detach the in-flight buffer from its bucket (a pipeline's next pass may fill the
        bucket while it travels); returned to the pool when the reduce-scatter lands."""
        b = sh.bucket
        base = b.state.pop("base")
        b.buffer = torch.empty(b.padded_numel, dtype=self.zs.param_dtype, device=_META)
        return base

    def landed(self, sh: _Shard, out: torch.Tensor, issued: torch.Tensor) -> None:
        self.pool.give(issued)

    def keep(self, sh: _Shard, out: torch.Tensor) -> None:
        if out is not sh.grad:
            sh.grad.add_(out)

    def backward_done(self, sync: bool) -> None:
        if sync:
            self.pool.clear()

    def zero_grad(self) -> None:
        pass    # the next delivery overwrites a fresh shard

    def reduce_accumulated(self) -> None:
        zs = self.zs
        if zs.pipeline is None:
            raise RuntimeError("reduce_accumulated needs ZeRO stage 1, or stage 2 built with the pipeline's "
                               "PipelineGrads (stage 2 keeps no local gradients)")
        # The chunks' buckets left during the schedule; the late (tied) gradients are complete now.
        for p in zs.buckets.params:
            if id(p) in zs.late and p.grad is not None:
                self._take_grad(p)
                zs.buckets.arrived(p)
        zs._sync = True
        zs.after_backward()

    def close(self) -> None:
        remove_hooks(self._handles)


class ZeroStrategy:
    """ZeRO stage 1 or 2 for ``model`` over ``mesh.dp`` (a ``GradStrategy``).

    ``optimizer_factory`` builds the optimizer over this rank's flat fp32 shard pieces (decay /
    no-decay groups). ``offload`` is "none" or "cpu" (fp32 master and optimizer states in host
    memory, the update on the CPU). ``bucket_mb`` is the size of a gradient bucket in the
    parameter dtype.
    """

    MAX_IN_FLIGHT = 2   # reduce-scatters left running while backward goes on

    def __init__(self, model: nn.Module, mesh: Mesh, optimizer_factory: OptimizerFactory, *, stage: int,
                 bucket_mb: float = 25.0, precision: PrecisionPolicy, offload: str | None = "none",
                 offload_dir=None, pipeline: PipelineGrads | None = None):
        if stage not in (1, 2):
            raise ValueError(f"ZeroStrategy implements stages 1 and 2, not {stage}")
        offload = offload or "none"
        if offload not in OFFLOAD_CHOICES:
            raise ValueError(f"ZeRO stage {stage} supports offload 'none' or 'cpu', not {offload!r} "
                             f"(NVMe offload needs stage 3)")
        if stage == 2 and mesh.pp.size > 1 and pipeline is None:
            raise ValueError("ZeRO stage 2 under a pipeline (pp > 1) needs the stages' PipelineGrads "
                             "(apply_data_parallel(..., pipeline=stages.pipeline_grads)): it reduce-scatters "
                             "each chunk's gradients as the schedule's backward passes end")
        self.stage = stage
        self.pipeline = pipeline if stage == 2 else None
        self.model = model
        self.mesh = mesh
        self.comm = mesh.dp
        self.device = mesh.device
        self.offload = offload == "cpu"
        self.param_dtype = precision.param_dtype
        self._cuda = self.device.type == "cuda"
        n_ranks, rank = self.comm.size, self.comm.rank

        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        names = {id(p): n for n, p in trainable}
        late_names = self.pipeline.late if self.pipeline is not None else frozenset()
        self.late = {id(p) for n, p in trainable if n in late_names}
        # Buckets are planned walking the list backwards, so putting the non-decaying parameters
        # first makes every bucket hold its decaying parameters before its non-decaying ones.
        # Under a pipeline that holds per pass (chunk), and the late parameters form a pass of
        # their own, reduced after the schedule.
        passes = _pass_labels(trainable, self.pipeline, self.late)
        ordered, labels = [], []
        for label in sorted(set(passes.values())):
            mine = [(n, p) for n, p in trainable if passes[id(p)] == label]
            for n, p in [(n, p) for n, p in mine if not decays(n, p)] + [(n, p) for n, p in mine if decays(n, p)]:
                ordered.append(p)
                labels.append(label)
        self._broadcast_untracked()

        policy_cls = _Stage1Reduce if stage == 1 else _Stage2Reduce
        lp_size = torch.empty((), dtype=self.param_dtype).element_size()
        bucket_bytes = max(1, int(bucket_mb * 2**20 * ordered[0].element_size() / lp_size))
        self.buckets = GradBuckets(ordered, bucket_bytes, align=n_ranks, dtype=self.param_dtype,
                                   device=policy_cls.bucket_device or self.device,
                                   passes=labels if self.pipeline is not None else None)
        sizes = [b.padded_numel // n_ranks for b in self.buckets.buckets]
        self.shard_numel = total = sum(sizes)
        self.policy = policy_cls(self)
        keeps_master = self.offload or self.param_dtype != torch.float32
        self._host = HostShard(total, self.param_dtype, pin=self._cuda) if self.offload else None
        self._master = torch.empty(total, dtype=torch.float32, device=self.device) \
            if keeps_master and not self.offload else None

        self.shards: list[_Shard] = []
        offset = 0
        with torch.no_grad():
            for b, s in zip(self.buckets.buckets, sizes):
                lo, hi = rank * s, (rank + 1) * s
                full = torch.zeros(b.padded_numel, dtype=torch.float32, device=self.device)
                for p, o in zip(b.params, b.offsets):
                    full[o:o + p.numel()].copy_(p.detach().reshape(-1))
                self.comm.broadcast(full, src=0)   # every rank starts from rank 0's weights
                pflat = full if self.param_dtype == torch.float32 else full.to(self.param_dtype)
                master = None
                if self._host is not None:
                    master = self._host.master[offset:offset + s]
                elif self._master is not None:
                    master = self._master[offset:offset + s]
                if master is not None:
                    master.copy_(full[lo:hi])
                for p, o in zip(b.params, b.offsets):
                    p.data = pflat[o:o + p.numel()].view_as(p)
                grad = self._host.grad[offset:offset + s] if self._host is not None \
                    else self.policy.grad_home(b, lo, hi, offset)
                bnames = [names[id(p)] for p in b.params]
                self.shards.append(_Shard(b.params, bnames, b.offsets, b.padded_numel, lo, hi, offset,
                                          decay_pieces(b.params, bnames, b.offsets, b.padded_numel, lo, hi),
                                          b, pflat, master, grad))
                offset += s
                del full
        self._shard_of = {sh.bucket.index: sh for sh in self.shards}

        self.policy.install()
        self.buckets.register_hooks(self._on_ready, skip=self.late)
        self._sync = True
        self._pending: list[tuple[_Shard, object, torch.Tensor, object]] = []
        self._chunks: list[list[_Shard]] = _chunk(self.shards, max(b.padded_numel for b in self.buckets.buckets))
        self._worker = Worker() if self.offload else None
        self._overlap: _Overlap | None = None
        # Where a reduced shard goes, and how the optimizer runs: decided once, here.
        self._deliver = self._to_host if self.offload else self.policy.keep
        self._update = self._host_step if self.offload else self._device_step
        self.optimizer = self._build_optimizer(optimizer_factory)
        self._codec = StateCodec(self.shards, comm=self.comm, device=self.device,
                                 frozen=[(n, p) for n, p in model.named_parameters() if not p.requires_grad],
                                 order=[n for n, _ in model.named_parameters()])

    # -- set-up helpers ---------------------------------------------------------------------------
    def _broadcast_untracked(self) -> None:
        """Frozen parameters and buffers are not sharded; start them from rank 0 too."""
        with torch.no_grad():
            for p in self.model.parameters():
                if not p.requires_grad:
                    self.comm.broadcast(p.data, src=0)
            for buf in self.model.buffers():
                self.comm.broadcast(buf, src=0)

    def _build_optimizer(self, factory: OptimizerFactory) -> torch.optim.Optimizer:
        """``factory(groups)`` over this rank's flat fp32 shard pieces (decay / no-decay), with
        the layout a layer-wise optimizer needs to take norms of whole parameters."""
        layout = layer_spans(self.shards, [n for n, _ in self.model.named_parameters()], self.comm)
        if self._host is not None:
            return self._host.build_optimizer(factory, self.shards, layout)
        pieces = attach_pieces(self.shards, lambda sh: sh.master if sh.master is not None else sh.param_shard())
        return optimizer_over(factory, pieces, layout)

    # -- backward -------------------------------------------------------------------------------
    def set_sync(self, sync: bool) -> None:
        """False on accumulation micro-steps. Stage 1 then communicates nothing; stage 2 still
        reduce-scatters every bucket (it keeps no full gradient buffer to accumulate into)."""
        self._sync = sync

    def begin_step(self, lr: float, *, overlap: bool = False) -> bool:
        """Announce the coming step, before its first micro-step's backward.

        ``overlap=True`` promises that ``step`` will be called with ``lr`` and ``grad_coef == 1``
        (no gradient clipping, no loss scaling, so no skipped step). With ``offload="cpu"`` each
        bucket's host update then runs on a worker thread as soon as its final gradient has reached
        the host, overlapping the rest of backward. Otherwise this call changes nothing. Returns
        whether the update will run during backward (and so can no longer be skipped).
        """
        # An optimizer that communicates in its step (LAMB's norms) must step on this thread.
        if not (self.offload and overlap) or getattr(self.optimizer, "step_communicates", False):
            self._overlap = None
            return False
        self._overlap = _Overlap(float(lr))
        for g in self.optimizer.param_groups:
            g["lr"] = float(lr)
        return True

    def _on_ready(self, b: Bucket) -> None:
        if not self.policy.communicates(self._sync):
            return
        sh = self._shard_of[b.index]
        out = self.policy.launch(sh)
        work = self.comm.reduce_scatter(out, b.buffer, async_op=True)
        self._pending.append((sh, work, out, self.policy.issued(sh)))
        self._drain(keep=self.MAX_IN_FLIGHT)

    def _drain(self, keep: int) -> None:
        """Finish reduce-scatters in launch order: those already done, and older ones until at
        most ``keep`` are in flight (which bounds the stage-2 buffers alive at once)."""
        while self._pending:
            sh, work, out, issued = self._pending[0]
            if len(self._pending) <= keep and work is not None and not work.is_completed():
                return
            self._pending.pop(0)
            if work is not None:
                work.wait()
            self.policy.landed(sh, out, issued)
            self._deliver(sh, out)
            sh.fresh = False

    def _to_host(self, sh: _Shard, src: torch.Tensor) -> None:
        if sh.fresh:
            sh.grad.copy_(src, non_blocking=self._cuda)
        else:
            sh.grad.add_(src.to("cpu"))
        if self._cuda:
            sh.event = torch.cuda.Event()
            sh.event.record()
        if self._overlap is not None and self._sync:
            self._overlap.submitted += 1
            self._worker.submit(lambda sh=sh: self._overlapped_update(sh))

    def _overlapped_update(self, sh: _Shard) -> float:
        if sh.event is not None:
            sh.event.synchronize()
        part = float(sh.grad.float().pow(2).sum())
        self._host.update([sh], 1.0)
        return part

    def reduce_accumulated(self) -> None:
        """Reduce-scatter every bucket now (stage 1): the gradients were accumulated with sync off,
        e.g. by a pipeline schedule that interleaves the micro-batches' backward passes."""
        self.policy.reduce_accumulated()

    def after_backward(self) -> None:
        if self.policy.communicates(self._sync):
            self.buckets.flush()
            self._drain(keep=0)
        self.buckets.reset()
        self.policy.backward_done(self._sync)

    # -- gradients ------------------------------------------------------------------------------
    def grads(self) -> list[torch.Tensor]:
        """This rank's reduced gradient shards (on the host with offload)."""
        if self._overlap is not None and self._overlap.submitted:
            raise RuntimeError("the gradients were consumed by the overlapped update of this step")
        return [sh.grad for sh in self.shards]

    def _wait_host(self, shards: list[_Shard]) -> None:
        for sh in shards:
            if sh.event is not None:
                sh.event.synchronize()
                sh.event = None

    def grad_sq_norm(self, skip=()) -> float:
        """Squared L2 norm of the full averaged gradient (shards summed over the dp group),
        leaving out the parameters named in ``skip`` (e.g. a tied weight another stage counts)."""
        skip = param_ids(self.model, skip)
        if self._overlap is not None and self._overlap.submitted:
            if skip:
                raise RuntimeError("skip is not available with the overlapped host update")
            self._overlap.partials += self._worker.wait_all()
            local = float(sum(self._overlap.partials))
        else:
            self._wait_host(self.shards)
            local = local_sq_norm(self.shards, lambda sh: sh.grad, skip)
        return self.comm.all_reduce_scalar(local, device=self.device)

    def zero_grad(self) -> None:
        if self._overlap is not None and self._overlap.submitted:
            raise RuntimeError("a step whose update already ran during backward was skipped: "
                               "begin_step(overlap=True) requires grad_coef == 1 and no skipped step")
        self.policy.zero_grad()
        for sh in self.shards:
            sh.fresh = True

    # -- the update -----------------------------------------------------------------------------
    def step(self, lr: float, grad_coef: float) -> None:
        """Scale the gradient shards by ``grad_coef``, update this rank's shards with ``lr``, and
        all-gather the updated parameters into every rank's model."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        works: list = []
        self._update(lr, grad_coef, works)
        for w in works:
            if w is not None:
                w.wait()

    def _all_gather(self, sh: _Shard):
        return self.comm.all_gather(sh.pflat, sh.param_shard(), async_op=True)

    def _device_step(self, lr: float, coef: float, works: list) -> None:
        # Chunk by chunk (about one bucket's elements each): the all-gather of a chunk overlaps
        # the update of the next, and with low-precision gradients their fp32 copy exists for one
        # chunk at a time.
        for chunk in self._chunks:
            torch_step(self.optimizer, [pc.param for sh in chunk for pc in sh.pieces],
                       [sh.grad[pc.start:pc.end] for sh in chunk for pc in sh.pieces], coef)
            for sh in chunk:
                if sh.master is not None:
                    sh.param_shard().copy_(sh.master)
                works.append(self._all_gather(sh))

    def _host_step(self, lr: float, coef: float, works: list) -> None:
        ov, self._overlap = self._overlap, None
        overlapped = ov is not None and ov.submitted
        if overlapped:
            if coef != 1.0 or lr != ov.lr:
                raise RuntimeError(f"begin_step(lr={ov.lr}, overlap=True) promised grad_coef 1 and that lr; "
                                   f"step got grad_coef {coef} and lr {lr}")
            self._worker.wait_all()
        for sh in self.shards:
            if not overlapped:
                self._wait_host([sh])
                # The new low-precision values overwrite the consumed gradient and go back from there.
                self._host.update([sh], coef)
            sh.param_shard().copy_(sh.grad, non_blocking=self._cuda)
            works.append(self._all_gather(sh))

    # -- full state for checkpoints ---------------------------------------------------------------
    def _master_of(self, sh: _Shard) -> torch.Tensor:
        return sh.master if sh.master is not None else sh.pflat

    def _load_master(self, sh: _Shard, full: torch.Tensor) -> None:
        sh.pflat.copy_(full.to(self.device))
        if sh.master is not None:
            sh.master.copy_(full[sh.lo:sh.hi])

    def full_state(self):
        """(parameters by name, optimizer state by name): full, fp32, CPU. Collective over dp."""
        return self._codec.export(self._master_of, TorchStates(self.optimizer))

    def load_full_state(self, params, optim) -> None:
        """Take this rank's shards of a full state (as ``full_state`` returns; any layout saved it)."""
        self._codec.load(params, optim, self._load_master, TorchStates(self.optimizer))

    def state_pieces(self):
        """This rank's shard of every bucket: master values and optimizer states."""
        return self._codec.pieces(self._master_of, TorchStates(self.optimizer))

    def load_pieces(self, source) -> None:
        """Whole parameters (every rank holds them in stages 1-2) and this rank's shard of the
        optimizer states."""
        self._codec.load_pieces(source, self._load_master, TorchStates(self.optimizer), whole_values=True)

    # -- accounting -------------------------------------------------------------------------------
    def host_tensors(self) -> list[torch.Tensor]:
        """The offloaded buffers (their storages count as host memory in ``memory.measure``)."""
        return self._host.tensors() if self._host is not None else []

    def close(self) -> None:
        """Stop the offload worker thread (also stopped at interpreter exit) and remove the hooks."""
        if self._worker is not None:
            self._worker.shutdown()
        self.buckets.remove_hooks()
        self.policy.close()


def _pass_labels(trainable: list[tuple[str, nn.Parameter]], pipeline: PipelineGrads | None,
                 late: set[int]) -> dict[int, int]:
    """Which backward pass delivers each parameter's gradient (by id): 0 without a pipeline;
    the index of its chunk under one, and one more label for the late parameters."""
    if pipeline is None:
        return {id(p): 0 for _, p in trainable}
    chunk_of: dict[int, int] = {}
    for i, c in enumerate(pipeline.chunks):
        for p in c.parameters():
            chunk_of.setdefault(id(p), i)
    n = len(pipeline.chunks)
    return {id(p): n if id(p) in late else chunk_of.get(id(p), n) for _, p in trainable}


def _chunk(shards: list[_Shard], limit: int) -> list[list[_Shard]]:
    """Consecutive shards grouped so that each group holds at most ``limit`` elements
    (a single larger shard forms its own group)."""
    chunks: list[list[_Shard]] = []
    cur: list[_Shard] = []
    size = 0
    for sh in shards:
        if cur and size + sh.shard_numel > limit:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(sh)
        size += sh.shard_numel
    if cur:
        chunks.append(cur)
    return chunks
