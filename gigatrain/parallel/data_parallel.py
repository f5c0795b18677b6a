"""Data parallel (ZeRO stage 0): every rank holds the whole model, gradients are averaged.

Gradients are reduced in flat buckets by an asynchronous all-reduce started from autograd hooks,
so communication of the late layers overlaps the backward of the early ones. On gradient
accumulation micro-steps nothing is communicated: gradients keep accumulating in the buckets and
only the last micro-step reduces them. torch's ``DistributedDataParallel`` is the oracle in tests
and the peer in ``benchmarks/bench_dp.py``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..distributed.comm import Comm
from .zero.buckets import Bucket, GradBuckets


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
