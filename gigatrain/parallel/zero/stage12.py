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

Besides the interface every gradient strategy has (see ``gigatrain.engine.Stage0Strategy``), this
one offers ``begin_step`` (above), ``grad_sq_norm(exclude=...)`` (leave out a tied weight another
pipeline stage counts), ``reduce_accumulated`` (stage 1 under a pipeline schedule) and
``host_tensors`` (its offloaded buffers, for ``memory.measure_model_state_bytes``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...distributed.mesh import Mesh
from ...optim import decays
from ...precision import PrecisionPolicy
from .buckets import Bucket, GradBuckets
from .offload import HostBuffer, HostOptimizer, Worker

OFFLOAD_CHOICES = ("none", "cpu")
_META = torch.device("meta")


@dataclass
class _Run:
    """A contiguous part of a shard with one weight-decay setting: one optimizer Parameter."""

    start: int                         # inside the shard
    end: int
    decay: bool
    param: nn.Parameter | None = None  # flat fp32 view of the master (or of the parameters)


@dataclass
class _Shard:
    """Rank-local state for one bucket: the range [lo, hi) of the bucket this rank owns."""

    bucket: Bucket
    lo: int
    hi: int
    offset: int                        # position in the rank's flat master / gradient buffers
    pflat: torch.Tensor                # all of the bucket's parameters; param.data are views
    master: torch.Tensor | None        # fp32 master of [lo, hi); None when pflat[lo:hi] is it
    grad: torch.Tensor                 # reduced gradient of [lo, hi), parameter dtype
    runs: list[_Run]
    fresh: bool = True                 # grad holds nothing of this step: next delivery overwrites
    event: object = None               # CUDA event of the last device->host gradient copy

    @property
    def numel(self) -> int:
        return self.hi - self.lo

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


class ZeroStrategy:
    """ZeRO stage 1 or 2 for ``model`` over ``mesh.dp``; the gradient strategy the Engine drives.

    ``offload`` is "none" or "cpu" (fp32 master and optimizer states in host memory, the update
    on the CPU). ``bucket_mb`` is the size of a gradient bucket in the parameter dtype.
    """

    MAX_IN_FLIGHT = 2   # reduce-scatters left running while backward goes on

    def __init__(self, model: nn.Module, mesh: Mesh, *, stage: int, bucket_mb: float = 25.0,
                 precision: PrecisionPolicy, offload: str | None = "none", offload_dir=None):
        if stage not in (1, 2):
            raise ValueError(f"ZeroStrategy implements stages 1 and 2, not {stage}")
        offload = offload or "none"
        if offload not in OFFLOAD_CHOICES:
            raise ValueError(f"ZeRO stage {stage} supports offload 'none' or 'cpu', not {offload!r} "
                             f"(NVMe offload needs stage 3)")
        if stage == 2 and mesh.pp.size > 1:
            # Pipeline schedules interleave the backward passes of micro-batches and reduce once
            # at the end (reduce_accumulated), which needs full local gradients: stage 1's layout.
            raise ValueError("ZeRO stage 2 does not combine with pipeline parallelism (parallel.pp > 1): "
                             "use zero=1, which shards the optimizer states and keeps the local gradients "
                             "the pipeline accumulates into")
        self.stage = stage
        self.model = model
        self.mesh = mesh
        self.comm = mesh.dp
        self.device = mesh.device
        self.offload = offload == "cpu"
        self.param_dtype = precision.compute_dtype or torch.float32
        self._cuda = self.device.type == "cuda"
        n_ranks, rank = self.comm.size, self.comm.rank

        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        self._names = {id(p): n for n, p in trainable}
        decay = {id(p): decays(n, p) for n, p in trainable}
        # Buckets are planned walking the list backwards, so putting the non-decaying parameters
        # first makes every bucket hold its decaying parameters before its non-decaying ones.
        ordered = [p for _, p in trainable if not decay[id(p)]] + [p for _, p in trainable if decay[id(p)]]
        self._broadcast_untracked()

        lp_size = torch.empty((), dtype=self.param_dtype).element_size()
        bucket_bytes = max(1, int(bucket_mb * 2**20 * ordered[0].element_size() / lp_size))
        # Stage 2 has no resident gradient buffers: meta placeholders until a bucket is in flight.
        self.buckets = GradBuckets(ordered, bucket_bytes, align=n_ranks, dtype=self.param_dtype,
                                   device=_META if stage == 2 else self.device)
        sizes = [b.padded_numel // n_ranks for b in self.buckets.buckets]
        self.shard_numel = total = sum(sizes)
        keeps_master = self.offload or self.param_dtype != torch.float32
        self._direct = not keeps_master   # fp32 on the device: optimizer steps the parameters
        # Stage 1 divides by N after the reduce-scatter (on its shard only), except with fp16,
        # whose sum could overflow; stage 2 divides while copying gradients into the bucket.
        self._prescale = self.param_dtype == torch.float16 and n_ranks > 1
        self._host_master = self._host_grad = None
        self._master = self._grad_flat = None
        if self.offload:
            self._host_master = HostBuffer(total, torch.float32, pin=self._cuda)
            self._host_grad = HostBuffer(total, self.param_dtype, pin=self._cuda)
        elif keeps_master:
            self._master = torch.empty(total, dtype=torch.float32, device=self.device)
        if stage == 2 and not self.offload:
            self._grad_flat = torch.zeros(total, dtype=self.param_dtype, device=self.device)

        self.shards: list[_Shard] = []
        self._slot: dict[int, tuple[Bucket, int]] = {}
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
                if self.offload:
                    master = self._host_master.view(offset, s)
                elif keeps_master:
                    master = self._master[offset:offset + s]
                if master is not None:
                    master.copy_(full[lo:hi])
                for p, o in zip(b.params, b.offsets):
                    p.data = pflat[o:o + p.numel()].view_as(p)
                    self._slot[id(p)] = (b, o)
                if self.offload:
                    grad = self._host_grad.view(offset, s)
                elif stage == 1:
                    grad = b.buffer[lo:hi]
                else:
                    grad = self._grad_flat[offset:offset + s]
                self.shards.append(_Shard(b, lo, hi, offset, pflat, master, grad,
                                          _runs(b, lo, hi, decay)))
                offset += s
                del full
        self._shard_of = {sh.bucket.index: sh for sh in self.shards}

        if stage == 1:
            self.buckets.attach_grads()
        else:
            self._pool = _BufferPool(max(b.padded_numel for b in self.buckets.buckets),
                                     self.param_dtype, self.device)
            for p in self.buckets.params:   # registered first: runs before the bucket counter
                p.register_post_accumulate_grad_hook(self._take_grad)
        self.buckets.register_hooks(self._on_ready)
        self._sync = True
        self._pending: list[tuple[_Shard, object, torch.Tensor]] = []
        self._host: HostOptimizer | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._chunks: list[list[_Shard]] = _chunk(self.shards, max(b.padded_numel for b in self.buckets.buckets))
        self._worker = Worker() if self.offload else None
        self._overlap: _Overlap | None = None

    # -- set-up helpers ---------------------------------------------------------------------------
    def _broadcast_untracked(self) -> None:
        """Frozen parameters and buffers are not sharded; start them from rank 0 too."""
        with torch.no_grad():
            for p in self.model.parameters():
                if not p.requires_grad:
                    self.comm.broadcast(p.data, src=0)
            for buf in self.model.buffers():
                self.comm.broadcast(buf, src=0)

    def build_optimizer(self, factory) -> torch.optim.Optimizer:
        """``factory(groups)`` over this rank's flat fp32 shard Parameters (decay / no-decay)."""
        decay_params, other = [], []
        for sh in self.shards:
            base = sh.master if sh.master is not None else sh.param_shard()
            for run in sh.runs:
                run.param = nn.Parameter(base[run.start:run.end])
                (decay_params if run.decay else other).append(run.param)
        groups = [g for g in ({"params": decay_params, "decay": True}, {"params": other, "decay": False})
                  if g["params"]]
        opt = factory(groups)
        if self.offload:
            runs = [(sh, run) for sh in self.shards for run in sh.runs]
            self._host = HostOptimizer(opt, [r.param for _, r in runs],
                                       [sh.offset + r.start for sh, r in runs], self.shard_numel,
                                       pin=self._cuda)
            opt = self._host.optimizer
        self._optimizer = opt
        return opt

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
        if not (self.offload and overlap):
            self._overlap = None
            return False
        if self._host is None:
            raise RuntimeError("build_optimizer must run before begin_step")
        self._overlap = _Overlap(float(lr))
        for g in self._host.optimizer.param_groups:
            g["lr"] = float(lr)
        return True

    def _take_grad(self, p: torch.Tensor) -> None:
        """Stage 2: move a just-accumulated gradient into its bucket and drop ``param.grad``."""
        b, o = self._slot[id(p)]
        if b.buffer.device.type == "meta":
            self._acquire(b)
        # Divided on the way in (free: the copy happens anyway) so the sum is the average.
        torch.div(p.grad, self.comm.size, out=b.buffer[o:o + p.numel()].view_as(p))
        b.state["arrived"].add(id(p))
        p.grad = None

    def _acquire(self, b: Bucket) -> None:
        base = self._pool.take()
        b.state["base"] = base
        b.state["arrived"] = set()
        b.buffer = base[:b.padded_numel]
        b.buffer[b.numel:].zero_()   # padding; every parameter's range is written or zeroed

    def _zero_missing(self, b: Bucket) -> None:
        """Zero the ranges of parameters that got no gradient in this backward (unused ones)."""
        arrived = b.state["arrived"]
        if len(arrived) < len(b.params):
            for p, o in zip(b.params, b.offsets):
                if id(p) not in arrived:
                    b.buffer[o:o + p.numel()].zero_()

    def _release(self, b: Bucket) -> None:
        self._pool.give(b.state.pop("base"))
        b.buffer = torch.empty(b.padded_numel, dtype=self.param_dtype, device=_META)

    def _on_ready(self, b: Bucket) -> None:
        if self.stage == 1 and not self._sync:
            return
        sh = self._shard_of[b.index]
        if b.buffer.device.type == "meta":      # stage 2, no parameter of it got a gradient
            self._acquire(b)
        if self.stage == 2:
            self._zero_missing(b)
        if self.stage == 1 and self._prescale:
            b.buffer.div_(self.comm.size)
        if self.stage == 1:
            out = b.buffer[sh.lo:sh.hi]         # in place: this rank's part of the buffer
        elif sh.fresh and not self.offload:
            out = sh.grad
        else:
            out = torch.empty(sh.numel, dtype=self.param_dtype, device=self.device)
        work = self.comm.reduce_scatter(out, b.buffer, async_op=True)
        self._pending.append((sh, work, out))
        self._drain(keep=self.MAX_IN_FLIGHT)

    def _drain(self, keep: int) -> None:
        """Finish reduce-scatters in launch order: those already done, and older ones until at
        most ``keep`` are in flight (which bounds the stage-2 buffers alive at once)."""
        while self._pending:
            sh, work, out = self._pending[0]
            if len(self._pending) <= keep and work is not None and not work.is_completed():
                return
            self._pending.pop(0)
            if work is not None:
                work.wait()
            if self.stage == 1 and not self._prescale and self.comm.size > 1:
                out.div_(self.comm.size)          # the sum -> the average, on the shard only
            if self.stage == 2:
                self._release(sh.bucket)
            if self.offload:
                self._to_host(sh, out)
            elif self.stage == 2 and out is not sh.grad:
                sh.grad.add_(out)
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
        params = [r.param for r in sh.runs]
        grads = [sh.grad[r.start:r.end] for r in sh.runs]
        self._host.step_(params, grads, grads, 1.0)
        return part

    def reduce_accumulated(self) -> None:
        """Reduce-scatter every bucket now (stage 1): the gradients were accumulated with sync off,
        e.g. by a pipeline schedule that interleaves the micro-batches' backward passes."""
        if self.stage != 1:
            raise RuntimeError("reduce_accumulated needs ZeRO stage 1 (stage 2 keeps no local gradients)")
        self.buckets.reset()
        self._sync = True
        self.after_backward()

    def after_backward(self) -> None:
        if self.stage == 2 or self._sync:
            self.buckets.flush()
            self._drain(keep=0)
        self.buckets.reset()
        if self.stage == 2 and self._sync:
            self._pool.clear()

    # -- gradients ------------------------------------------------------------------------------
    def grads(self) -> list[torch.Tensor]:
        """This rank's reduced gradient shards (on the host with offload)."""
        if self._overlap is not None and self._overlap.submitted:
            raise RuntimeError("the gradients were consumed by the overlapped update of this step")
        return [sh.grad for sh in self.shards]

    def _wait_host(self) -> None:
        for sh in self.shards:
            if sh.event is not None:
                sh.event.synchronize()
                sh.event = None

    def grad_sq_norm(self, exclude=()) -> float:
        """Squared L2 norm of the full averaged gradient (shards summed over the dp group),
        leaving out the parameters in ``exclude`` (e.g. a tied weight another stage counts)."""
        skip = {id(p) for p in exclude}
        if self._overlap is not None and self._overlap.submitted:
            if skip:
                raise RuntimeError("exclude is not available with the overlapped host update")
            self._overlap.partials += self._worker.wait_all()
            local = float(sum(self._overlap.partials))
        else:
            self._wait_host()
            acc = torch.zeros((), dtype=torch.float64, device=self.shards[0].grad.device)
            for sh in self.shards:
                for a, b in _kept_ranges(sh, skip):
                    acc += sh.grad[a:b].float().pow(2).sum()
            local = float(acc)
        return self.comm.all_reduce_scalar(local, device=self.device)

    def zero_grad(self) -> None:
        if self._overlap is not None and self._overlap.submitted:
            raise RuntimeError("a step whose update already ran during backward was skipped: "
                               "begin_step(overlap=True) requires grad_coef == 1 and no skipped step")
        if self.stage == 1:
            self.buckets.zero_()
        for sh in self.shards:
            sh.fresh = True

    # -- the update -----------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, lr: float, grad_coef: float) -> None:
        """Scale the gradient shards by ``grad_coef``, update this rank's shards with ``lr``, and
        all-gather the updated parameters into every rank's model."""
        for g in optimizer.param_groups:
            g["lr"] = lr
        works: list = []
        if self.offload:
            self._host_step(lr, grad_coef, works)
        else:
            self._device_step(optimizer, grad_coef, works)
        for w in works:
            if w is not None:
                w.wait()

    def _all_gather(self, sh: _Shard):
        return self.comm.all_gather(sh.pflat, sh.param_shard(), async_op=True)

    def _device_step(self, optimizer, coef: float, works: list) -> None:
        # Chunk by chunk (about one bucket's elements each): the all-gather of a chunk overlaps
        # the update of the next, and with low-precision gradients their fp32 copy exists for one
        # chunk at a time. fp32 gradient shards are handed to the optimizer as they are.
        for chunk in self._chunks:
            if self._direct:
                grads = [sh.grad for sh in chunk]
                if coef != 1.0:
                    for g in grads:
                        g.mul_(coef)
            else:
                scratch = torch.empty(sum(sh.numel for sh in chunk), dtype=torch.float32, device=self.device)
                grads, off = [], 0
                for sh in chunk:
                    grads.append(scratch[off:off + sh.numel])
                    grads[-1].copy_(sh.grad)
                    off += sh.numel
                if coef != 1.0:
                    scratch.mul_(coef)
            for sh, g in zip(chunk, grads):
                for run in sh.runs:
                    run.param.grad = g[run.start:run.end]
            try:
                optimizer.step()   # steps only the parameters that have a gradient: this chunk's
            finally:
                for sh in chunk:
                    for run in sh.runs:
                        run.param.grad = None
            for sh in chunk:
                if sh.master is not None:
                    sh.param_shard().copy_(sh.master)
                works.append(self._all_gather(sh))

    def _host_step(self, lr: float, coef: float, works: list) -> None:
        ov, self._overlap = self._overlap, None
        if ov is not None and ov.submitted:
            if coef != 1.0 or lr != ov.lr:
                raise RuntimeError(f"begin_step(lr={ov.lr}, overlap=True) promised grad_coef 1 and that lr; "
                                   f"step got grad_coef {coef} and lr {lr}")
            self._worker.wait_all()
            for sh in self.shards:
                sh.param_shard().copy_(sh.grad, non_blocking=self._cuda)
                works.append(self._all_gather(sh))
            return
        for sh in self.shards:
            if sh.event is not None:
                sh.event.synchronize()
                sh.event = None
            grads = [sh.grad[r.start:r.end] for r in sh.runs]
            # The new low-precision values overwrite the consumed gradient and go back from there.
            self._host.step_([r.param for r in sh.runs], grads, grads, coef)
            sh.param_shard().copy_(sh.grad, non_blocking=self._cuda)
            works.append(self._all_gather(sh))

    # -- full state for checkpoints ---------------------------------------------------------------
    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's shard of one bucket (fp32) -> the whole bucket, on the CPU."""
        local = local.to(device=self.device, dtype=torch.float32)
        out = torch.empty(local.numel() * self.comm.size, dtype=torch.float32, device=self.device)
        self.comm.all_gather(out, local)
        return out.cpu()

    def full_state(self, optimizer):
        """(parameters by name, optimizer state by name): full, fp32, CPU. Collective over dp."""
        params: dict[str, torch.Tensor] = {}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for sh in self.shards:
            b = sh.bucket
            full = self._gather(sh.master) if sh.master is not None else sh.pflat.detach().float().cpu()
            for p, o in zip(b.params, b.offsets):
                params[self._names[id(p)]] = full[o:o + p.numel()].view(p.shape).clone()
            states = [optimizer.state.get(r.param, {}) for r in sh.runs]
            if not states[0]:
                continue
            for key, v0 in states[0].items():
                if torch.is_tensor(v0) and v0.dim() > 0:
                    local = torch.cat([st[key].reshape(-1).to(self.device, torch.float32) for st in states])
                    whole = self._gather(local)
                    for p, o in zip(b.params, b.offsets):
                        optim.setdefault(self._names[id(p)], {})[key] = whole[o:o + p.numel()].view(p.shape).clone()
                else:
                    value = v0.detach().to("cpu").clone() if torch.is_tensor(v0) else torch.tensor(float(v0))
                    for p in b.params:
                        optim.setdefault(self._names[id(p)], {})[key] = value.clone()
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                params[n] = p.detach().to("cpu", torch.float32).clone()
        return params, optim

    def load_full_state(self, optimizer, params, optim) -> None:
        """Take this rank's shards of a full state (as ``full_state`` returns; any layout saved it)."""
        named = dict(self.model.named_parameters())
        missing = sorted(set(named) - set(params))
        if missing:
            raise KeyError(f"checkpoint lacks parameters: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for n, p in named.items():
            if tuple(params[n].shape) != tuple(p.shape):
                raise ValueError(f"parameter {n}: checkpoint shape {tuple(params[n].shape)} != model {tuple(p.shape)}")
        fused = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
        with torch.no_grad():
            for n, p in named.items():
                if not p.requires_grad:
                    p.copy_(params[n])
            for sh in self.shards:
                b = sh.bucket
                full = torch.zeros(b.padded_numel, dtype=torch.float32)
                for p, o in zip(b.params, b.offsets):
                    full[o:o + p.numel()] = params[self._names[id(p)]].reshape(-1).float()
                sh.pflat.copy_(full.to(self.device))
                if sh.master is not None:
                    sh.master.copy_(full[sh.lo:sh.hi])
                if optim is None:
                    continue
                first = next((optim[self._names[id(p)]] for p in b.params if self._names[id(p)] in optim), None)
                if first is None:
                    continue
                for key, v0 in first.items():
                    per_element = torch.is_tensor(v0) and v0.dim() > 0
                    if per_element:
                        whole = torch.zeros(b.padded_numel, dtype=torch.float32)
                        for p, o in zip(b.params, b.offsets):
                            st = optim.get(self._names[id(p)], {})
                            if key in st:
                                whole[o:o + p.numel()] = st[key].reshape(-1).float()
                    for r in sh.runs:
                        st = optimizer.state.setdefault(r.param, {})
                        if per_element:
                            value = whole[sh.lo + r.start:sh.lo + r.end]
                            if key in st and st[key].numel() == value.numel():
                                st[key].copy_(value)    # keep preallocated (host) buffers
                            else:
                                st[key] = value.to(device=r.param.device, dtype=r.param.dtype).clone()
                        else:
                            value = torch.as_tensor(v0).to(torch.float32).reshape(()).clone()
                            st[key] = value.to(r.param.device) if fused else value

    # -- accounting -------------------------------------------------------------------------------
    def host_tensors(self) -> list[torch.Tensor]:
        """The offloaded buffers (their storages count as host memory in ``memory.measure``)."""
        out = []
        for buf in (self._host_master, self._host_grad, self._host.state_buffer if self._host else None):
            if buf is not None:
                out.append(buf.tensor)
        return out

    def close(self) -> None:
        """Stop the offload worker thread (also stopped at interpreter exit)."""
        if self._worker is not None:
            self._worker.shutdown()


def _runs(b: Bucket, lo: int, hi: int, decay: dict[int, bool]) -> list[_Run]:
    """The decay / no-decay parts of [lo, hi) inside bucket ``b`` (decaying parameters first).

    Padding at the end of the bucket joins the last part; it stays zero either way."""
    decay_ends = [o + p.numel() for p, o in zip(b.params, b.offsets) if decay[id(p)]]
    other_starts = [o for p, o in zip(b.params, b.offsets) if not decay[id(p)]]
    split = min(other_starts) if other_starts else b.padded_numel
    if decay_ends and max(decay_ends) > split:
        raise AssertionError("bucket does not hold its decaying parameters first")
    runs = []
    if lo < min(hi, split):
        runs.append(_Run(0, min(hi, split) - lo, True))
    if max(lo, split) < hi:
        runs.append(_Run(max(lo, split) - lo, hi - lo, False))
    return runs


def _kept_ranges(sh: _Shard, skip: set[int]) -> list[tuple[int, int]]:
    """Ranges of the shard (shard-relative) that do not belong to a skipped parameter."""
    if not skip:
        return [(0, sh.numel)]
    out, pos = [], 0
    for p, o in zip(sh.bucket.params, sh.bucket.offsets):
        if id(p) not in skip:
            continue
        a, b = max(o, sh.lo) - sh.lo, min(o + p.numel(), sh.hi) - sh.lo
        if a < b:
            if pos < a:
                out.append((pos, a))
            pos = b
    if pos < sh.numel:
        out.append((pos, sh.numel))
    return out


def _chunk(shards: list[_Shard], limit: int) -> list[list[_Shard]]:
    """Consecutive shards grouped so that each group holds at most ``limit`` elements
    (a single larger shard forms its own group)."""
    chunks: list[list[_Shard]] = []
    cur: list[_Shard] = []
    size = 0
    for sh in shards:
        if cur and size + sh.numel > limit:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(sh)
        size += sh.numel
    if cur:
        chunks.append(cur)
    return chunks
