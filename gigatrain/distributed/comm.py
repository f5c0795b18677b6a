"""Collectives over an explicit group, counting the bytes each one moves.

Every collective the library issues goes through a ``Comm`` so that communication volume can be
checked against theory (ZeRO's 2P(N-1)/N, 3P(N-1)/N) and shown in metrics. Two numbers are kept
per operation and group:

- ``payload``: bytes of the tensor handed to the collective on this rank;
- ``sent``: bytes this rank sends with the bandwidth-optimal (ring) algorithm:
  all-reduce 2(N-1)/N x size, reduce-scatter and all-gather (N-1)/N x the full size,
  broadcast size (root) / 0, point-to-point sends the message size.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Byte counters keyed by (group name, operation)."""

    payload: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    sent: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, group: str, op: str, payload: int, sent: float) -> None:
        key = (group, op)
        self.payload[key] += int(payload)
        self.sent[key] += int(round(sent))
        self.calls[key] += 1

    def reset(self) -> None:
        self.payload.clear()
        self.sent.clear()
        self.calls.clear()

    def total_sent(self, group: str | None = None) -> int:
        return sum(v for (g, _), v in self.sent.items() if group is None or g == group)

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (g, op), v in sorted(self.sent.items()):
            out.setdefault(g, {})[op] = v
        return out


# torch >= 2.13 renamed the flat-tensor collectives; 2.11 only has the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """A process group with a name, byte counting, and nothing else.

    ``size == 1`` groups skip communication entirely (and count nothing), so the same code runs
    on one process without special cases at the call sites.
    """

    def __init__(self, group, name: str, stats: CommStats | None = None):
        self.group = group
        self.name = name
        self.stats = stats if stats is not None else CommStats()
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)

    def __repr__(self) -> str:
        return f"Comm({self.name}, rank {self.rank}/{self.size})"

    def _count(self, op: str, payload: int, sent: float) -> None:
        self.stats.add(self.name, op, payload, sent)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, async_op: bool = False):
        if self.size == 1:
            return None
        n = _nbytes(t)
        self._count("all_reduce", n, 2 * n * (self.size - 1) / self.size)
        return dist.all_reduce(t, op=op, group=self.group, async_op=async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op=dist.ReduceOp.SUM,
                       async_op: bool = False):
        """``inp`` holds ``size`` equal shards; ``out`` receives this rank's reduced shard."""
        if self.size == 1:
            out.copy_(inp)
            return None
        n = _nbytes(inp)
        self._count("reduce_scatter", n, n * (self.size - 1) / self.size)
        return _reduce_scatter_flat(out, inp, op=op, group=self.group, async_op=async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        """``out`` (``size`` x ``inp``) receives every rank's ``inp`` in rank order."""
        if self.size == 1:
            out.copy_(inp)
            return None
        n = _nbytes(out)
        self._count("all_gather", _nbytes(inp), n * (self.size - 1) / self.size)
        return _all_gather_flat(out, inp, group=self.group, async_op=async_op)

    def broadcast(self, t: torch.Tensor, src: int = 0, async_op: bool = False):
        """``src`` is a rank inside this group."""
        if self.size == 1:
            return None
        n = _nbytes(t)
        self._count("broadcast", n, n if self.rank == src else 0)
        return dist.broadcast(t, src=self.ranks[src], group=self.group, async_op=async_op)

    def all_reduce_scalar(self, value: float, op=dist.ReduceOp.SUM, dtype=torch.float64,
                          device: torch.device | None = None) -> float:
        t = torch.tensor([value], dtype=dtype, device=device)
        self.all_reduce(t, op=op)
        return t.item()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)

    def p2p_ops(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]):
        """Post non-blocking sends and receives (peers are ranks inside this group) as one batch.

        Returns the list of works to wait on.
        """
        ops = []
        for t, peer in sends:
            self._count("send", _nbytes(t), _nbytes(t))
            ops.append(dist.P2POp(dist.isend, t, self.ranks[peer], group=self.group))
        for t, peer in recvs:
            ops.append(dist.P2POp(dist.irecv, t, self.ranks[peer], group=self.group))
        if not ops:
            return []
        return dist.batch_isend_irecv(ops)
