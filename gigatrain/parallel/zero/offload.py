"""CPU offload for ZeRO stages 1-3: host buffers, the host update of a flat shard, a worker thread.

With ``offload="cpu"`` each rank keeps its fp32 master shard and the optimizer states in host
memory (``HostShard``), and the device only holds low-precision parameters (and, for stage 1,
low-precision gradients). Gradients travel to the host in the parameter dtype as their buckets
or units are reduced, the optimizer updates the shard piece by piece on the CPU (the one-pass C++
AdamW from ``gigatrain.optim.cpu_adam`` reads bf16/fp16 gradients directly and writes the new
low-precision parameters in the same pass), and the updated low-precision values go back to the
device.

Host memory per parameter, per rank: 4 bytes of master + the optimizer states (8 for Adam) + the
gradient shard in the parameter dtype, which is also where the updated low-precision parameters
are written before they go back (the kernel reads each element's gradient before it writes that
element's output, so one buffer serves both).

Pinned memory: torch's pinned host allocator rounds every block up to a power of two (a 43 GiB
request pins 64 GiB), so the few large host buffers here are ordinary allocations that are then
page-locked in place with ``cudaHostRegister``, and everything else is a view into them. The
master is only read and written by the CPU, so it is not page-locked.
"""
from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn as nn

from .shards import Segment, ShardLayout, attach_pieces, optimizer_over, torch_step

if TYPE_CHECKING:
    from ..strategy import OptimizerFactory


# -- host buffers ------------------------------------------------------------------------------
def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: the process is going away anyway
        pass


class HostBuffer:
    """One flat host tensor, page-locked in place when ``pin`` and CUDA is available.

    Keep this object alive as long as views of ``tensor`` are used: page-locking ends when it is
    collected.
    """

    def __init__(self, numel: int, dtype: torch.dtype, *, pin: bool):
        self.tensor = torch.zeros(max(0, int(numel)), dtype=dtype)
        self.pinned = False
        nbytes = self.tensor.numel() * self.tensor.element_size()
        if pin and nbytes and torch.cuda.is_available():
            ptr = self.tensor.data_ptr()
            err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
            if err != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (cudaError {err})")
            self.pinned = True
            weakref.finalize(self, _unregister, ptr)

    def view(self, start: int, numel: int) -> torch.Tensor:
        return self.tensor[start:start + numel]


# -- the host optimizer --------------------------------------------------------------------------
def _is_adamw(opt: torch.optim.Optimizer) -> bool:
    if isinstance(opt, torch.optim.AdamW):
        return True
    return isinstance(opt, torch.optim.Adam) and all(g.get("decoupled_weight_decay") for g in opt.param_groups)


def _state_names(opt: torch.optim.Optimizer) -> list[str]:
    """Per-element state tensors worth preallocating (torch's names), empty when unknown."""
    if _is_adamw(opt) or isinstance(opt, torch.optim.Adam):
        return [] if any(g.get("amsgrad") for g in opt.param_groups) else ["exp_avg", "exp_avg_sq"]
    if isinstance(opt, torch.optim.SGD):
        # A zero buffer is what torch's first step would create (a copy of the gradient) only
        # without dampening: buf * momentum + (1 - dampening) * grad.
        if any(g.get("momentum", 0) for g in opt.param_groups) and not any(g.get("dampening", 0)
                                                                           for g in opt.param_groups):
            return ["momentum_buffer"]
    return []


class HostOptimizer:
    """Runs a torch optimizer's update on flat fp32 host shards, one bucket at a time.

    ``optimizer`` is what the configured factory built over the host parameters (flat fp32 views
    of the master shard). AdamW is replaced by ``gigatrain.optim.cpu_adam.CPUAdamW`` with the same
    hyper-parameters and state layout, stepped through its one-pass kernel; any other optimizer
    (SGD) is stepped by torch on an fp32 copy of the bucket's gradients. Per-element states are
    preallocated as views into one host buffer (``offsets[i]`` is parameter i's place in it, of
    ``total`` elements per state), so nothing is allocated, or pinned, tensor by tensor.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                 offsets: Sequence[int], total: int, *, pin: bool):
        names = _state_names(optimizer)
        adam = _is_adamw(optimizer) or isinstance(optimizer, torch.optim.Adam)
        if _is_adamw(optimizer) and names:
            from ...optim.cpu_adam import CPUAdamW

            groups = []
            for g in optimizer.param_groups:
                groups.append({"params": g["params"], "lr": g["lr"], "betas": tuple(g["betas"]),
                               "eps": g["eps"], "weight_decay": g["weight_decay"],
                               "maximize": g.get("maximize", False)})
            optimizer = CPUAdamW(groups)
            self.fast_adam = True
        else:
            self.fast_adam = False
        self.optimizer = optimizer
        self.state_buffer = HostBuffer(len(names) * total, torch.float32, pin=pin)
        self._group_of: dict[int, dict] = {}
        for g in optimizer.param_groups:
            for p in g["params"]:
                self._group_of[id(p)] = g
        for p, off in zip(params, offsets):
            if not names:
                break   # unknown layout: the optimizer allocates its own state
            st = {}
            if adam:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
            for k, name in enumerate(names):
                st[name] = self.state_buffer.view(k * total + off, p.numel()).view_as(p)
            optimizer.state[p] = st

    def step_(self, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor],
              outs: Sequence[torch.Tensor], coef: float) -> None:
        """Update ``params`` (fp32 host) from ``grads`` (host, any float dtype) times ``coef``
        and write the new values into ``outs`` (host, the parameter dtype; may be ``grads``)."""
        if self.fast_adam:
            from ...optim.cpu_adam import adamw_step_

            for p, g, o in zip(params, grads, outs):
                group = self._group_of[id(p)]
                st = self.optimizer.state[p]
                st["step"] += 1
                beta1, beta2 = group["betas"]
                adamw_step_(p.data, g, st["exp_avg"], st["exp_avg_sq"], float(st["step"]), group["lr"],
                            beta1, beta2, group["eps"], group["weight_decay"], clip_coef=coef,
                            maximize=group.get("maximize", False), out_lowp=o)
            return
        torch_step(self.optimizer, params, grads, coef)
        for p, o in zip(params, outs):
            o.copy_(p.data)

    def tensors(self) -> list[torch.Tensor]:
        """The host tensors holding the optimizer states."""
        return [self.state_buffer.tensor] + [v for st in self.optimizer.state.values()
                                             for v in st.values() if torch.is_tensor(v)]


class HostShard:
    """The host side of CPU offload for one rank's flat shard of ``numel`` elements.

    ``master``: the fp32 master shard. ``grad``: the gradient shard in ``grad_dtype`` (page-locked
    when ``pin``); ``update`` consumes it and leaves the updated parameters, in that dtype, in its
    place, ready to go back to the device. Segments index both by their ``shard`` range.
    """

    def __init__(self, numel: int, grad_dtype: torch.dtype, *, pin: bool):
        self.numel = int(numel)
        self.pin = pin
        self.master = torch.zeros(self.numel, dtype=torch.float32)
        self._grad = HostBuffer(self.numel, grad_dtype, pin=pin)
        self.grad = self._grad.tensor
        self.host: HostOptimizer | None = None

    def build_optimizer(self, factory: OptimizerFactory, segments: Sequence[Segment],
                        layout: ShardLayout | None = None) -> torch.optim.Optimizer:
        """``factory`` over fp32 views of the master, one per piece of ``segments`` (``layout``:
        see ``shards.optimizer_over``); the returned optimizer (AdamW becomes ``CPUAdamW``) keeps
        its states in one host buffer."""
        pieces = attach_pieces(segments, lambda seg: self.master[seg.shard])
        offsets = [seg.offset + pc.start for seg in segments for pc in seg.pieces]
        self.host = HostOptimizer(optimizer_over(factory, pieces, layout), [pc.param for pc in pieces], offsets,
                                  self.numel, pin=self.pin)
        return self.host.optimizer

    def update(self, segments: Sequence[Segment], coef: float) -> None:
        """Update the master of ``segments`` from their gradients times ``coef``; the gradient
        ranges then hold the new parameters in the gradient dtype."""
        params, grads = [], []
        for seg in segments:
            g = self.grad[seg.shard]
            for pc in seg.pieces:
                params.append(pc.param)
                grads.append(g[pc.start:pc.end])
        self.host.step_(params, grads, grads, coef)

    def tensors(self) -> list[torch.Tensor]:
        """Every host tensor of the offload (for ``memory.measure_model_state_bytes``)."""
        return [self.master, self.grad] + (self.host.tensors() if self.host is not None else [])


# -- the overlapped update ---------------------------------------------------------------------
class Worker:
    """One background thread that runs submitted updates in submission order.

    The heavy work (the C++ kernel, torch ops) releases the GIL, so it proceeds while the main
    thread runs the rest of backward. No collective is ever issued from this thread: every rank
    must issue its collectives in the same order, which only the main thread can guarantee.
    """

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], object]) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gigatrain-offload")
        fut = self._pool.submit(fn)
        with self._lock:
            self._futures.append(fut)
        return fut

    def wait_all(self) -> list:
        """Results of everything submitted since the last call, in order (re-raises errors)."""
        with self._lock:
            futures, self._futures = self._futures, []
        return [f.result() for f in futures]

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
