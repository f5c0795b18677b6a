"""ZeRO stage 3: parameters, gradients and optimizer states all sharded over the dp group.

The model is cut into *units*: each child of ``model.blocks`` when the model follows the gigatrain
protocol; otherwise the children of the largest ``nn.ModuleList`` in the model (HuggingFace's
``transformer.h``), or else every direct child module that has parameters. Everything else (stem,
head, final norm, a weight tied between the embedding and the LM head) forms one *root* unit. A
parameter shared by two units is moved to the root, so it is present whenever anything uses it
and its gradient is summed over all uses before it is reduced.

Each unit's parameters are laid out in one flat buffer, padded to a multiple of the dp size N;
rank r keeps only elements ``[r*s, (r+1)*s)`` of it (s = padded / N). Between steps a rank holds

- the parameter shard in the training dtype (fp32, or bf16/fp16 under mixed precision),
- the gradient shard in the same dtype,
- the fp32 master shard (for fp32 training this *is* the parameter shard) and the optimizer's
  states,

so model states take 16P/N bytes with bf16 + Adam (2 + 2 + 4 + 8), the ZeRO paper's figure.
With ``offload="cpu"`` only the parameter shard stays on the device (2P/N): gradients go to a
host buffer as each reduce-scatter finishes, and master + states live in host memory (14P/N on
the host with Adam). With ``offload="nvme"`` master and states live in files (``nvme.py``) and
the host keeps the gradient shard and a few staging chunks.

One training step, per unit:

- forward: a forward pre-hook all-gathers the unit's flat buffer (the next unit's gather was
  already started asynchronously while the previous one computed) and points every parameter's
  ``.data`` at its view of that buffer; a forward hook releases it again;
- backward: a hook on the unit's output gradient gathers it once more (prefetching the unit
  that backward reaches next); when every parameter of the unit has its gradient (a
  post-accumulate-grad hook counts them) the gradients are packed into one flat buffer,
  reduce-scattered asynchronously into the rank's gradient shard, and the full parameters are
  released;
- the optimizer steps on the shards only.

Releasing means two things: the flat buffer's storage is resized to zero bytes (autograd's saved
tensors are views of it, so the memory really goes, and comes back in place when re-gathered)
and each parameter's ``.data`` becomes a NaN-filled zero-stride placeholder of the right shape,
so ``numel()``/``shape`` stay correct for FLOP counting and reading a released parameter gives
NaNs instead of a crash. The root unit stays gathered for the whole forward and, in backward,
from the model output's gradient until its own gradients are complete: FSDP2 treats its root
the same way. Every unit is gathered exactly twice and reduce-scattered once per micro-step, so
each rank sends 3P(N-1)/N elements per step.

Gradient accumulation: ``set_sync(False)`` changes nothing here. Every micro-step reduce-scatters
its gradients and adds them to the gradient shard. Skipping the reduce-scatter would mean keeping
the full unsharded gradients (P values) between micro-steps, which stage 3 exists to avoid, and
each micro-step gathers the parameters twice anyway, so the extra reduce-scatter adds a third to
that micro-step's traffic. torch FSDP2 and DeepSpeed do the same by default.

Under a pipeline (``PipelineGrads``) the runtime calls the chunks, never the model, and runs
each micro-batch's forward and backward pass of a chunk as its own action, interleaved with
others. The units are then the blocks of this rank's chunks, plus the root (stem, head and the
tied weight's copy). A block is gathered by its forward pre-hook and, for each backward pass, by
the hook on that forward's output; it is released when the pass has delivered its gradients
(reduce-scattered at once) and no other pass is between its B and W (zero-bubble schedules split
them; W may follow other micro-batches' forward passes). The root is gathered at the first chunk
forward that uses it and stays so for the whole schedule: its gradient (a tied weight's copies
summed across pp ranks by the runtime) is complete only after the schedule and is reduced by
``reduce_accumulated``. Every dp rank of a pp coordinate runs the same actions in the same order,
so the gathers and reduce-scatters match; no prefetch is attempted (the next block depends on
the schedule).

Assumption: every rank produces gradients for the same parameters in the same order in a
backward (true for any model without data-dependent control flow), since collectives are issued
from autograd hooks.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn as nn

from ...distributed.comm import Comm
from ...distributed.mesh import Mesh
from ...optim import decays
from ...precision import PrecisionPolicy
from ..strategy import param_ids
from ..materialize import block_units, swap_in
from .buckets import flat_layout, remove_hooks
from .nvme import NVMeOptimizer, OptimizerSpec
from .offload import HostBuffer, HostShard
from .shards import (FlatFileStates, Segment, StateCodec, TorchStates, attach_pieces, decay_pieces, layer_spans,
                     local_sq_norm, optimizer_over, torch_step)

if TYPE_CHECKING:
    from ..strategy import OptimizerFactory, PipelineGrads

_FREE, _GATHERING, _FULL = "free", "gathering", "full"


def default_units(model: nn.Module) -> list[nn.Module]:
    """The modules that each become one stage-3 unit (see the module docstring): the blocks,
    else the children that hold trainable parameters."""
    return block_units(model) or [c for c in model.children() if any(p.requires_grad for p in c.parameters())]


def _weak(method, *bound):
    """``method`` (with ``bound`` leading arguments) through a weak reference to its object.

    The model and its parameters hold the hooks; strong references there would tie strategy and
    model into a reference cycle, keeping the strategy, its process groups and its buffers alive
    until a garbage collection (or interpreter shutdown, where tearing down a gloo group can
    abort the process). Once the strategy is gone the hooks do nothing.
    """
    ref = weakref.WeakMethod(method)

    def call(*args):
        m = ref()
        return None if m is None else m(*bound, *args)
    return call


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _tensors(obj) -> Iterable[torch.Tensor]:
    """Every tensor inside nested tuples / lists / dicts (HuggingFace outputs are dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


@dataclass
class _Unit(Segment):
    """One unit's flat layout (decaying parameters first) and its gather state."""

    index: int
    name: str
    numel: int                          # elements of the parameters, without the padding
    full: torch.Tensor | None = None    # flat gathered buffer; storage resized to 0 when released
    views: list[torch.Tensor] = field(default_factory=list)
    state: str = _FREE
    work: object = None
    ready: set = field(default_factory=set)   # ids of parameters whose gradient has arrived
    reduced: bool = False               # reduce-scattered in the current backward
    bwd_gathered: bool = False          # gathered for the current backward
    open: int = 0                       # under a pipeline: backward passes begun, not yet reduced



class Stage3Strategy:
    """ZeRO stage 3 over ``mesh.dp`` (see the module docstring); a ``GradStrategy``.

    Args:
        model: any ``nn.Module``; its parameters are replaced by sharded storage in place.
        mesh: the device mesh; parameters are sharded over its ``dp`` axis.
        optimizer_factory: builds the optimizer over this rank's flat fp32 shard pieces (decay /
            no-decay groups); with ``offload="nvme"`` only its rule and hyper-parameters are used.
        bucket_mb: bytes of full-size gradients allowed to wait in reduce-scatters in flight
            (at least one unit's worth always may).
        precision: fp32 keeps fp32 parameters and no separate master; bf16/fp16 keep the
            parameters and gradients in that dtype and an fp32 master shard.
        offload: "none", "cpu" (gradient shard, master and optimizer states in host memory, the
            update on the CPU: ``offload.HostShard``, as for stages 1 and 2) or
            "nvme" (master + states in files under ``offload_dir``; AdamW, Adam or SGD).
        offload_dir: folder for ``offload="nvme"``.
        units: the modules to treat as units (default: ``default_units(model)``, or under a
            pipeline the blocks of every chunk).
        prefetch: start the next unit's all-gather while the current one computes.
        offload_chunk_mb: chunk size of the NVMe optimizer's streamed pass.
        pipeline: the stages' ``PipelineGrads`` when a pipeline schedule runs the forward and
            backward passes (see "Under a pipeline" in the module docstring).
        initial: a ``materialize.LocalValues`` when the trainable parameters are still on the
            meta device: each rank fills its shard from it, one unit at a time, and never holds a
            whole parameter beyond the unit being initialised (frozen parameters and buffers
            must be materialised already).
    """

    stage = 3

    def __init__(self, model: nn.Module, mesh: Mesh, optimizer_factory: OptimizerFactory, *,
                 bucket_mb: float = 25.0, precision: PrecisionPolicy, offload: str = "none", offload_dir=None,
                 units: Sequence[nn.Module] | None = None, prefetch: bool = True,
                 offload_chunk_mb: float = 32.0, pipeline: PipelineGrads | None = None, initial=None):
        if offload not in ("none", "cpu", "nvme"):
            raise ValueError(f"offload must be none, cpu or nvme; got {offload!r}")
        if offload == "nvme" and not offload_dir:
            raise ValueError("offload='nvme' needs offload_dir (parallel.offload_dir): a folder on a "
                             "fast local disk")
        if mesh.pp.size > 1 and pipeline is None:
            raise ValueError("ZeRO stage 3 under a pipeline (pp > 1) needs the stages' PipelineGrads "
                             "(apply_data_parallel(..., pipeline=stages.pipeline_grads))")
        self.model = model
        self.mesh = mesh
        self.pipeline = pipeline
        self.comm: Comm = mesh.dp
        self.device = mesh.device
        self.offload = offload
        self.offload_dir = offload_dir
        self.offload_chunk_mb = offload_chunk_mb
        self.prefetch = prefetch
        self.dtype = precision.param_dtype
        self.bucket_bytes = max(0, int(bucket_mb * 2**20))
        self._sync = True
        self._pending: list[tuple] = []          # (work, unit, shard out, full grad buffer)
        self._pending_bytes = 0
        self._fwd_plan: list[int] = []           # block order of the last forward
        self._fwd_now: list[int] = []
        self._bwd_plan: list[int] = []
        self._fwd_cursor = -1
        self._bwd_cursor = -1
        self._in_forward = False
        self._handles: list = []
        self._host: HostShard | None = None
        self._host_grad: HostBuffer | None = None
        self._nan = torch.full((), float("nan"), dtype=self.dtype, device=self.device)

        if units is None:
            units = default_units(model) if pipeline is None else \
                [u for c in pipeline.chunks for u in default_units(c)]
        self._build_units(units)
        self._init_shards(initial)
        self._register_hooks()
        self.optimizer = self._build_optimizer(optimizer_factory)
        # How the shard is updated: decided once, here.
        self._update = {"none": self._device_step, "cpu": self._host_step, "nvme": self._nvme_step}[offload]
        self._states = FlatFileStates(self.optimizer) if offload == "nvme" else TorchStates(self.optimizer)
        self._codec = StateCodec(self.units, comm=self.comm, device=self.device, frozen=self.frozen,
                                 order=[n for n, _ in model.named_parameters()])

    # -- layout -----------------------------------------------------------------------------------
    def _build_units(self, modules: Sequence[nn.Module]) -> None:
        N, r = self.comm.size, self.comm.rank
        first_name: dict[int, str] = {}
        for name, p in self.model.named_parameters():
            first_name.setdefault(id(p), name)
        owner: dict[int, list[int]] = {}
        per_module: list[list[nn.Parameter]] = []
        for i, m in enumerate(modules):
            if m is self.model:
                raise ValueError("a stage-3 unit cannot be the whole model")
            ps = [p for p in m.parameters() if p.requires_grad]
            per_module.append(ps)
            for p in ps:
                owner.setdefault(id(p), []).append(i)
        # Parameters used by more than one unit (or by no unit) belong to the root.
        kept = [(m, [p for p in ps if len(owner[id(p)]) == 1]) for m, ps in zip(modules, per_module)]
        kept = [(m, ps) for m, ps in kept if ps]
        in_block = {id(p) for _, ps in kept for p in ps}
        root: list[nn.Parameter] = []
        for p in self.model.parameters():       # parameters() yields a tied weight once
            if p.requires_grad and id(p) not in in_block:
                root.append(p)
        self.frozen = [(n, p) for n, p in self.model.named_parameters() if not p.requires_grad]
        module_name = {id(m): n for n, m in self.model.named_modules()}

        def make(idx: int, name: str, params: list[nn.Parameter]) -> _Unit:
            names = [first_name[id(p)] for p in params]
            order = sorted(range(len(params)), key=lambda k: not decays(names[k], params[k]))
            params = [params[k] for k in order]
            names = [names[k] for k in order]
            offsets, pos, padded = flat_layout(params, N)
            padded = max(padded, N)     # every rank owns at least one element of every unit
            lo, hi = r * padded // N, (r + 1) * padded // N
            return _Unit(params, names, offsets, padded, lo, hi, 0,
                         decay_pieces(params, names, offsets, padded, lo, hi), idx, name, pos)

        self.blocks = [make(j, module_name.get(id(m), f"unit{j}"), ps) for j, (m, ps) in enumerate(kept)]
        self._modules = [m for m, _ in kept]
        self.root = make(len(self.blocks), "root", root) if root else None
        self.units = self.blocks + ([self.root] if self.root else [])
        off = 0
        for u in self.units:
            u.offset = off
            off += u.shard_numel
        self.shard_numel = off
        self.numel = sum(u.numel for u in self.units)

    def _init_shards(self, initial=None) -> None:
        """Take rank 0's initial weights (or, from ``initial``, the values every rank computes
        alike), keep this rank's shard, release the full parameters."""
        dev, dt = self.device, self.dtype
        pin = self.device.type == "cuda"
        self.shard = torch.empty(self.shard_numel, dtype=dt, device=dev)
        if self.offload == "none":
            self.grad = torch.zeros(self.shard_numel, dtype=dt, device=dev)
            # fp32: the shard is the master; otherwise an fp32 master next to it.
            self.master = self.shard if dt == torch.float32 else \
                torch.empty(self.shard_numel, dtype=torch.float32, device=dev)
        elif self.offload == "cpu":
            # Gradients go to the host as their reduce-scatters finish.
            self._host = HostShard(self.shard_numel, dt, pin=pin)
            self.grad, self.master = self._host.grad, self._host.master
        else:
            # The master only passes through the host on its way into the NVMe files.
            self._host_grad = HostBuffer(self.shard_numel, dt, pin=pin)
            self.grad = self._host_grad.tensor
            self.master = torch.empty(self.shard_numel, dtype=torch.float32)
        with torch.no_grad():
            for u in self.units:
                mine = self._initial_shard(u, initial) if initial is not None else self._broadcast_shard(u)
                self.master[u.shard].copy_(mine)
                if self.shard is not self.master:
                    self.shard[u.shard].copy_(mine)
                u.full = torch.empty(u.padded, dtype=dt, device=dev)
                u.views = [u.full[o:o + p.numel()].view(p.shape) for p, o in zip(u.params, u.offsets)]
                self._release_storage(u)
                for p in u.params:
                    if p.is_meta:
                        swap_in(p, nn.Parameter(self._placeholder(p), requires_grad=p.requires_grad))
                    p.data = self._placeholder(p)
            for _, p in self.frozen:
                self.comm.broadcast(p.data, src=0)
            for b in self.model.buffers():
                self.comm.broadcast(b.data, src=0)

    def _broadcast_shard(self, u: _Unit) -> torch.Tensor:
        flat = torch.zeros(u.padded, dtype=torch.float32, device=self.device)
        for p, o in zip(u.params, u.offsets):
            flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
        self.comm.broadcast(flat, src=0)
        return flat[u.lo:u.hi]

    def _initial_shard(self, u: _Unit, initial) -> torch.Tensor:
        """``[lo, hi)`` of the unit's flat initial values, from the parameters that overlap it."""
        mine = torch.zeros(u.shard_numel, dtype=torch.float32, device=self.device)
        spans = {n: (o, p.numel()) for p, n, o in zip(u.params, u.names, u.offsets)
                 if o < u.hi and o + p.numel() > u.lo}
        for n, v in initial.values(list(spans)):
            o, k = spans[n]
            a, b = max(o, u.lo), min(o + k, u.hi)
            mine[a - u.lo:b - u.lo].copy_(v.reshape(-1)[a - o:b - o])
        return mine

    def _placeholder(self, p: torch.Tensor) -> torch.Tensor:
        return self._nan.expand(p.shape)

    # -- gather / release -------------------------------------------------------------------------
    @staticmethod
    def _release_storage(u: _Unit) -> None:
        u.full.untyped_storage().resize_(0)

    def _gather(self, u: _Unit) -> None:
        """Start the all-gather of ``u`` (asynchronous)."""
        if u.state != _FREE:
            return
        u.full.untyped_storage().resize_(u.padded * u.full.element_size())
        u.work = self.comm.all_gather(u.full, self.shard[u.shard], async_op=True)
        u.state = _GATHERING

    def _ensure_full(self, u: _Unit) -> None:
        if u.state == _FULL:
            return
        if u.state == _FREE:
            self._gather(u)
        if u.work is not None:
            u.work.wait()
            u.work = None
        for p, v in zip(u.params, u.views):
            p.data = v
        u.state = _FULL

    def _free(self, u: _Unit) -> None:
        if u.state == _FREE:
            return
        if u.work is not None:
            u.work.wait()
            u.work = None
        for p in u.params:
            p.data = self._placeholder(p)
        self._release_storage(u)
        u.state = _FREE

    def _prefetch(self, plan: list[int], pos: int) -> None:
        if self.prefetch and 0 <= pos < len(plan):
            u = self.blocks[plan[pos]]
            if u.state == _FREE and not u.reduced:
                self._gather(u)

    # -- hooks ------------------------------------------------------------------------------------
    def _register_hooks(self) -> None:
        if self.pipeline is not None:
            self._register_pipeline_hooks()
            return
        h = self._handles
        h.append(self.model.register_forward_pre_hook(_weak(self._root_pre_forward)))
        h.append(self.model.register_forward_hook(_weak(self._root_post_forward)))
        for m, u in zip(self._modules, self.blocks):
            h.append(m.register_forward_pre_hook(_weak(self._block_pre_forward, u)))
            h.append(m.register_forward_hook(_weak(self._block_post_forward, u)))
        for u in self.units:
            for p in u.params:
                h.append(p.register_post_accumulate_grad_hook(_weak(self._on_grad, u)))

    def remove_hooks(self) -> None:
        remove_hooks(self._handles)

    def _root_pre_forward(self, module, args) -> None:
        if _in_backward():                  # recomputation inside backward
            if self.root:
                self._ensure_full(self.root)
            return
        self._in_forward = True
        self._fwd_now = []
        self._fwd_cursor = -1
        if not self._fwd_plan:
            self._fwd_plan = list(range(len(self.blocks)))
        if self.root:
            self._gather(self.root)
        self._prefetch(self._fwd_plan, 0)   # overlaps the root's gather and the stem
        if self.root:
            self._ensure_full(self.root)

    def _root_post_forward(self, module, args, output) -> None:
        if _in_backward():
            return
        self._in_forward = False
        self._fwd_plan = self._fwd_now
        self._bwd_plan = list(reversed(self._fwd_now))
        self._bwd_cursor = -1
        if self.root and not self._hook_outputs(output, None):
            self.root.bwd_gathered = True   # kept: released when its gradients are reduced
        for u in self.units:
            if not u.bwd_gathered:          # prefetched but unused, or the root
                self._free(u)

    def _block_pre_forward(self, u: _Unit, module, args) -> None:
        if _in_backward() or not self._in_forward:
            self._ensure_full(u)            # recomputation, or a block called on its own
            return
        self._fwd_now.append(u.index)
        self._fwd_cursor += 1
        self._ensure_full(u)
        self._prefetch(self._fwd_plan, self._fwd_cursor + 1)

    def _block_post_forward(self, u: _Unit, module, args, output) -> None:
        if _in_backward():
            return
        if self._hook_outputs(output, u):
            self._free(u)
        else:
            u.bwd_gathered = True           # released when its gradients are reduced

    def _hook_outputs(self, output, u: _Unit | None) -> bool:
        """Hook the output tensors that backward will reach, to gather ``u`` (None: the root)
        before its backward. False when grad is on but no output tensor could be hooked (an
        output type we cannot see into): then the unit must stay gathered until its backward."""
        if not torch.is_grad_enabled():
            return True
        hooked = False
        for t in _tensors(output):
            if t.requires_grad:
                t.register_hook(_weak(self._pre_backward, u))
                hooked = True
        return hooked

    def _pre_backward(self, u: _Unit | None, grad) -> None:
        if u is None:                       # the model output: the root, then the last block
            if self.root and not self.root.bwd_gathered:
                self.root.bwd_gathered = True
                self._gather(self.root)
                self._prefetch(self._bwd_plan, 0)
                self._ensure_full(self.root)
            elif not self.root:
                self._prefetch(self._bwd_plan, 0)
            return
        if u.bwd_gathered or u.reduced:
            return
        u.bwd_gathered = True
        self._bwd_cursor += 1
        self._ensure_full(u)
        self._prefetch(self._bwd_plan, self._bwd_cursor + 1)

    def _on_grad(self, u: _Unit, p: nn.Parameter) -> None:
        u.ready.add(id(p))
        if len(u.ready) == len(u.params) and not u.reduced:
            self._reduce(u)

    # -- under a pipeline ---------------------------------------------------------------------------
    def _register_pipeline_hooks(self) -> None:
        h = self._handles
        root_ids = {id(p) for p in self.root.params} if self.root else set()
        for c in self.pipeline.chunks:
            if any(id(p) in root_ids for p in c.parameters()):
                h.append(c.register_forward_pre_hook(_weak(self._chunk_pre_forward)))
                h.append(c.register_forward_hook(_weak(self._chunk_post_forward)))
        for m, u in zip(self._modules, self.blocks):
            h.append(m.register_forward_pre_hook(_weak(self._pass_pre_forward, u)))
            h.append(m.register_forward_hook(_weak(self._pass_post_forward, u)))
            for p in u.params:
                h.append(p.register_post_accumulate_grad_hook(_weak(self._pass_on_grad, u)))

    def _chunk_pre_forward(self, module, args) -> None:
        # Kept gathered for the whole schedule: the root's gradient (a tied weight's included)
        # is complete only after it, and is reduced by reduce_accumulated.
        self._ensure_full(self.root)

    def _chunk_post_forward(self, module, args, output) -> None:
        if not torch.is_grad_enabled() and not _in_backward():
            self._free(self.root)           # evaluation or sampling: no backward follows

    def _pass_pre_forward(self, u: _Unit, module, args) -> None:
        self._ensure_full(u)

    def _pass_post_forward(self, u: _Unit, module, args, output) -> None:
        if _in_backward():
            return
        if torch.is_grad_enabled():
            token = [False]                 # this forward's backward pass has begun
            hooked = False
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(_weak(self._pass_pre_backward, u, token))
                    hooked = True
            if not hooked:                  # cannot see when its backward begins: keep it
                u.open += 1
        if u.open == 0:
            self._free(u)

    def _pass_pre_backward(self, u: _Unit, token: list, grad) -> None:
        # A zero-bubble B pass gathers the block and its W pass (later, possibly after other
        # micro-batches' forward passes) delivers the gradients: it stays gathered in between.
        if not token[0]:
            token[0] = True
            u.open += 1
        self._ensure_full(u)

    def _pass_on_grad(self, u: _Unit, p: nn.Parameter) -> None:
        u.ready.add(id(p))
        if len(u.ready) == len(u.params):
            self._reduce(u, release=False)
            u.open = max(0, u.open - 1)
            if u.open == 0:
                self._free(u)

    # -- gradients --------------------------------------------------------------------------------
    @torch.no_grad()
    def _reduce(self, u: _Unit, release: bool = True) -> None:
        """Pack ``u``'s gradients, release its parameters (unless told not to: a pipeline may
        still need them), start the reduce-scatter."""
        g = torch.empty(u.padded, dtype=self.dtype, device=self.device)
        for p, o in zip(u.params, u.offsets):
            dst = g[o:o + p.numel()]
            if p.grad is None:
                dst.zero_()
            else:
                dst.copy_(p.grad.reshape(-1))
                p.grad = None
        if u.padded > u.numel:
            g[u.numel:].zero_()
        u.reduced = True
        u.ready.clear()
        if release:
            self._free(u)
        if self.comm.size > 1:
            # Dividing first makes SUM an average and keeps fp16/bf16 sums in range.
            g.div_(self.comm.size)
        out = torch.empty(u.shard_numel, dtype=self.dtype, device=self.device)
        work = self.comm.reduce_scatter(out, g, async_op=True)
        self._pending.append((work, u, out, g))
        self._pending_bytes += g.numel() * g.element_size()
        while len(self._pending) > 1 and self._pending_bytes > self.bucket_bytes:
            self._finish_one()

    def _finish_one(self) -> None:
        work, u, out, g = self._pending.pop(0)
        if work is not None:
            work.wait()
        self.grad[u.shard].add_(out.to(self.grad.device))   # to the host with offload
        self._pending_bytes -= g.numel() * g.element_size()

    def set_sync(self, sync: bool) -> None:
        """Recorded only: stage 3 reduce-scatters every micro-step (see the module docstring)."""
        self._sync = sync

    def begin_step(self, lr: float, *, overlap: bool = False) -> bool:
        """Nothing to prepare: the update never runs during backward here."""
        return False

    def after_backward(self) -> None:
        # Units whose gradients did not all arrive (unused parameters) are reduced now, in a
        # fixed order so every rank issues the same collectives.
        for u in self.units:
            if not u.reduced and any(p.grad is not None for p in u.params):
                self._reduce(u)
        self._finish_and_release()
        self._bwd_cursor = -1

    def reduce_accumulated(self) -> None:
        """After a pipeline schedule: reduce the root's gradients (accumulated over the
        micro-batches; a tied weight's copies summed across pp ranks by now) and any block whose
        passes missed a parameter, finish every reduce-scatter, release every unit."""
        if self.pipeline is None:
            raise RuntimeError("reduce_accumulated needs ZeRO stage 1, or stage 3 built with the pipeline's "
                               "PipelineGrads (stage 3 keeps no local gradients)")
        for u in self.units:
            if any(p.grad is not None for p in u.params):
                self._reduce(u)
        self._finish_and_release()

    def _finish_and_release(self) -> None:
        """Finish every reduce-scatter in flight and return every unit to its rest state: freed,
        nothing reduced, gathered or awaited (the end of a step's backward)."""
        while self._pending:
            self._finish_one()
        for u in self.units:
            self._free(u)
            u.reduced = False
            u.bwd_gathered = False
            u.ready.clear()
            u.open = 0

    def grads(self) -> list[torch.Tensor]:
        return [self.grad]

    def grad_sq_norm(self, skip=()) -> float:
        """Squared L2 norm of the full averaged gradient (shards summed over the dp group),
        leaving out the parameters named in ``skip``."""
        skip = param_ids(self.model, skip)
        if skip:
            local = local_sq_norm(self.units, lambda u: self.grad[u.shard], skip)
        else:
            local = float(self.grad.float().pow(2).sum())
        if self.comm.size > 1:
            return self.comm.all_reduce_scalar(local, device=self.device)
        return local

    def zero_grad(self) -> None:
        self.grad.zero_()

    # -- optimizer --------------------------------------------------------------------------------
    def _build_optimizer(self, factory: OptimizerFactory):
        """The optimizer over this rank's shard.

        offload none: ``factory`` over fp32 views of the master shard (one per unit and decay
        group). cpu: the same over host views, stepped by ``offload.HostShard`` (AdamW on the CPU
        kernel). nvme: an ``NVMeOptimizer`` with the factory's rule and hyper-parameters.
        """
        if self.offload == "nvme":
            segments = [(u.offset + pc.start, u.offset + pc.end, 0 if pc.decay else 1)
                        for u in self.units for pc in u.pieces]
            opt = NVMeOptimizer(self.shard_numel, OptimizerSpec.from_factory(factory), self.offload_dir,
                                segments=segments, chunk_mb=self.offload_chunk_mb,
                                pin_memory=self.device.type == "cuda", name=f"rank{self.mesh.rank}")
            opt.write("master", self.master)
            self.master = None                 # it lives in the file now
            return opt
        layout = layer_spans(self.units, [n for n, _ in self.model.named_parameters()], self.comm)
        if self._host is not None:
            return self._host.build_optimizer(factory, self.units, layout)
        return optimizer_over(factory, attach_pieces(self.units, lambda u: self.master[u.shard]), layout)

    @torch.no_grad()
    def step(self, lr: float, grad_coef: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._update(grad_coef)

    def _device_step(self, coef: float) -> None:
        torch_step(self.optimizer, [pc.param for u in self.units for pc in u.pieces],
                   [self.grad[u.shard][pc.start:pc.end] for u in self.units for pc in u.pieces], coef)
        if self.shard is not self.master:
            self.shard.copy_(self.master)

    def _host_step(self, coef: float) -> None:
        self._host.update(self.units, coef)    # leaves the new parameters in the gradient buffer
        self.shard.copy_(self.grad)

    def _nvme_step(self, coef: float) -> None:
        self.optimizer.step(self.grad, self.shard, grad_coef=coef)

    # -- checkpoints ------------------------------------------------------------------------------
    def _master_of(self, u: _Unit) -> torch.Tensor:
        if self.master is None:
            return self.optimizer.read("master", u.offset, u.shard_numel)
        return self.master[u.shard]

    def _load_master(self, u: _Unit, full: torch.Tensor) -> None:
        mine = full[u.lo:u.hi]
        self.shard[u.shard].copy_(mine)
        if self.master is None:
            self.optimizer.write("master", mine, u.offset)
        elif self.master is not self.shard:
            self.master[u.shard].copy_(mine)

    @torch.no_grad()
    def full_state(self):
        """(parameters by name, optimizer state by name): full, fp32, on the CPU, on every rank,
        keyed like ``model.named_parameters()`` so any stage / world size can load them.
        Collective: every rank of the dp group must call it."""
        return self._codec.export(self._master_of, self._states)

    @torch.no_grad()
    def load_full_state(self, params: dict[str, torch.Tensor], optim) -> None:
        """Load full (unsharded) state saved by any stage / world size: each rank slices its shard."""
        self._codec.load(params, optim, self._load_master, self._states)

    def state_pieces(self):
        """This rank's shard of every unit: master values and optimizer states."""
        return self._codec.pieces(self._master_of, self._states)

    @torch.no_grad()
    def load_pieces(self, source) -> None:
        """Only this rank's shard of every unit, values and optimizer states."""
        self._codec.load_pieces(source, self._load_master, self._states, whole_values=False)

    # -- introspection ----------------------------------------------------------------------------
    def host_tensors(self) -> list[torch.Tensor]:
        """The tensors kept in host memory for offload (``memory.measure_model_state_bytes``
        counts their storages as host memory): gradient shard, master, optimizer states and the
        NVMe staging buffers. Empty without offload."""
        if self._host is not None:
            return self._host.tensors()
        if self.offload == "nvme":
            opt = self.optimizer
            return [self.grad] + [b for slot in opt._slots for b in slot] + [opt._grad_buf]
        return []

    def close(self) -> None:
        """Remove the hooks and the NVMe files (the files also go when the optimizer is garbage
        collected or the interpreter exits)."""
        self.remove_hooks()
        if self.offload == "nvme":
            self.optimizer.close()
