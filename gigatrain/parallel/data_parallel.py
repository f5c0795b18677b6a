"""Data parallel (ZeRO stage 0): every rank holds the whole model, gradients are averaged.

Gradients are reduced in flat buckets by an asynchronous all-reduce started from autograd hooks,
so communication of the late layers overlaps the backward of the early ones. On gradient
accumulation micro-steps nothing is communicated: gradients keep accumulating in the buckets and
only the last micro-step reduces them. torch's ``DistributedDataParallel`` is the oracle in tests
and the peer in ``benchmarks/bench_dp.py``.

``Stage0Strategy`` is this technique as a ``GradStrategy``; ``params_by_name`` and
``optimizer_state_by_name`` give the full, name-keyed state of a model held whole (a checkpoint, or
the one-process reference a test compares with).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..distributed.comm import Comm
from ..optim import param_groups
from .zero.buckets import Bucket, GradBuckets
from .zero.shards import NoStates, TorchStates, load_whole_master, whole_master, whole_model_codec

if TYPE_CHECKING:
    from ..distributed.mesh import Mesh
    from ..precision import PrecisionPolicy
    from .strategy import OptimizerFactory


class DataParallel:
    """Bucketed, overlapped gradient all-reduce over ``comm`` for ``model``'s parameters.

    The model itself is left untouched (no wrapper module): call ``set_sync`` before each
    micro-step's backward and ``after_backward`` after it. After the last micro-step every rank's
    ``param.grad`` holds the mean over the data-parallel group.
    """

    stage = 0

    def __init__(self, model: nn.Module, comm: Comm, bucket_mb: float = 25.0):
        self.model = model
        self.comm = comm
        self.buckets = GradBuckets(list(model.parameters()), int(bucket_mb * 2**20))
        self.buckets.attach_grads()
        self._sync = True
        self._works: list = []
        if comm.size > 1:
            self.buckets.register_hooks(self._on_ready)
        self.broadcast_parameters()

    def broadcast_parameters(self) -> None:
        """Start every rank from rank 0's weights, whatever each rank's initialisation did."""
        if self.comm.size == 1:
            return
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                self.comm.broadcast(t.data, src=0)

    def set_sync(self, sync: bool) -> None:
        self._sync = sync

    def _on_ready(self, bucket: Bucket) -> None:
        if not self._sync:
            return
        # Dividing before the sum keeps fp16/bf16 buffers in range and makes SUM an average.
        bucket.buffer.div_(self.comm.size)
        self._works.append(self.comm.all_reduce(bucket.buffer, async_op=True))

    def after_backward(self) -> None:
        if self._sync and self.comm.size > 1:
            self.buckets.flush()
            for w in self._works:
                w.wait()
            self._works.clear()
        self.buckets.reset()

    def zero_grad(self) -> None:
        self.buckets.zero_()

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.buckets.params]

    def grad_sq_norm(self) -> torch.Tensor:
        """Sum of squared gradient entries on this rank (identical on every rank after reduction)."""
        return sum(b.buffer.float().pow(2).sum() for b in self.buckets.buckets)

    def close(self) -> None:
        """Remove the hooks from the model's parameters."""
        self.buckets.remove_hooks()


class Stage0Strategy:
    """Plain data parallel as a ``GradStrategy``: full gradients, all-reduced in buckets, and the
    optimizer ``optimizer_factory`` builds over the whole model on every rank.

    The parameter groups carry ``dp_comm`` (the data-parallel group). An optimizer that
    communicates itself instead of gradients (1-bit Adam after its warm-up) says so with
    ``local_gradients``; for such steps the buckets are not all-reduced, and the gradient norm is
    the root mean square over ranks of each rank's own norm (the same on every rank)."""

    def __init__(self, model: nn.Module, mesh: Mesh, optimizer_factory: OptimizerFactory, *,
                 bucket_mb: float = 25.0, precision: PrecisionPolicy | None = None):
        self.model = model
        self.mesh = mesh
        self.dp = DataParallel(model, mesh.dp, bucket_mb)
        groups = param_groups(model.named_parameters())
        for g in groups:
            g["dp_comm"] = mesh.dp
        self.optimizer = optimizer_factory(groups)
        self._codec = whole_model_codec(model, mesh.device)
        self._local = False

    def set_sync(self, sync: bool) -> None:
        self.dp.set_sync(sync and not self._local)

    def begin_step(self, lr: float, *, overlap: bool = False) -> bool:
        self._local = bool(getattr(self.optimizer, "local_gradients", False))
        return False

    def after_backward(self) -> None:
        self.dp.after_backward()

    def reduce_accumulated(self) -> None:
        """Reduce every bucket now (gradients were accumulated with sync off)."""
        self.dp.buckets.reset()
        self.dp.set_sync(not self._local)
        self.dp.after_backward()

    def grads(self) -> list[torch.Tensor]:
        return self.dp.grads()

    def grad_sq_norm(self, skip=()) -> float:
        sq = float(self.dp.grad_sq_norm())
        # The gradients live in flat buckets: take the skipped ones back out of the total.
        for n, p in self.model.named_parameters():
            if n in skip:
                sq -= float(p.grad.float().pow(2).sum())
        if self._local:
            sq = self.mesh.dp.all_reduce_scalar(sq, device=self.mesh.device) / self.mesh.dp.size
        return sq

    def zero_grad(self) -> None:
        self.dp.zero_grad()

    def step(self, lr: float, grad_coef: float) -> None:
        if grad_coef != 1.0:
            for b in self.dp.buckets.buckets:
                b.buffer.mul_(grad_coef)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()

    def full_state(self):
        return self._codec.export(whole_master, TorchStates(self.optimizer))

    def load_full_state(self, params, optim) -> None:
        self._codec.load(params, optim, load_whole_master, TorchStates(self.optimizer))

    def state_pieces(self):
        """Whole parameters and states, the same on every dp rank (``replicated``)."""
        return self._codec.pieces(whole_master, TorchStates(self.optimizer), replicated=True)

    def load_pieces(self, source) -> None:
        self._codec.load_pieces(source, load_whole_master, TorchStates(self.optimizer), whole_values=True)

    def host_tensors(self) -> list[torch.Tensor]:
        return []

    def close(self) -> None:
        self.dp.close()


def params_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` (held whole) by its first name: fp32 copies on the CPU."""
    return whole_model_codec(model).export(whole_master, NoStates())[0]


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The state of a torch ``optimizer`` over ``model``'s own parameters, by parameter name and
    torch's state key, as a checkpoint stores it."""
    return whole_model_codec(model).export(whole_master, TorchStates(optimizer))[1]
