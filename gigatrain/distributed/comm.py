"""Collectives over an explicit group, counting the bytes each one moves.

Every collective the library issues goes through a ``Comm`` so that communication volume can be
checked against theory (ZeRO's 2P(N-1)/N, 3P(N-1)/N) and shown in metrics. Two numbers are kept
per operation and group:

- ``payload``: bytes of the tensor handed to the collective on this rank;
- ``sent``: bytes this rank sends with the bandwidth-optimal (ring) algorithm:
  all-reduce 2(N-1)/N x size, reduce-scatter and all-gather (N-1)/N x the full size,
  all-to-all (N-1)/N x the size,
  broadcast size (root) / 0, point-to-point sends the message size.

Every operation is also recorded in an ``OpLog`` (per rank, shared by the mesh's groups) for the
hang watchdog (``watchdog.py``): a sequence number per channel, the op, group, shapes, start
time, and completion (for asynchronous ops, when ``wait()`` on the returned work returns). That
is a few dict writes per op and no communication; the watchdog compares the ranks' logs only
when something has been stuck for ``parallel.hang_timeout_s``.
"""
from __future__ import annotations

import time
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
    # Seconds this rank's threads spent blocked in communication: synchronous collectives, and
    # ``wait()`` on asynchronous ones (what overlap did not hide). Step profiles take differences.
    blocked_s: float = 0.0

    def add(self, group: str, op: str, payload: int, sent: float) -> None:
        key = (group, op)
        self.payload[key] += int(payload)
        if sent:  # a broadcast's receivers send nothing: not listed among what they sent
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


class OpRecord:
    """One collective or point-to-point message as this rank saw it.

    ``channel`` names what the ranks must agree on: a group's collectives
    (``"dp[0,1]"``) or one direction of a pair inside a group (``"pp[0>1]"``, messages from
    global rank 0 to 1). ``seq`` is the op's index on its channel: the n-th collective of a group
    is the n-th on every member, and the n-th message 0 -> 1 is both the sender's and the
    receiver's n-th on that channel, which is what lets the watchdog tell who never arrived.
    ``ranks`` are the global ranks that must take part.
    """

    __slots__ = ("op", "group", "channel", "seq", "ranks", "shapes", "t0", "t1", "step", "work")

    def __init__(self, op, group, channel, seq, ranks, shapes, t0, step):
        self.op, self.group, self.channel, self.seq = op, group, channel, seq
        self.ranks, self.shapes, self.t0, self.t1, self.step = ranks, shapes, t0, None, step
        self.work = None

    def describe(self, now: float) -> dict:
        """A JSON-able summary; ages are taken on this rank's clock, so ranks need no common one."""
        d = {"op": self.op, "group": self.group, "channel": self.channel, "seq": self.seq,
             "ranks": list(self.ranks), "shapes": [list(s) for s in self.shapes], "step": self.step,
             "age_s": round(now - self.t0, 3)}
        if self.t1 is not None:
            d["done_ago_s"] = round(now - self.t1, 3)
        return d


class OpLog:
    """Per-rank record of the collectives and messages issued through ``Comm``.

    ``entered[channel]`` counts the ops this rank started on a channel (so it is the next op's
    sequence number), ``pending`` holds the ops started and not completed, ``last_done`` is the
    most recently completed one, and ``step`` is the training step the loop says it is in. The
    main thread writes; the watchdog thread only takes snapshots (``snapshot``).
    """

    def __init__(self):
        self.entered: dict[str, int] = {}
        self.pending: dict[int, OpRecord] = {}
        self.last_done: OpRecord | None = None
        self.step: int | None = None

    def begin(self, op: str, group: str, channel: str, ranks, shapes) -> OpRecord:
        """Record that this rank entered ``op``; returns the record to pass to ``end``."""
        seq = self.entered.get(channel, 0)
        self.entered[channel] = seq + 1
        rec = OpRecord(op, group, channel, seq, ranks, shapes, time.monotonic(), self.step)
        self.pending[id(rec)] = rec
        return rec

    def end(self, rec: OpRecord) -> None:
        """Record completion (idempotent: a work may be waited on more than once)."""
        if self.pending.pop(id(rec), None) is not None:
            rec.t1 = time.monotonic()
            rec.work = None  # finished gloo works must not outlive the process group
            self.last_done = rec

    def stuck(self, older_than_s: float) -> OpRecord | None:
        """The oldest op started more than ``older_than_s`` ago and not completed, or None."""
        now = time.monotonic()
        oldest = None
        for rec in self._sweep():
            if now - rec.t0 >= older_than_s and (oldest is None or rec.t0 < oldest.t0):
                oldest = rec
        return oldest

    def _sweep(self) -> list[OpRecord]:
        """Pending ops, after ending asynchronous ones that completed without anyone waiting on
        them (they would otherwise look stuck forever)."""
        out = []
        for rec in _copy_values(self.pending):
            work = rec.work
            if work is not None:
                try:
                    finished = work.is_completed()
                except Exception:  # a backend without it: trust wait()
                    finished = False
                if finished:
                    self.end(rec)
                    continue
            out.append(rec)
        return out

    def snapshot(self) -> dict:
        """What the watchdog publishes for this rank (JSON-able)."""
        pending = sorted(self._sweep(), key=lambda r: r.t0)
        now = time.monotonic()
        last = self.last_done
        return {"step": self.step, "entered": _copy(self.entered),
                "pending": [r.describe(now) for r in pending],
                "last_done": last.describe(now) if last is not None else None}

    def clear_pending(self) -> None:
        self.pending.clear()


def _copy_values(d: dict) -> list:
    return list(_copy(d).values())


def _copy(d: dict) -> dict:
    # The main thread may insert or pop while the watchdog thread copies: retry on that race.
    for _ in range(100):
        try:
            return dict(d)
        except RuntimeError:
            continue
    return {}


_UNCOUNTED = CommStats()   # where the waits of works made outside a Comm go


class _TrackedWork:
    """The backend's Work, with completion recorded when ``wait()`` returns."""

    __slots__ = ("_work", "_rec", "_log", "_stats")

    def __init__(self, work, rec: OpRecord, log: OpLog, stats: CommStats | None = None):
        self._work, self._rec, self._log = work, rec, log
        self._stats = stats if stats is not None else _UNCOUNTED
        rec.work = work

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self._work.wait(*args, **kwargs)
        self._stats.blocked_s += time.perf_counter() - t0
        self._log.end(self._rec)
        return out

    def is_completed(self) -> bool:
        return self._work.is_completed()

    def __getattr__(self, name):
        return getattr(self._work, name)


def _post_ops(ops: list) -> list:
    # One message needs no batch: posting it directly skips the coalescing context (about
    # 0.02 ms less per message posted through a Comm, on an idle CPU with gloo).
    if len(ops) == 1:
        return [ops[0].op(ops[0].tensor, ops[0].peer, group=ops[0].group)]
    return dist.batch_isend_irecv(ops)


class Comm:
    """A process group with a name, byte counting and op recording, and nothing else.

    ``size == 1`` groups skip communication entirely (and count and record nothing), so the same
    code runs on one process without special cases at the call sites. Asynchronous ops return
    the backend's work wrapped so that ``wait()`` also records completion; call sites use it as
    the work itself.
    """

    def __init__(self, group, name: str, stats: CommStats | None = None, log: OpLog | None = None):
        self.group = group
        self.name = name
        self.stats = stats if stats is not None else CommStats()
        self.log = log if log is not None else OpLog()
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)
        self._channel = f"{name}[{','.join(map(str, self.ranks))}]"
        self._members = tuple(self.ranks)
        self._p2p_channels: dict[tuple[int, int], str] = {}
        self._local = None      # LocalP2P once use_local_p2p() has set it up

    def use_local_p2p(self, timeout_s: float = 600.0, ring_bytes: int = 16 << 20) -> bool:
        """Carry point-to-point messages of CPU tensors between neighbouring members of this
        group through shared memory (``local_p2p``) when every member runs on this host; others
        stay on the backend. Collective over the group. Returns whether shared memory is in use."""
        from .local_p2p import LocalP2P
        if self.size == 1 or self._local is not None:
            return self._local is not None
        self._local = LocalP2P.open(self.group, self.ranks, self.ranks[self.rank], timeout_s=timeout_s,
                                    ring_bytes=ring_bytes)
        return self._local is not None

    def close_local_p2p(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None

    def __repr__(self) -> str:
        return f"Comm({self.name}, rank {self.rank}/{self.size})"

    def _count(self, op: str, payload: int, sent: float) -> None:
        self.stats.add(self.name, op, payload, sent)

    def _recorded(self, op: str, shapes: list, call, async_op: bool):
        rec = self.log.begin(op, self.name, self._channel, self._members, shapes)
        t0 = time.perf_counter()
        try:
            work = call()
        except BaseException:
            self.log.end(rec)
            raise
        if async_op:
            return _TrackedWork(work, rec, self.log, self.stats)
        self.stats.blocked_s += time.perf_counter() - t0
        self.log.end(rec)
        return work

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, async_op: bool = False):
        if self.size == 1:
            return None
        n = _nbytes(t)
        self._count("all_reduce", n, 2 * n * (self.size - 1) / self.size)
        return self._recorded("all_reduce", [tuple(t.shape)], lambda: dist.all_reduce(
            t, op=op, group=self.group, async_op=async_op), async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op=dist.ReduceOp.SUM,
                       async_op: bool = False):
        """``inp`` holds ``size`` equal shards; ``out`` receives this rank's reduced shard."""
        if self.size == 1:
            out.copy_(inp)
            return None
        n = _nbytes(inp)
        self._count("reduce_scatter", n, n * (self.size - 1) / self.size)
        return self._recorded("reduce_scatter", [tuple(inp.shape)], lambda: _reduce_scatter_flat(
            out, inp, op=op, group=self.group, async_op=async_op), async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        """``out`` (``size`` x ``inp``) receives every rank's ``inp`` in rank order."""
        if self.size == 1:
            out.copy_(inp)
            return None
        n = _nbytes(out)
        self._count("all_gather", _nbytes(inp), n * (self.size - 1) / self.size)
        return self._recorded("all_gather", [tuple(inp.shape)], lambda: _all_gather_flat(
            out, inp, group=self.group, async_op=async_op), async_op)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        """``inp`` holds ``size`` equal chunks; chunk j goes to rank j, and ``out``'s chunk i is
        what rank i sent here."""
        if self.size == 1:
            out.copy_(inp)
            return None
        n = _nbytes(inp)
        self._count("all_to_all", n, n * (self.size - 1) / self.size)
        return self._recorded("all_to_all", [tuple(inp.shape)], lambda: dist.all_to_all_single(
            out, inp, group=self.group, async_op=async_op), async_op)

    def broadcast(self, t: torch.Tensor, src: int = 0, async_op: bool = False):
        """``src`` is a rank inside this group."""
        if self.size == 1:
            return None
        n = _nbytes(t)
        self._count("broadcast", n, n if self.rank == src else 0)
        return self._recorded("broadcast", [tuple(t.shape)], lambda: dist.broadcast(
            t, src=self.ranks[src], group=self.group, async_op=async_op), async_op)

    def all_reduce_scalar(self, value: float, op=dist.ReduceOp.SUM, dtype=torch.float64,
                          device: torch.device | None = None) -> float:
        t = torch.tensor([value], dtype=dtype, device=device)
        self.all_reduce(t, op=op)
        return t.item()

    def barrier(self) -> None:
        if self.size > 1:
            self._recorded("barrier", [], lambda: dist.barrier(group=self.group), False)

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable ``obj``, in group rank order. For rare, small messages (an
        error text every rank must show); the bytes are not counted, the op is recorded."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        self._recorded("all_gather_object", [], lambda: dist.all_gather_object(out, obj, group=self.group), False)
        return out

    def _p2p_channel(self, src: int, dst: int) -> str:
        key = (src, dst)
        ch = self._p2p_channels.get(key)
        if ch is None:
            ch = self._p2p_channels[key] = f"{self.name}[{src}>{dst}]"
        return ch

    def p2p_ops(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                *, count: bool = True):
        """Post non-blocking sends and receives (peers are ranks inside this group) as one batch.

        Returns one work per message, sends first then receives, each in the order given.
        Messages to the same peer arrive in the order they were posted. ``count=False`` keeps
        one-off set-up traffic (copying initial values) out of the byte counts, which are meant to
        describe training steps; the messages are still recorded for the watchdog.
        """
        me = self.ranks[self.rank]
        local = self._local
        msgs, recs = [], []           # (is_send, tensor, global peer) in the order of the works
        for t, peer in sends:
            if count:
                self._count("send", _nbytes(t), _nbytes(t))
            g = self.ranks[peer]
            msgs.append((True, t, g))
            recs.append(self.log.begin("send", self.name, self._p2p_channel(me, g), (me, g), [tuple(t.shape)]))
        for t, peer in recvs:
            g = self.ranks[peer]
            msgs.append((False, t, g))
            recs.append(self.log.begin("recv", self.name, self._p2p_channel(g, me), (g, me), [tuple(t.shape)]))
        if not msgs:
            return []
        try:
            works: list = [None] * len(msgs)
            ops, where = [], []
            for i, (is_send, t, g) in enumerate(msgs):
                # Both sides of a pair pick the same carrier: shared memory where the pair has a
                # channel and the tensor is on the CPU, the backend otherwise.
                if local is not None and local.connects(g) and t.device.type == "cpu":
                    works[i] = local.send(t, g) if is_send else local.recv(t, g)
                else:
                    ops.append(dist.P2POp(dist.isend if is_send else dist.irecv, t, g, group=self.group))
                    where.append(i)
            if ops:
                for i, w in zip(where, _post_ops(ops)):
                    works[i] = w
        except BaseException:
            for rec in recs:
                self.log.end(rec)
            raise
        return [_TrackedWork(w, rec, self.log, self.stats) for w, rec in zip(works, recs)]
