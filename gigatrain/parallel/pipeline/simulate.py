"""Run pipeline schedules on a cost model, without processes.

``simulate(schedules, costs)`` executes every rank's action list under the semantics stated in
``schedules`` (batches posted without waiting, per-rank batches finishing in order, a received
tensor waited for by the compute that reads it) and returns the timeline. It raises
``ScheduleError`` when a schedule is malformed (missing or duplicated work, a message without its
partner, per-peer message orders that disagree, a dependency run out of order) and
``DeadlockError`` naming the stuck actions when the ranks end up waiting on each other.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from .schedules import (
    B, F, W, Action, RECV_B, RECV_F, SEND_F, ScheduleError, _deps, stage_rank,
)
from .timeline import Record

__all__ = ["Costs", "SimResult", "simulate", "validate_schedule", "DeadlockError"]

PerStage = Union[float, Sequence[float]]


class DeadlockError(ScheduleError):
    """Every unfinished rank waits for a message that will never be matched."""


@dataclass(frozen=True)
class Costs:
    """Durations for the simulator; each of f, b, w is one number or one number per stage.

    ``b`` is the input-gradient part of the backward and ``w`` the weight-gradient part. A
    schedule without W actions runs the full backward as its B, costing ``b + w``; a zero-bubble
    schedule pays ``b`` for B and ``w`` for W. ``comm`` is the latency of one message: it
    completes ``comm`` after both its send and its receive have been started.
    ``send_overhead`` and ``recv_overhead`` are the host time a rank spends posting one send or
    one receive (LogP's *o*, where ``comm`` is its *L*): the rank computes nothing meanwhile, and
    a batch of messages starts once all of them are posted. On a GPU they are microseconds; on
    CPU ranks (gloo copies a send on the calling thread) a fraction of a millisecond.
    ``actions`` optionally gives single compute actions their own duration, keyed by
    ``(kind, stage, mb)`` (replaying a measured step, jitter included); the rest cost as above.
    """

    f: PerStage = 1.0
    b: PerStage = 2.0
    w: PerStage = 0.0
    comm: float = 0.0
    send_overhead: float = 0.0
    recv_overhead: float = 0.0
    actions: Mapping[tuple[str, int, int], float] | None = None

    def of(self, kind: str, stage: int, split_backward: bool) -> float:
        def pick(v):
            return float(v[stage]) if isinstance(v, (list, tuple)) else float(v)

        if kind == "F":
            return pick(self.f)
        if kind == "B":
            return pick(self.b) if split_backward else pick(self.b) + pick(self.w)
        if kind == "W":
            return pick(self.w)
        raise ValueError(kind)


@dataclass
class SimResult:
    """Outcome of ``simulate``.

    - ``records``: every compute action (and every message: start of the later of its two
      batches to its completion) with its rank, start and end.
    - ``makespan``: time at which the last rank finishes (all ranks start at 0).
    - ``busy``: compute time per rank.
    - ``bubble_fraction``: idle share of the compute capacity over the step,
      ``1 - sum(busy) / (pp * makespan)``; time spent only communicating counts as idle.
    - ``peak_in_flight``: per stage, the largest number of micro-batches whose activations are
      held, i.e. whose F has run and whose backward has not finished (the B, or the W in
      zero-bubble schedules, since W still reads the stored inputs).
    """

    records: list[Record]
    makespan: float
    busy: list[float]
    bubble_fraction: float
    peak_in_flight: dict[int, int]
    n_stages: int
    microbatches: int
    pp: int = 0
    finish: list[float] = field(default_factory=list)

    def timeline(self, rank: int) -> list[Record]:
        return [r for r in self.records if r.rank == rank]


def _shape(schedules: Sequence[Sequence[Action]]) -> tuple[int, int, int]:
    pp = len(schedules)
    acts = [a for lst in schedules for a in lst]
    if pp == 0 or not acts:
        raise ScheduleError("empty schedule")
    n_stages = 1 + max(a.stage for a in acts)
    if n_stages % pp:
        raise ScheduleError(f"{n_stages} stages cannot be spread over {pp} ranks (stage s lives on rank s % pp)")
    M = 1 + max(a.mb for a in acts)
    return pp, n_stages, M


def validate_schedule(schedules: Sequence[Sequence[Action]]) -> tuple[int, int, bool]:
    """Static checks; returns (n_stages, microbatches, has_w).

    Checks that every action sits on the rank that owns its stage; that every (stage, mb) has
    exactly one F and one B, and one W each or none at all; that every cross-rank hand-off has
    exactly one send and one receive and nothing else is sent; and that for every pair of ranks
    the sender's order of messages equals the receiver's.
    """
    pp, n_stages, M = _shape(schedules)
    count: dict[tuple[str, int, int], int] = defaultdict(int)
    for r, lst in enumerate(schedules):
        for a in lst:
            if stage_rank(a.stage, pp) != r:
                raise ScheduleError(f"{a!r} is on rank {r} but stage {a.stage} lives on rank {stage_rank(a.stage, pp)}")
            if not 0 <= a.stage < n_stages or a.mb < 0:
                raise ScheduleError(f"{a!r} out of range")
            if not a.is_compute and not 0 <= a.peer < n_stages:
                raise ScheduleError(f"{a!r} talks to a stage that does not exist")
            count[(a.kind, a.stage, a.mb)] += 1
    n_w = sum(v for k, v in count.items() if k[0] == "W")
    has_w = n_w > 0
    for s in range(n_stages):
        for m in range(M):
            for kind in ("F", "B") + (("W",) if has_w else ()):
                c = count.get((kind, s, m), 0)
                if c != 1:
                    raise ScheduleError(f"{kind}(stage={s}, mb={m}) appears {c} times, expected once")
            for kind, needed in (
                ("SEND_F", s < n_stages - 1 and stage_rank(s + 1, pp) != stage_rank(s, pp)),
                ("RECV_F", s > 0 and stage_rank(s - 1, pp) != stage_rank(s, pp)),
                ("SEND_B", s > 0 and stage_rank(s - 1, pp) != stage_rank(s, pp)),
                ("RECV_B", s < n_stages - 1 and stage_rank(s + 1, pp) != stage_rank(s, pp)),
            ):
                c = count.get((kind, s, m), 0)
                if c != int(needed):
                    raise ScheduleError(f"{kind}(stage={s}, mb={m}) appears {c} times, expected {int(needed)}")
    extra = [k for k in count if k[2] >= M or k[1] >= n_stages]
    if extra:
        raise ScheduleError(f"actions out of range: {extra[:5]}")
    # Per-peer order: what rank a sends to rank b, in a's order, must be what b receives from a.
    sent: dict[tuple[int, int], list] = defaultdict(list)
    recv: dict[tuple[int, int], list] = defaultdict(list)
    for r, lst in enumerate(schedules):
        for a in lst:
            if a.is_compute:
                continue
            other = stage_rank(a.peer, pp)
            (sent[(r, other)] if a.is_send else recv[(other, r)]).append(a.message)
    for (src, dst), seq in sent.items():
        got = recv.get((src, dst), [])
        for i, (x, y) in enumerate(zip(seq, got)):
            if x != y:
                raise ScheduleError(
                    f"message order between rank {src} -> rank {dst} disagrees at position {i}: "
                    f"rank {src} sends {x} while rank {dst} expects {y}; point-to-point messages "
                    "are matched in order, so both sides must list them in the same order")
    return n_stages, M, has_w


@dataclass
class _Batch:
    rank: int
    index: int
    ops: list
    post: float | None = None
    start: float | None = None
    done: float | None = None


@dataclass
class _Op:
    action: Action
    batch: _Batch
    partner: "_Op | None" = None
    done: float | None = None


def simulate(schedules: Sequence[Sequence[Action]], costs: Costs | None = None) -> SimResult:
    """Execute the schedules on ``costs`` (default F=1, B=2, W=0, free messages); see the module
    docstring. Raises ``ScheduleError`` / ``DeadlockError``."""
    costs = costs or Costs()
    n_stages, M, has_w = validate_schedule(schedules)
    pp = len(schedules)

    # Items per rank: compute actions and batches of consecutive messages.
    items: list[list] = []
    batches: list[list[_Batch]] = []
    ops_by_msg: dict[tuple, dict[bool, _Op]] = defaultdict(dict)
    for r, lst in enumerate(schedules):
        its, bs = [], []
        for a in lst:
            if a.is_compute:
                its.append(a)
                continue
            if not its or not isinstance(its[-1], _Batch):
                b = _Batch(r, len(bs), [])
                bs.append(b)
                its.append(b)
            op = _Op(a, its[-1])
            its[-1].ops.append(op)
            ops_by_msg[a.message][a.is_send] = op
        items.append(its)
        batches.append(bs)
    for pair in ops_by_msg.values():
        pair[True].partner, pair[False].partner = pair[False], pair[True]

    end: dict[tuple[str, int, int], float] = {}
    recv_done: dict[tuple, _Op] = {}  # message -> receive op on the consumer's rank
    pos, clock = [0] * pp, [0.0] * pp
    next_batch = [0] * pp
    records: list[Record] = []
    busy = [0.0] * pp

    def advance_host(r: int) -> bool:
        moved = False
        while pos[r] < len(items[r]):
            it = items[r][pos[r]]
            if isinstance(it, _Batch):
                for op in it.ops:
                    a = op.action
                    if a.is_send:
                        producer = ("F" if isinstance(a, SEND_F) else "B", a.stage, a.mb)
                        if producer not in end:
                            raise ScheduleError(f"rank {r}: {a!r} is posted before its producer {producer[0]}({a.stage}, {a.mb}) ran")
                    else:
                        recv_done[a.message] = op
                clock[r] += sum(costs.send_overhead if op.action.is_send else costs.recv_overhead for op in it.ops)
                it.post = clock[r]
                pos[r] += 1
                moved = True
                continue
            a = it
            ready = clock[r]
            for dep in _deps(a, n_stages):
                dep_rank = stage_rank(dep[1], pp)
                if dep_rank == r:
                    if dep not in end:
                        raise ScheduleError(f"rank {r}: {a!r} runs before {dep[0]}({dep[1]}, {dep[2]}) which it needs")
                    ready = max(ready, end[dep])
                else:
                    msg = (dep[0], dep[1], dep[2])
                    op = recv_done.get(msg)
                    if op is None:
                        kind = "RECV_F" if dep[0] == "F" else "RECV_B"
                        raise ScheduleError(f"rank {r}: {a!r} runs before its {kind}({a.stage}, {a.mb}) is posted")
                    if op.done is None:
                        return moved
                    ready = max(ready, op.done)
            cost = costs.actions.get((a.kind, a.stage, a.mb)) if costs.actions else None
            cost = costs.of(a.kind, a.stage, has_w) if cost is None else cost
            records.append(Record(r, a, ready, ready + cost))
            busy[r] += cost
            clock[r] = ready + cost
            end[(a.kind, a.stage, a.mb)] = clock[r]
            pos[r] += 1
            moved = True
        return moved

    def advance_stream(r: int) -> bool:
        moved = False
        while next_batch[r] < len(batches[r]):
            b = batches[r][next_batch[r]]
            if b.post is None:
                break
            if b.start is None:
                prev = batches[r][b.index - 1].done if b.index else 0.0
                b.start = max(b.post, prev)
                moved = True
            for op in b.ops:
                if op.done is None and op.partner.batch.start is not None:
                    op.done = max(b.start, op.partner.batch.start) + costs.comm
                    moved = True
            if any(op.done is None for op in b.ops):
                break
            b.done = max(op.done for op in b.ops)
            for op in b.ops:
                records.append(Record(r, op.action, max(b.start, op.partner.batch.start), op.done))
            next_batch[r] += 1
            moved = True
        return moved

    while True:
        progress = False
        for r in range(pp):
            progress |= advance_host(r)
            progress |= advance_stream(r)
        if not progress:
            break

    unfinished = [r for r in range(pp) if pos[r] < len(items[r]) or next_batch[r] < len(batches[r])]
    if unfinished:
        raise DeadlockError(_deadlock_report(unfinished, items, pos, batches, next_batch))

    finish = [max([clock[r]] + [b.done for b in batches[r]]) for r in range(pp)]
    makespan = max(finish)
    bubble = 1.0 - sum(busy) / (pp * makespan) if makespan > 0 else 0.0
    return SimResult(records=records, makespan=makespan, busy=busy, bubble_fraction=bubble,
                     peak_in_flight=peak_in_flight(schedules), n_stages=n_stages,
                     microbatches=M, pp=pp, finish=finish)


def _deadlock_report(unfinished, items, pos, batches, next_batch) -> str:
    lines = ["pipeline schedule deadlocks:"]

    def where(op: _Op) -> str:
        b = op.batch
        if b.post is None:
            return f"not yet posted by rank {b.rank} (its list is stuck earlier)"
        return f"posted by rank {b.rank} but queued behind an unfinished earlier batch"

    for r in unfinished:
        if pos[r] < len(items[r]):
            it = items[r][pos[r]]
            if not isinstance(it, _Batch):
                kind = RECV_F(it.stage, it.mb) if isinstance(it, F) else RECV_B(it.stage, it.mb)
                lines.append(f"  rank {r}: {it!r} waits for {kind!r}")
        if next_batch[r] < len(batches[r]):
            b = batches[r][next_batch[r]]
            if b.post is not None:
                for op in b.ops:
                    if op.done is None:
                        lines.append(f"  rank {r}: {op.action!r} waits for {op.partner.action!r}, "
                                     + where(op.partner))
    return "\n".join(lines)


def peak_in_flight(schedules: Sequence[Sequence[Action]]) -> dict[int, int]:
    """Per stage, the most micro-batches between their F and the end of their backward (W if the
    schedule splits the backward, else B), counted along each rank's list order."""
    has_w = any(isinstance(a, W) for lst in schedules for a in lst)
    last = W if has_w else B
    peak: dict[int, int] = {}
    for lst in schedules:
        live: dict[int, int] = defaultdict(int)
        for a in lst:
            if isinstance(a, F):
                live[a.stage] += 1
                peak[a.stage] = max(peak.get(a.stage, 0), live[a.stage])
            elif isinstance(a, last):
                live[a.stage] -= 1
    return dict(sorted(peak.items()))
