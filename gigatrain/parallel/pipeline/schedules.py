"""Pipeline schedules as data.

A schedule is ``list[list[Action]]``: one action list per pipeline rank, executed in order by
``runtime.PipelineRuntime`` (or by ``simulate.simulate`` without any process). Nothing here
touches torch.

Stages and ranks. With ``pp`` ranks and ``V`` model chunks per rank (``virtual``), the model is
cut into ``pp * V`` stages and stage ``s`` lives on rank ``s % pp`` (chunk ``s // pp``), the
Megatron interleaved layout. ``V == 1`` is the ordinary pipeline.

Actions.
- ``F(stage, mb)``: forward of one micro-batch through one stage.
- ``B(stage, mb)``: backward. In schedules without ``W`` actions this is the full backward
  (input and weight gradients); in zero-bubble schedules it is the input gradient only.
- ``W(stage, mb)``: weight gradient (zero-bubble schedules only).
- ``SEND_F / RECV_F / SEND_B / RECV_B(stage, mb)``: point-to-point messages. ``stage`` is the
  local stage the tensor belongs to and ``peer`` (a property) the stage on the other side:
  ``SEND_F(s)`` sends stage ``s``'s output to ``s + 1``; ``RECV_F(s)`` receives stage ``s``'s
  input from ``s - 1``; ``SEND_B(s)`` sends the gradient of stage ``s``'s input to ``s - 1``;
  ``RECV_B(s)`` receives the gradient of stage ``s``'s output from ``s + 1``.

Execution semantics (the contract between schedules, simulator and runtime).
- Consecutive communication actions form one *batch*: the runtime posts them together
  (``batch_isend_irecv``) without waiting. A received tensor is waited for just before the first
  compute action that reads it; sends are waited for at the end of the step.
- Batches leave a rank in list order and a batch is finished only when every message in it has
  been matched by the peer (the way NCCL runs grouped point-to-point calls on one stream). The
  simulator models exactly this, which is stricter than gloo needs.
- Between any two ranks, messages are matched in order (no tags), so the sequence of sends from
  rank a to rank b must equal the sequence of receives on b from a.

How communication is placed. The schedule kinds below only choose the order of compute actions
on each rank. ``lower_communication`` then inserts the messages: it runs the compute lists once
on a reference cost model, stamps every message with the time its producer finishes, and puts
the send right after the producer and the receive at the same moment of the receiver's
timeline. Every rank then handles its messages in one global order (by that stamp), which makes
the per-peer order consistent on both sides and rules out deadlock: the earliest unfinished
message always has both ends posted. Messages whose stamps fall between the same two compute
actions end up side by side and are posted as one batch, which is Megatron's
``send_forward_recv_backward`` pairing, found rather than hand-written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

__all__ = [
    "Action", "F", "B", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B",
    "KINDS", "build_schedule", "compute_order", "lower_communication", "format_schedule",
    "stage_rank", "ScheduleError",
]

KINDS = ("naive", "gpipe", "1f1b", "interleaved", "zb")


class ScheduleError(ValueError):
    """A schedule is malformed, cannot be built as asked, or would deadlock."""


# ---------------------------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    stage: int
    mb: int

    kind: ClassVar[str] = "?"
    is_compute: ClassVar[bool] = True

    def __str__(self) -> str:  # "3F1": stage 3, forward, micro-batch 1 (torch pipelining style)
        return f"{self.stage}{self.kind}{self.mb}"


@dataclass(frozen=True)
class F(Action):
    kind: ClassVar[str] = "F"


@dataclass(frozen=True)
class B(Action):
    kind: ClassVar[str] = "B"


@dataclass(frozen=True)
class W(Action):
    kind: ClassVar[str] = "W"


@dataclass(frozen=True)
class _Comm(Action):
    is_compute: ClassVar[bool] = False
    is_send: ClassVar[bool] = False
    direction: ClassVar[str] = "F"  # which pass the tensor belongs to
    offset: ClassVar[int] = 0       # peer = stage + offset

    @property
    def peer(self) -> int:
        return self.stage + self.offset

    @property
    def message(self) -> tuple[str, int, int]:
        """Identity of the message shared by the send and its matching receive:
        (pass, sending stage, micro-batch)."""
        sender = self.stage if self.is_send else self.peer
        return (self.direction, sender, self.mb)


@dataclass(frozen=True)
class SEND_F(_Comm):
    kind: ClassVar[str] = "SEND_F"
    is_send: ClassVar[bool] = True
    direction: ClassVar[str] = "F"
    offset: ClassVar[int] = 1


@dataclass(frozen=True)
class RECV_F(_Comm):
    kind: ClassVar[str] = "RECV_F"
    direction: ClassVar[str] = "F"
    offset: ClassVar[int] = -1


@dataclass(frozen=True)
class SEND_B(_Comm):
    kind: ClassVar[str] = "SEND_B"
    is_send: ClassVar[bool] = True
    direction: ClassVar[str] = "B"
    offset: ClassVar[int] = -1


@dataclass(frozen=True)
class RECV_B(_Comm):
    kind: ClassVar[str] = "RECV_B"
    direction: ClassVar[str] = "B"
    offset: ClassVar[int] = 1


def stage_rank(stage: int, pp: int) -> int:
    """Rank that holds ``stage`` in the interleaved layout (stage = chunk * pp + rank)."""
    return stage % pp


# ---------------------------------------------------------------------------------------------
# Compute orders, one function per kind
# ---------------------------------------------------------------------------------------------
def _naive(pp: int, M: int) -> list[list[Action]]:
    # One micro-batch goes all the way down and back before the next starts.
    return [[a for m in range(M) for a in (F(r, m), B(r, m))] for r in range(pp)]


def _gpipe(pp: int, M: int) -> list[list[Action]]:
    return [[F(r, m) for m in range(M)] + [B(r, m) for m in range(M)] for r in range(pp)]


def _one_f_one_b(pp: int, M: int) -> list[list[Action]]:
    out = []
    for r in range(pp):
        warm = min(pp - r - 1, M)  # forwards needed before the first gradient can come back
        acts: list[Action] = [F(r, m) for m in range(warm)]
        for i in range(M - warm):  # steady state: one forward, one backward
            acts += [F(r, warm + i), B(r, i)]
        acts += [B(r, m) for m in range(M - warm, M)]
        out.append(acts)
    return out


def _virtual_order(pp: int, M: int, V: int, r: int, backward: bool) -> list[tuple[int, int]]:
    """(stage, mb) sequence of Megatron's interleaved schedule on rank r: micro-batches go in
    groups of pp; each group runs through chunk 0, then chunk 1, ... (backward: reverse chunks).
    With V == 1 this is plain micro-batch order, whatever M."""
    seq = []
    for g0 in range(0, M, pp):
        group = range(g0, min(g0 + pp, M))
        for c in range(V):
            chunk = V - 1 - c if backward else c
            seq += [(chunk * pp + r, m) for m in group]
    return seq


def _interleaved(pp: int, M: int, V: int) -> list[list[Action]]:
    if M % pp != 0:
        raise ScheduleError(
            f"interleaved schedule needs microbatches ({M}) to be a multiple of pp ({pp}): "
            "micro-batches travel through the V chunks in groups of pp, so that the output of "
            "rank pp-1's chunk c arrives at rank 0 exactly when rank 0 is ready to run chunk "
            "c+1; with a smaller group rank 0 would sit idle waiting for it (e.g. pp=4, M=6 "
            "idles 35% instead of 20%). Use a multiple of pp, or '1f1b'")
    total = M * V
    out = []
    for r in range(pp):
        fwd = _virtual_order(pp, M, V, r, backward=False)
        bwd = _virtual_order(pp, M, V, r, backward=True)
        if M == pp:
            warm = total  # Megatron: with a single group everything is warm-up
        else:
            # (V-1)*pp forwards fill the other chunks before the first backward can start;
            # 2*(pp-r-1) rather than 1F1B's pp-r-1 keeps a spare forward per hop ready, which
            # hides message latency (with free messages both give the same bubble).
            warm = min((pp - r - 1) * 2 + (V - 1) * pp, total)
        acts: list[Action] = [F(*x) for x in fwd[:warm]]
        for i in range(total - warm):
            acts += [F(*fwd[warm + i]), B(*bwd[i])]
        acts += [B(*x) for x in bwd[total - warm:]]
        out.append(acts)
    return out


def _zero_bubble(pp: int, M: int, V: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al., 2023), extended to V chunks with the interleaved order.

    Step x of rank r runs ``F(fwd[x])``, then ``B(bwd[x - warm_r])``, then ``W(bwd[x - warm_0])``
    (each only if its index is in range), where ``fwd``/``bwd`` are the rank's forward and
    backward (stage, mb) sequences and ``warm_r`` is the 1F1B (or interleaved) warm-up length of
    rank r. The B's therefore follow 1F1B exactly, and every W is delayed to the step at which
    rank 0 would run it: later ranks, which 1F1B leaves idle at the start and the end, spend
    those slots on W's, and no rank holds more activations than rank 0 of 1F1B
    (``warm_0 + 1`` micro-batches between F and W). With F = B = W the bubble drops from
    ``(pp-1)(F+B+W)`` to ``(pp-1)(F+B-W)`` per rank.
    """
    if V > 1 and M % pp != 0:
        raise ScheduleError(
            f"zb with virtual={V} follows the interleaved order and needs microbatches ({M}) to "
            f"be a multiple of pp ({pp}) for the same reason as 'interleaved'")
    total = M * V
    out = []
    for r in range(pp):
        fwd = _virtual_order(pp, M, V, r, backward=False)
        bwd = _virtual_order(pp, M, V, r, backward=True)
        if V == 1:
            warm, warm0 = pp - r - 1, pp - 1
        elif M == pp:
            warm = warm0 = total
        else:
            warm, warm0 = (pp - r - 1) * 2 + (V - 1) * pp, (pp - 1) * 2 + (V - 1) * pp
        warm, warm0 = min(warm, total), min(warm0, total)
        acts: list[Action] = []
        for x in range(total + warm0):
            if x < total:
                acts.append(F(*fwd[x]))
            if 0 <= x - warm < total:
                acts.append(B(*bwd[x - warm]))
            if 0 <= x - warm0 < total:
                acts.append(W(*bwd[x - warm0]))
        out.append(acts)
    return out


def compute_order(kind: str, pp: int, microbatches: int, virtual: int = 1) -> list[list[Action]]:
    """Per-rank order of compute actions (F, B, W) for a schedule ``kind``, without messages."""
    if kind not in KINDS:
        raise ScheduleError(f"unknown schedule kind {kind!r}; choose one of {', '.join(KINDS)}")
    if pp < 1 or microbatches < 1 or virtual < 1:
        raise ScheduleError(f"pp ({pp}), microbatches ({microbatches}) and virtual ({virtual}) must be >= 1")
    if kind in ("naive", "gpipe", "1f1b") and virtual != 1:
        raise ScheduleError(f"schedule {kind!r} runs one chunk per rank (virtual=1); "
                            f"use 'interleaved' or 'zb' for virtual={virtual}")
    if kind == "naive":
        return _naive(pp, microbatches)
    if kind == "gpipe":
        return _gpipe(pp, microbatches)
    if kind == "1f1b":
        return _one_f_one_b(pp, microbatches)
    if kind == "interleaved":
        return _interleaved(pp, microbatches, virtual)
    return _zero_bubble(pp, microbatches, virtual)


# Reference costs used to place messages: the ratio that the schedule kinds are designed for.
_REF_COSTS = {"naive": (1, 2, 0), "gpipe": (1, 2, 0), "1f1b": (1, 2, 0),
              "interleaved": (1, 2, 0), "zb": (1, 1, 1)}


def build_schedule(kind: str, pp: int, microbatches: int, virtual: int = 1) -> list[list[Action]]:
    """Action lists (one per pp rank) for one training step.

    kind:
      - ``"naive"``: one micro-batch at a time through the whole pipe (no overlap; baseline).
      - ``"gpipe"``: all forwards, then all backwards; holds all micro-batches' activations.
      - ``"1f1b"``: ``pp - rank - 1`` warm-up forwards, then one forward / one backward, then the
        remaining backwards; at most ``pp - rank`` micro-batches in flight on a rank.
      - ``"interleaved"``: Megatron interleaved 1F1B with ``virtual`` chunks per rank (stage
        ``chunk * pp + rank``); requires ``microbatches % pp == 0``.
      - ``"zb"``: zero-bubble (ZB-H1 style): backward split into ``B`` (input gradient) and
        ``W`` (weight gradient), W deferred into the slots where 1F1B waits. With
        ``virtual > 1`` the chunks follow the interleaved order (and M must be a multiple of pp).

    Messages are placed by ``lower_communication`` (see the module docstring for why the result
    never deadlocks).
    """
    compute = compute_order(kind, pp, microbatches, virtual)
    return lower_communication(compute, pp, costs=_REF_COSTS[kind])


# ---------------------------------------------------------------------------------------------
# Message placement
# ---------------------------------------------------------------------------------------------
def _deps(a: Action, n_stages: int) -> list[tuple[str, int, int]]:
    """Compute actions that must finish before ``a`` may start (as (kind, stage, mb))."""
    s, m = a.stage, a.mb
    if isinstance(a, F):
        return [("F", s - 1, m)] if s > 0 else []
    if isinstance(a, B):
        return [("F", s, m)] + ([("B", s + 1, m)] if s < n_stages - 1 else [])
    if isinstance(a, W):
        return [("B", s, m)]
    raise TypeError(f"not a compute action: {a!r}")


def _reference_times(compute: Sequence[Sequence[Action]], n_stages: int, costs) -> list[list[tuple[float, float]]]:
    """Start/end of every compute action when each rank runs its list in order and waits only
    for data dependencies (communication is free)."""
    cf, cb, cw = costs
    has_w = any(isinstance(a, W) for acts in compute for a in acts)
    cost = {"F": cf, "B": cb if has_w else cb + cw, "W": cw}
    pp = len(compute)
    end: dict[tuple[str, int, int], float] = {}
    times: list[list[tuple[float, float]]] = [[] for _ in range(pp)]
    pos, clock = [0] * pp, [0.0] * pp
    left = sum(len(x) for x in compute)
    while left:
        moved = False
        for r in range(pp):
            while pos[r] < len(compute[r]):
                a = compute[r][pos[r]]
                deps = _deps(a, n_stages)
                if any(d not in end for d in deps):
                    break
                start = max([clock[r]] + [end[d] for d in deps])
                clock[r] = start + cost[a.kind]
                end[(a.kind, a.stage, a.mb)] = clock[r]
                times[r].append((start, clock[r]))
                pos[r] += 1
                left -= 1
                moved = True
        if not moved:
            stuck = {r: str(compute[r][pos[r]]) for r in range(pp) if pos[r] < len(compute[r])}
            raise ScheduleError(f"compute order cannot run: ranks wait on each other at {stuck}")
    return times


def lower_communication(compute: Sequence[Sequence[Action]], pp: int, costs=(1.0, 2.0, 0.0)) -> list[list[Action]]:
    """Insert SEND/RECV actions into per-rank compute lists.

    ``costs`` = (F, B, W) of the reference run used to time-stamp messages; any positive costs
    give a deadlock-free result, and the intended ratio gives the tightest timeline.
    """
    if any(c <= 0 for c in costs[:2]) or costs[2] < 0:
        raise ScheduleError(f"reference costs must be positive, got {costs}")
    if len(compute) != pp:
        raise ScheduleError(f"expected {pp} rank lists, got {len(compute)}")
    n_stages = 1 + max(a.stage for acts in compute for a in acts)
    if n_stages % pp:
        raise ScheduleError(f"{n_stages} stages do not split evenly over pp={pp}")
    if costs[2] == 0 and any(isinstance(a, W) for acts in compute for a in acts):
        costs = (costs[0], costs[1], costs[1] / 2)
    times = _reference_times(compute, n_stages, costs)
    where = {}  # (kind, stage, mb) -> (rank, index in that rank's compute list)
    for r, acts in enumerate(compute):
        for i, a in enumerate(acts):
            where[(a.kind, a.stage, a.mb)] = (r, i)

    # slots[r][i] = messages posted right before compute i of rank r (i == len: after the last).
    slots: list[list[list[tuple]]] = [[[] for _ in range(len(acts) + 1)] for acts in compute]
    for r, acts in enumerate(compute):
        for i, a in enumerate(acts):
            if isinstance(a, F) and a.stage < n_stages - 1:
                msg, dst_stage = (SEND_F(a.stage, a.mb), RECV_F(a.stage + 1, a.mb)), a.stage + 1
            elif isinstance(a, B) and a.stage > 0:
                msg, dst_stage = (SEND_B(a.stage, a.mb), RECV_B(a.stage - 1, a.mb)), a.stage - 1
            else:
                continue
            dst = stage_rank(dst_stage, pp)
            if dst == r:
                continue  # pp == 1: the tensor stays in memory
            t_prod = times[r][i][1]
            key = (t_prod, r, i)  # global order: production time, ties broken by producer
            slots[r][i + 1].append((key, msg[0]))
            # Receiver: after every compute that started before the message was produced.
            j = sum(1 for (st, _) in times[dst] if st < t_prod)
            consumer = where[(("F" if isinstance(msg[1], RECV_F) else "B"), dst_stage, a.mb)][1]
            if j > consumer:
                raise ScheduleError(f"{msg[1]} would be placed after its consumer")
            slots[dst][j].append((key, msg[1]))
    out = []
    for r, acts in enumerate(compute):
        lst: list[Action] = []
        for i in range(len(acts) + 1):
            lst += [a for _, a in sorted(slots[r][i], key=lambda x: x[0])]
            if i < len(acts):
                lst.append(acts[i])
        out.append(lst)
    return out


def format_schedule(schedule: Sequence[Sequence[Action]]) -> str:
    """One line per rank; communication batches in brackets. For logs and error messages."""
    lines = []
    for r, acts in enumerate(schedule):
        parts, batch = [], []
        for a in acts:
            if a.is_compute:
                if batch:
                    parts.append("[" + " ".join(batch) + "]")
                    batch = []
                parts.append(str(a))
            else:
                batch.append(str(a))
        if batch:
            parts.append("[" + " ".join(batch) + "]")
        lines.append(f"rank {r}: " + " ".join(parts))
    return "\n".join(lines)
