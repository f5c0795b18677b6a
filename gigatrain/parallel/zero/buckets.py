"""Flat gradient buckets filled by autograd hooks, launched in a fixed order.

Parameters are grouped, in reverse registration order (roughly the order backward produces their
gradients), into buckets of about ``bucket_bytes``. Each bucket owns one flat buffer and every
``param.grad`` is a view into it, so autograd accumulates straight into the buffer and a bucket can
be handed to a single collective without copying. A post-accumulate-grad hook counts the
gradients a bucket still waits for; when a bucket is complete it is handed to ``on_ready`` -- but
only after every earlier bucket, so that all ranks issue their collectives in the same order
(gloo and NCCL both require it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import torch
import torch.nn as nn


@dataclass
class Bucket:
    index: int
    params: list[nn.Parameter]
    offsets: list[int]          # start of each parameter inside ``buffer``
    numel: int                  # used elements (without padding)
    buffer: torch.Tensor        # flat, padded to a multiple of ``align``
    pending: int = 0
    ready: bool = False
    state: dict = field(default_factory=dict)   # per-stage scratch (works, shards, ...)

    @property
    def padded_numel(self) -> int:
        return self.buffer.numel()

    def views(self) -> list[torch.Tensor]:
        return [self.buffer[o:o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)]


def flat_layout(params: Sequence[torch.Tensor], align: int = 1) -> tuple[list[int], int, int]:
    """(offset of each tensor, elements used, elements padded to a multiple of ``align``) when
    ``params`` are laid out one after another in one flat buffer."""
    offsets, n = [], 0
    for p in params:
        offsets.append(n)
        n += p.numel()
    return offsets, n, -(-n // align) * align


def remove_hooks(handles: list) -> None:
    """Remove hooks registered on tensors or modules, and forget their handles."""
    for h in handles:
        h.remove()
    handles.clear()


def plan_buckets(params: Sequence[nn.Parameter], bucket_bytes: int, align: int = 1,
                 passes: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of ``params`` per bucket, walking them in reverse; pure arithmetic. With
    ``passes`` (one label per parameter) no bucket holds parameters of two labels."""
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = 0
    for i in reversed(range(len(params))):
        p = params[i]
        nbytes = p.numel() * p.element_size()
        if cur and (cur_bytes + nbytes > bucket_bytes or (passes is not None and passes[i] != passes[cur[-1]])):
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += nbytes
    if cur:
        groups.append(cur)
    return groups


class GradBuckets:
    """Flat gradient buffers for ``params`` plus the hooks that report complete buckets.

    ``passes`` (a label per parameter) says which parameters receive their gradients in the
    same backward pass when one step runs several interleaved passes over different parts of the
    model (a pipeline rank's chunks, each running its micro-batches' backward passes in the
    schedule's order). No bucket then spans two labels, the in-order rule holds per label, and
    a label's counters reset by themselves once its last bucket is handed over, ready for that
    part's next pass. Without labels every bucket belongs to one pass, reset by ``reset``.
    """

    def __init__(self, params: Sequence[nn.Parameter], bucket_bytes: int, *, align: int = 1,
                 dtype: torch.dtype | None = None, device: torch.device | None = None,
                 passes: Sequence[int] | None = None):
        seen: set[int] = set()
        uniq, labels = [], []
        for k, p in enumerate(params):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                uniq.append(p)
                labels.append(passes[k] if passes is not None else 0)
        self.params = uniq
        self.align = align
        self.cycling = passes is not None
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[int, Bucket] = {}
        self._pass_buckets: dict[int, list[Bucket]] = {}
        for bi, idx in enumerate(plan_buckets(uniq, bucket_bytes, align, labels if self.cycling else None)):
            ps = [uniq[i] for i in idx]
            offsets, n, padded = flat_layout(ps, align)
            buf = torch.zeros(padded, dtype=dtype or ps[0].dtype, device=device or ps[0].device)
            b = Bucket(bi, ps, offsets, n, buf)
            b.state["pass"] = labels[idx[0]]
            self.buckets.append(b)
            self._pass_buckets.setdefault(labels[idx[0]], []).append(b)
            for p in ps:
                self._bucket_of[id(p)] = b
        self._next: dict[int, int] = {}
        self._handles: list = []
        self._on_ready: Callable[[Bucket], None] | None = None
        self.reset()

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)

    def attach_grads(self) -> None:
        """Point every ``param.grad`` at its slice of the bucket buffer."""
        for b in self.buckets:
            for p, v in zip(b.params, b.views()):
                p.grad = v

    def zero_(self) -> None:
        for b in self.buckets:
            b.buffer.zero_()

    def reset(self) -> None:
        """Prepare the counters for the next backward pass."""
        for label in self._pass_buckets:
            self._reset_pass(label)

    def _reset_pass(self, label: int) -> None:
        for b in self._pass_buckets[label]:
            b.pending = len(b.params)
            b.ready = False
        self._next[label] = 0

    def bucket_of(self, p: torch.Tensor) -> Bucket:
        return self._bucket_of[id(p)]

    def register_hooks(self, on_ready: Callable[[Bucket], None], skip: Collection[int] = ()) -> None:
        """Count gradients with post-accumulate-grad hooks, except for the parameters whose ids
        are in ``skip`` (their owner reports them with ``arrived``)."""
        self._on_ready = on_ready
        for p in self.params:
            if id(p) not in skip:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def remove_hooks(self) -> None:
        remove_hooks(self._handles)

    def _hook(self, p: torch.Tensor) -> None:
        self.arrived(p)

    def arrived(self, p: torch.Tensor) -> None:
        """``p``'s gradient of the current pass is complete."""
        b = self._bucket_of[id(p)]
        b.pending -= 1
        if b.pending == 0:
            b.ready = True
            self._launch_in_order(b.state["pass"])

    def _launch_in_order(self, label: int) -> None:
        buckets = self._pass_buckets[label]
        while self._next[label] < len(buckets) and buckets[self._next[label]].ready:
            b = buckets[self._next[label]]
            self._next[label] += 1
            if self._on_ready is not None:
                self._on_ready(b)
        if self.cycling and self._next[label] == len(buckets):
            self._reset_pass(label)

    def _open(self, label: int) -> bool:
        return self._next[label] > 0 or any(b.ready or b.pending != len(b.params) for b in self._pass_buckets[label])

    def flush(self) -> None:
        """Hand over buckets whose parameters got no gradient this pass (unused parameters).
        With ``passes``, only the parts whose current pass has begun (or ``arrived`` was
        called for) are handed over; the others completed their last pass already."""
        for label in list(self._pass_buckets):
            if self.cycling and not self._open(label):
                continue
            for b in self._pass_buckets[label]:
                b.ready = True
            self._launch_in_order(label)
