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

Assumption: every rank produces gradients for the same parameters in the same order in a
backward (true for any model without data-dependent control flow), since collectives are issued
from autograd hooks.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ...distributed.comm import Comm
from ...distributed.mesh import Mesh
from ...optim import decays
from ...precision import PrecisionPolicy
from .nvme import NVMeOptimizer, OptimizerSpec
from .offload import HostBuffer

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]

_FREE, _GATHERING, _FULL = "free", "gathering", "full"


def default_units(model: nn.Module) -> list[nn.Module]:
    """The modules that each become one stage-3 unit (see the module docstring)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
        return list(blocks)
    best, best_n = None, 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = m, n
    if best is not None:
        return list(best)
    return [c for c in model.children() if any(p.requires_grad for p in c.parameters())]


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
class _Unit:
    """One unit's flat layout and its gather state."""

    index: int
    name: str
    params: list[nn.Parameter]          # decaying parameters first, then the others
    names: list[str]
    offsets: list[int]
    numel: int
    decay_numel: int
    padded: int
    shard_numel: int
    shard_offset: int = 0               # where this unit's shard starts in the rank's flat shard
    full: torch.Tensor | None = None    # flat gathered buffer; storage resized to 0 when released
    views: list[torch.Tensor] = field(default_factory=list)
    state: str = _FREE
    work: object = None
    ready: set = field(default_factory=set)   # ids of parameters whose gradient has arrived
    reduced: bool = False               # reduce-scattered in the current backward
    bwd_gathered: bool = False          # gathered for the current backward

    @property
    def shard(self) -> slice:
        return slice(self.shard_offset, self.shard_offset + self.shard_numel)


@dataclass
class _Piece:
    """A contiguous part of the rank's shard inside one decay group (one optimizer tensor)."""

    start: int
    numel: int
    decay: bool


class _HostAdamW:
    """AdamW in host memory for ``offload="cpu"``: the fp32 master shard and both moments are flat
    host arrays, updated by the one-pass CPU kernel (``gigatrain.optim.cpu_adam.adamw_step_``),
    which reads the gradient shard in the training dtype and writes the updated weights, in that
    dtype, over the gradients it has just read; those are then copied to the device shard. Host
    memory: 4 + 8 + 2 bytes per shard element (master, moments, low-precision gradients)."""

    def __init__(self, master: torch.Tensor, spec: OptimizerSpec, segments):
        self.spec = spec
        self.state_keys = spec.state_keys
        self.param_groups = [{"lr": g.lr, "weight_decay": g.weight_decay} for g in spec.groups]
        self.steps = 0
        self.master = master
        self.states = {k: torch.zeros_like(master) for k in self.state_keys}
        self.segments = segments

    def read(self, key: str) -> torch.Tensor:
        return self.master if key == "master" else self.states[key]

    def write(self, key: str, values: torch.Tensor) -> None:
        self.read(key).copy_(values.reshape(-1))

    @torch.no_grad()
    def step(self, grads: torch.Tensor, params_out: torch.Tensor, *, grad_coef: float = 1.0) -> None:
        """Update from ``grads`` (the host gradient shard; overwritten in low precision) and write
        the new weights to ``params_out`` (the device shard)."""
        from ...optim.cpu_adam import adamw_step_

        self.steps += 1
        lowp = grads.dtype != torch.float32
        for a, b, grp in self.segments:
            h, lr = self.spec.groups[grp], float(self.param_groups[grp]["lr"])
            wd = float(self.param_groups[grp].get("weight_decay", h.weight_decay))
            adamw_step_(self.master, grads, self.states["exp_avg"], self.states["exp_avg_sq"],
                        self.steps, lr, h.betas[0], h.betas[1], h.eps, wd, clip_coef=grad_coef,
                        out_lowp=grads if lowp else None, start=a, end=b)
            params_out[a:b].copy_(grads[a:b] if lowp else self.master[a:b])


class Stage3Strategy:
    """ZeRO stage 3 over ``mesh.dp`` (see the module docstring).

    Args:
        model: any ``nn.Module``; its parameters are replaced by sharded storage in place.
        mesh: the device mesh; parameters are sharded over its ``dp`` axis.
        bucket_mb: bytes of full-size gradients allowed to wait in reduce-scatters in flight
            (at least one unit's worth always may).
        precision: fp32 keeps fp32 parameters and no separate master; bf16/fp16 keep the
            parameters and gradients in that dtype and an fp32 master shard.
        offload: "none", "cpu" (gradient shard, master and optimizer states in host memory;
            AdamW runs on the CPU kernel, other optimizers as torch optimizers on the host) or
            "nvme" (master + states in files under ``offload_dir``; AdamW, Adam or SGD).
        offload_dir: folder for ``offload="nvme"``.
        units: the modules to treat as units (default: ``default_units(model)``).
        prefetch: start the next unit's all-gather while the current one computes.
        offload_chunk_mb: chunk size of the NVMe optimizer's streamed pass.
    """

    stage = 3

    def __init__(self, model: nn.Module, mesh: Mesh, *, bucket_mb: float = 25.0,
                 precision: PrecisionPolicy, offload: str = "none", offload_dir=None,
                 units: Sequence[nn.Module] | None = None, prefetch: bool = True,
                 offload_chunk_mb: float = 32.0):
        if offload not in ("none", "cpu", "nvme"):
            raise ValueError(f"offload must be none, cpu or nvme; got {offload!r}")
        if offload == "nvme" and not offload_dir:
            raise ValueError("offload='nvme' needs offload_dir (parallel.offload_dir): a folder on a "
                             "fast local disk")
        self.model = model
        self.mesh = mesh
        self.comm: Comm = mesh.dp
        self.device = mesh.device
        self.offload = offload
        self.offload_dir = offload_dir
        self.offload_chunk_mb = offload_chunk_mb
        self.prefetch = prefetch
        self.dtype = precision.compute_dtype or torch.float32
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
        self._offload_opt = None
        self._handles: list = []
        self._optimizer = None
        self._host_grad: HostBuffer | None = None
        self._nan = torch.full((), float("nan"), dtype=self.dtype, device=self.device)

        self._build_units(units if units is not None else default_units(model))
        self._init_shards()
        self._register_hooks()
        self.optimizer_kind = "torch"            # or "flat" (host AdamW / NVMe), set by build_optimizer
        self._opt_params: list[nn.Parameter] = []

    # -- layout -----------------------------------------------------------------------------------
    def _build_units(self, modules: Sequence[nn.Module]) -> None:
        N = self.comm.size
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
            offsets, pos, dec = [], 0, 0
            for n, p in zip(names, params):
                offsets.append(pos)
                pos += p.numel()
                if decays(n, p):
                    dec = pos
            padded = max(1, math.ceil(pos / N)) * N
            return _Unit(idx, name, params, names, offsets, pos, dec, padded, padded // N)

        self.blocks = [make(j, module_name.get(id(m), f"unit{j}"), ps) for j, (m, ps) in enumerate(kept)]
        self._modules = [m for m, _ in kept]
        self.root = make(len(self.blocks), "root", root) if root else None
        self.units = self.blocks + ([self.root] if self.root else [])
        off = 0
        for u in self.units:
            u.shard_offset = off
            off += u.shard_numel
        self.shard_numel = off
        self.numel = sum(u.numel for u in self.units)

    def _init_shards(self) -> None:
        """Take rank 0's initial weights, keep this rank's shard, release the full parameters."""
        N, r = self.comm.size, self.comm.rank
        dev, dt = self.device, self.dtype
        host = torch.device("cpu")
        self.shard = torch.empty(self.shard_numel, dtype=dt, device=dev)
        if self.offload == "none":
            self.grad = torch.zeros(self.shard_numel, dtype=dt, device=dev)
            # fp32: the shard is the master; otherwise an fp32 master next to it.
            self.master = self.shard if dt == torch.float32 else \
                torch.empty(self.shard_numel, dtype=torch.float32, device=dev)
        else:
            # Offload: gradients go to the host as their reduce-scatters finish (one page-locked
            # buffer when there is a GPU); the master is only read by the host update, unpinned.
            self._host_grad = HostBuffer(self.shard_numel, dt, pin=self.device.type == "cuda")
            self.grad = self._host_grad.tensor
            self.master = torch.empty(self.shard_numel, dtype=torch.float32, device=host)
        with torch.no_grad():
            for u in self.units:
                flat = torch.zeros(u.padded, dtype=torch.float32, device=dev)
                for p, o in zip(u.params, u.offsets):
                    flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
                self.comm.broadcast(flat, src=0)
                mine = flat[r * u.shard_numel:(r + 1) * u.shard_numel]
                self.master[u.shard].copy_(mine)
                if self.shard is not self.master:
                    self.shard[u.shard].copy_(mine)
                u.full = torch.empty(u.padded, dtype=dt, device=dev)
                u.views = [u.full[o:o + p.numel()].view(p.shape) for p, o in zip(u.params, u.offsets)]
                self._release_storage(u)
                for p in u.params:
                    p.data = self._placeholder(p)
            for _, p in self.frozen:
                self.comm.broadcast(p.data, src=0)
            for b in self.model.buffers():
                self.comm.broadcast(b.data, src=0)
        # This rank's pieces of each unit's decay / no-decay ranges: one optimizer tensor each.
        self.pieces: list[_Piece] = []
        for u in self.units:
            lo, hi = r * u.shard_numel, (r + 1) * u.shard_numel
            for a, b, decay in ((lo, min(hi, u.decay_numel), True),
                                (max(lo, u.decay_numel), min(hi, u.numel), False)):
                if b > a:
                    self.pieces.append(_Piece(u.shard_offset + a - lo, b - a, decay))

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
        for h in self._handles:
            h.remove()
        self._handles.clear()

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

    # -- gradients --------------------------------------------------------------------------------
    @torch.no_grad()
    def _reduce(self, u: _Unit) -> None:
        """Pack ``u``'s gradients, release its parameters, start the reduce-scatter."""
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

    def after_backward(self) -> None:
        # Units whose gradients did not all arrive (unused parameters) are reduced now, in a
        # fixed order so every rank issues the same collectives.
        for u in self.units:
            if not u.reduced and any(p.grad is not None for p in u.params):
                self._reduce(u)
        while self._pending:
            self._finish_one()
        for u in self.units:
            self._free(u)
            u.reduced = False
            u.bwd_gathered = False
            u.ready.clear()
        self._bwd_cursor = -1

    def grads(self) -> list[torch.Tensor]:
        return [self.grad]

    def grad_sq_norm(self) -> float:
        local = float(self.grad.float().pow(2).sum())
        if self.comm.size > 1:
            return self.comm.all_reduce_scalar(local, device=self.device)
        return local

    def zero_grad(self) -> None:
        self.grad.zero_()

    # -- optimizer --------------------------------------------------------------------------------
    def _segments(self) -> list[tuple[int, int, int]]:
        return [(pc.start, pc.start + pc.numel, 0 if pc.decay else 1) for pc in self.pieces]

    def build_optimizer(self, factory: OptimizerFactory):
        """The optimizer over this rank's shard.

        offload none: ``factory`` over fp32 views of the master shard (one per unit and decay
        group). cpu: AdamW runs on host flat arrays with the CPU kernel; any other optimizer
        is built by ``factory`` over host views. nvme: an ``NVMeOptimizer`` with the factory's
        rule and hyper-parameters.
        """
        if self.offload == "nvme":
            spec = OptimizerSpec.from_factory(factory)
            opt = NVMeOptimizer(self.shard_numel, spec, self.offload_dir, segments=self._segments(),
                                chunk_mb=self.offload_chunk_mb, pin_memory=self.device.type == "cuda",
                                name=f"rank{self.mesh.rank}")
            opt.write("master", self.master)
            self.master = None                 # it lives in the file now
            self.optimizer_kind = "flat"
            self._offload_opt = self._optimizer = opt
            return opt
        if self.offload == "cpu":
            probe = factory([{"params": [nn.Parameter(torch.zeros(1))], "decay": True},
                             {"params": [nn.Parameter(torch.zeros(1))], "decay": False}])
            if type(probe) is torch.optim.AdamW and not probe.defaults.get("amsgrad") \
                    and not probe.defaults.get("maximize"):
                self.optimizer_kind = "flat"
                self._optimizer = _HostAdamW(self.master, OptimizerSpec.from_optimizer(probe),
                                             self._segments())
                return self._optimizer
        self.optimizer_kind = "torch"
        self._opt_params = [nn.Parameter(self.master[pc.start:pc.start + pc.numel]) for pc in self.pieces]
        groups = [{"params": [q for q, pc in zip(self._opt_params, self.pieces) if pc.decay == d], "decay": d}
                  for d in (True, False)]
        groups = [g for g in groups if g["params"]] or [
            {"params": [nn.Parameter(torch.zeros(0, device=self.master.device))], "decay": False}]
        self._optimizer = factory(groups)
        return self._optimizer

    @torch.no_grad()
    def step(self, optimizer, lr: float, grad_coef: float) -> None:
        for g in optimizer.param_groups:
            g["lr"] = lr
        if self.optimizer_kind == "flat":
            optimizer.step(self.grad, self.shard, grad_coef=grad_coef)
            return
        g = self.grad                          # on the host already with offload
        if g.dtype != torch.float32:
            g = g.float()
        if grad_coef != 1.0:
            g.mul_(grad_coef)                  # in place is fine: zero_grad follows the step
        for q, pc in zip(self._opt_params, self.pieces):
            q.grad = g[pc.start:pc.start + pc.numel]
        optimizer.step()
        for q in self._opt_params:
            q.grad = None
        if self.shard is not self.master:
            self.shard.copy_(self.master)

    # -- checkpoints ------------------------------------------------------------------------------
    def _flat_states(self, optimizer) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """(fp32 master shard, per-element state shards, scalar states) of this rank."""
        if self.optimizer_kind == "flat":
            master = optimizer.read("master")
            states = {k: optimizer.read(k) for k in optimizer.state_keys} if optimizer.steps else {}
            scalars = {"step": float(optimizer.steps)} \
                if optimizer.steps and optimizer.spec.kind in ("adamw", "adam") else {}
            return master, states, scalars
        states: dict[str, torch.Tensor] = {}
        scalars: dict[str, float] = {}
        for q, pc in zip(self._opt_params, self.pieces):
            for k, v in optimizer.state.get(q, {}).items():
                if not torch.is_tensor(v) or v.shape != q.shape or k == "step":
                    scalars[k] = float(v)
                    continue
                if k not in states:
                    states[k] = torch.zeros(self.shard_numel, dtype=torch.float32, device=self.master.device)
                states[k][pc.start:pc.start + pc.numel].copy_(v.reshape(-1))
        return self.master, states, scalars

    def _gather_unit(self, u: _Unit, shard_flat: torch.Tensor) -> torch.Tensor:
        full = torch.empty(u.padded, dtype=torch.float32, device=self.device)
        self.comm.all_gather(full, shard_flat[u.shard].to(self.device, torch.float32))
        return full.cpu()

    @torch.no_grad()
    def full_state(self, optimizer):
        """(parameters by name, optimizer state by name): full, fp32, on the CPU, on every rank,
        keyed like ``model.named_parameters()`` so any stage / world size can load them.
        Collective: every rank of the dp group must call it."""
        master, states, scalars = self._flat_states(optimizer)
        params: dict[str, torch.Tensor] = {}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for u in self.units:
            full = self._gather_unit(u, master)
            gathered = {k: self._gather_unit(u, s) for k, s in sorted(states.items())}
            for p, n, o in zip(u.params, u.names, u.offsets):
                params[n] = full[o:o + p.numel()].view(p.shape).clone()
                if gathered or scalars:
                    st = {k: torch.tensor(v, dtype=torch.float32) for k, v in scalars.items()}
                    st.update({k: f[o:o + p.numel()].view(p.shape).clone() for k, f in gathered.items()})
                    optim[n] = st
        for n, p in self.frozen:
            params[n] = p.detach().to("cpu", torch.float32).clone()
        order = [n for n, _ in self.model.named_parameters()]
        return {n: params[n] for n in order if n in params}, optim

    @torch.no_grad()
    def load_full_state(self, optimizer, params: dict[str, torch.Tensor], optim) -> None:
        """Load full (unsharded) state saved by any stage / world size: each rank slices its shard."""
        r = self.comm.rank
        missing = [n for u in self.units for n in u.names if n not in params]
        missing += [n for n, _ in self.frozen if n not in params]
        if missing:
            raise KeyError(f"checkpoint lacks parameters: {missing[:5]}{'...' if len(missing) > 5 else ''}")

        def shard_of(get) -> torch.Tensor:
            flat = torch.zeros(self.shard_numel, dtype=torch.float32)
            for u in self.units:
                full = torch.zeros(u.padded, dtype=torch.float32)
                for p, n, o in zip(u.params, u.names, u.offsets):
                    src = get(n)
                    if src is None:
                        continue
                    if tuple(src.shape) != tuple(p.shape):
                        raise ValueError(f"parameter {n}: checkpoint shape {tuple(src.shape)} != "
                                         f"model {tuple(p.shape)}")
                    full[o:o + p.numel()] = src.reshape(-1).float()
                flat[u.shard] = full[r * u.shard_numel:(r + 1) * u.shard_numel]
            return flat

        master = shard_of(params.get)
        for n, p in self.frozen:
            p.data.copy_(params[n].to(p.dtype))
        self.shard.copy_(master)
        states, step = {}, None
        if optim:
            keys = sorted({k for n in (x for u in self.units for x in u.names) if n in optim for k in optim[n]})
            for k in keys:
                if k == "step":
                    step = next(float(optim[n][k]) for u in self.units for n in u.names
                                if n in optim and k in optim[n])
                else:
                    states[k] = shard_of(lambda n, k=k: optim.get(n, {}).get(k))
        steps = int(step) if step is not None else (1 if states else 0)
        if self.optimizer_kind == "flat":
            optimizer.write("master", master)
            for k in optimizer.state_keys:
                optimizer.write(k, states[k] if k in states else torch.zeros(self.shard_numel))
            optimizer.steps = steps
            return
        self.master.copy_(master)
        for q, pc in zip(self._opt_params, self.pieces):
            optimizer.state.pop(q, None)
            if not states and step is None:
                continue
            st = {k: v[pc.start:pc.start + pc.numel].to(q.device).clone() for k, v in states.items()}
            if step is not None:
                st["step"] = torch.tensor(step, dtype=torch.float32)
                if optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"):
                    st["step"] = st["step"].to(q.device)
            optimizer.state[q] = st

    # -- introspection ----------------------------------------------------------------------------
    def host_tensors(self) -> list[torch.Tensor]:
        """The tensors kept in host memory for offload (``memory.measure_model_state_bytes``
        counts their storages as host memory): gradient shard, master, optimizer states and the
        NVMe staging buffers. Empty without offload."""
        if self.offload == "none":
            return []
        out = [self.grad]
        if self.master is not None:
            out.append(self.master)
        opt = self._optimizer
        if isinstance(opt, _HostAdamW):
            out += list(opt.states.values())
        elif isinstance(opt, NVMeOptimizer):
            out += [b for slot in opt._slots for b in slot] + [opt._grad_buf]
        elif opt is not None:
            out += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return out

    def close(self) -> None:
        """Remove the hooks and the NVMe files (the files also go when the optimizer is garbage
        collected or the interpreter exits)."""
        self.remove_hooks()
        if self._offload_opt is not None:
            self._offload_opt.close()
