"""Pipeline schedules, seen by the planner: how long a step takes and how many micro-batches each
rank holds, for the real schedules of ``gigatrain.parallel.pipeline``.

The compute orders come from ``schedules.compute_order`` (the lists the runtime executes, before
messages are inserted) and the in-flight counts per stage from ``simulate.peak_in_flight``.
``simulate.simulate`` itself replays the full lists with their messages; on a 64-stage pipeline
that takes seconds, too slow for a search over thousands of layouts, so ``makespan_units``
replays the compute orders alone under the same dependency rules (a forward waits for the
previous stage's forward, a backward for the next stage's backward, each hand-off between ranks
arriving ``comm`` after its producer ends). The tests hold it against ``simulate.simulate``.

Costs are in units of one chunk's forward for one micro-batch, all stages alike, so results are
cached by (schedule, pp, M, V, backward/forward ratios, hand-off/forward ratio). Beyond
``2 pp`` micro-batches a schedule is in its steady state, where each further micro-batch adds
the same time, so larger M are extrapolated from two replays (exact for these schedules).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..parallel.pipeline.schedules import B, F, compute_order
from ..parallel.pipeline.simulate import peak_in_flight

__all__ = ["LiveProfile", "live_profile", "makespan_units", "makespan_lower_bound", "free_makespan_units", "quantize_ratio", "SEARCHED_KINDS"]

SEARCHED_KINDS = ("1f1b", "gpipe", "interleaved", "zb")


@dataclass(frozen=True)
class LiveProfile:
    """Peak number of (chunk, micro-batch) activations held at once on the first and on the last
    pipeline rank (``rank_peak``), and the peak micro-batches in flight on the first and the last
    stage (``first_stage``, ``last_stage``: the embedding input and the loss's saved tensors)."""

    rank_peak: tuple
    first_stage: int
    last_stage: int


def _cap(pp: int) -> int:
    return 2 * pp


@lru_cache(maxsize=4096)
def _order(kind: str, pp: int, M: int, V: int) -> tuple:
    order = compute_order(kind, pp, M, V)
    code = {F: 0, B: 1}
    return tuple(tuple((code.get(type(a), 2), a.stage, a.mb) for a in lst) for lst in order), order


@lru_cache(maxsize=4096)
def live_profile(kind: str, pp: int, M: int, V: int = 1) -> LiveProfile:
    """Activations in flight for schedule ``kind`` ("none" when there is no pipeline: gradient
    accumulation runs one micro-batch at a time)."""
    if kind == "none" or pp == 1:
        return LiveProfile((1, 1), 1, 1)
    if kind == "gpipe":
        return LiveProfile((M * V, M * V), M, M)
    # 1F1B: rank r holds pp - r; ZB-H1 with one chunk holds what rank 0 of 1F1B does on every
    # rank (its W's wait as long as rank 0's B's). The tests check both against peak_in_flight.
    if kind == "1f1b":
        return LiveProfile((min(pp, M), 1), min(pp, M), 1)
    if kind == "zb" and V == 1:
        k = min(pp, M)
        return LiveProfile((k, k), k, k)
    if kind == "naive":
        return LiveProfile((V, V), 1, 1)
    return walk_profile(kind, pp, M if M <= _cap(pp) else _cap(pp), V)  # beyond 2 pp the peak stays


def walk_profile(kind: str, pp: int, M: int, V: int = 1) -> LiveProfile:
    """``live_profile`` counted on the schedule's compute order: per stage by
    ``simulate.peak_in_flight``, per rank by walking its list (an activation lives from its F to
    its last backward action)."""
    codes, order = _order(kind, pp, M, V)
    per_stage = peak_in_flight(order)
    has_w = any(c == 2 for lst in codes for c, _, _ in lst)
    last = 2 if has_w else 1
    peaks = []
    for r in (0, pp - 1):
        live = peak = 0
        for c, _, _ in codes[r]:
            if c == 0:
                live += 1
                peak = max(peak, live)
            elif c == last:
                live -= 1
        peaks.append(peak)
    return LiveProfile(tuple(peaks), per_stage[0], per_stage[pp * V - 1])


_GRID = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
_COMM_GRID = (1.0, 2.0, 5.0)


def quantize_ratio(x: float, grid=_GRID) -> float:
    """Round a cost ratio to the nearest of 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power
    of ten (at most 12% off; keeps the number of distinct replays, and so the search, small).
    Ratios below 1e-3 are 0: a hand-off that short changes no schedule."""
    if x < 1e-3:
        return 0.0
    from math import floor, log10

    d = 10.0 ** floor(log10(x))
    y = x / d
    best = min(grid + (10.0,), key=lambda g: abs(log10(y / g)))
    return round(best * d, 12)


@lru_cache(maxsize=65536)
def _replay(kind: str, pp: int, M: int, V: int, fb: float, fw: float, comm: float) -> float:
    codes, _ = _order(kind, pp, M, V)
    n_stages = pp * V
    neg = -1.0
    end_f = [[neg] * M for _ in range(n_stages)]
    end_b = [[neg] * M for _ in range(n_stages)]
    clock = [0.0] * pp
    pos = [0] * pp
    remaining = sum(len(x) for x in codes)
    last = n_stages - 1
    while remaining:
        moved = False
        for r in range(pp):
            lst, i, c = codes[r], pos[r], clock[r]
            n = len(lst)
            while i < n:
                k, s, m = lst[i]
                if k == 0:
                    if s:
                        d = end_f[s - 1][m]
                        if d < 0:
                            break
                        d += comm
                        c = d if d > c else c
                    c += 1.0
                    end_f[s][m] = c
                elif k == 1:
                    d = end_f[s][m]
                    if s < last:
                        d2 = end_b[s + 1][m]
                        if d2 < 0:
                            break
                        d2 += comm
                        d = d2 if d2 > d else d
                    c = (d if d > c else c) + fb
                    end_b[s][m] = c
                else:
                    d = end_b[s][m]
                    c = (d if d > c else c) + fw
                i += 1
            if i != pos[r]:
                moved = True
                remaining -= i - pos[r]
                pos[r], clock[r] = i, c
        if not moved:  # pragma: no cover - compute_order's schedules always run
            raise RuntimeError(f"{kind} pp={pp} M={M} V={V}: compute orders wait on each other")
    return max(clock)


def _quantize_share(share: float) -> float:
    return 1.0 if share >= 1.0 else round(max(share, 0.01), 2)


@lru_cache(maxsize=16384)
def _replay_shared(kind: str, pp: int, M: int, V: int, fb: float, fw: float, comm: float, share: float) -> float:
    """``_replay`` on ranks that share cores: each rank's costs are its time when every rank
    computes (a ``share`` of a core each); while only ``n`` of the ``pp`` ranks compute, each
    runs ``min(1 / share, pp / n)`` times as fast (the cores are divided among the ranks that
    have work; the other parallel dimensions are in the same phase, so they scale alike)."""
    codes, _ = _order(kind, pp, M, V)
    n_stages, last = pp * V, pp * V - 1
    end_f = [[None] * M for _ in range(n_stages)]
    end_b = [[None] * M for _ in range(n_stages)]
    cost = (1.0, fb, fw)
    pos = [0] * pp
    left = [None] * pp  # remaining work of the running action (None: idle)
    now = 0.0
    eps = 1e-12

    def ready_at(r):
        """When rank r's next action may start (None: a dependency has not ended)."""
        k, s, m = codes[r][pos[r]]
        if k == 0:
            if s == 0:
                return now
            d = end_f[s - 1][m]
            return None if d is None else d + comm
        if k == 1:
            d = end_f[s][m]
            if s < last:
                d2 = end_b[s + 1][m]
                if d2 is None:
                    return None
                d = max(d, d2 + comm)
            return d
        return end_b[s][m]

    while True:
        nxt = []
        for r in range(pp):
            if left[r] is None and pos[r] < len(codes[r]):
                t = ready_at(r)
                if t is not None and t <= now + eps:
                    left[r] = cost[codes[r][pos[r]][0]]
                elif t is not None:
                    nxt.append(t)
        active = [r for r in range(pp) if left[r] is not None]
        if not active:
            if nxt:
                now = min(nxt)
                continue
            if any(pos[r] < len(codes[r]) for r in range(pp)):  # pragma: no cover
                raise RuntimeError(f"{kind} pp={pp} M={M} V={V}: compute orders wait on each other")
            return now
        speed = min(1.0 / share, pp / len(active))
        dt = min(left[r] for r in active) / speed
        if nxt:
            dt = min(dt, min(nxt) - now)
        now += dt
        for r in active:
            left[r] -= dt * speed
            if left[r] <= eps:
                k, s, m = codes[r][pos[r]]
                if k == 0:
                    end_f[s][m] = now
                elif k == 1:
                    end_b[s][m] = now
                left[r] = None
                pos[r] += 1


def _quantized(kind: str, b: float, w: float, comm: float) -> tuple[float, float, float]:
    has_w = kind == "zb"
    # Hand-off ratios are coarser (1, 2, 5 per decade): they move the makespan far less than
    # the compute ratios do.
    return (quantize_ratio(b if has_w else b + w), quantize_ratio(w) if has_w else 0.0,
            quantize_ratio(comm, _COMM_GRID) if comm >= 0.01 else 0.0)


def _rescale(kind: str, b: float, w: float, fb: float, fw: float) -> float:
    """Factor from the rounded ratios back to the true ones: the makespan of a schedule with
    uniform stages scales with the per-micro-batch work ``1 + b + w`` (exactly so without W
    actions), so two layouts whose ratios round alike still differ by their true work."""
    true = 1.0 + b + w
    return true / (1.0 + fb + fw) if true > 0 else 1.0


def makespan_lower_bound(kind: str, pp: int, M: int, V: int = 1, b: float = 2.0, w: float = 0.0,
                         comm: float = 0.0, share: float = 1.0) -> float:
    """A lower bound of ``makespan_units`` (same arguments) without replaying: every schedule
    keeps its last rank idle while the first micro-batch crosses the ``pp - 1`` stages before
    it; schedules without W actions also pay the fill and drain ``(pp - 1)(1 + b)`` of Megatron's
    formula, which is their exact makespan when hand-offs are free."""
    fb, fw, comm = _quantized(kind, b, w, comm)
    busy = M * V * (1.0 + fb + fw)
    if pp == 1:
        return busy * _rescale(kind, b, w, fb, fw)
    bound = busy + (pp - 1) * (1.0 + comm)
    if kind in ("1f1b", "gpipe", "interleaved"):
        bound = max(bound, (M * V + pp - 1) * (1.0 + fb))
    share = _quantize_share(share)
    if share < 1.0:
        # No rank runs faster than a whole core, and the cores do all the ranks' work.
        bound = max(busy, share * bound)
    return bound * _rescale(kind, b, w, fb, fw)


def free_makespan_units(kind: str, pp: int, M: int, V: int = 1, b: float = 2.0, w: float = 0.0,
                        share: float = 1.0) -> float:
    """``makespan_units`` with free hand-offs. For schedules without W actions on ranks of their
    own this is Megatron's ``(M V + pp - 1)(1 + b + w)`` exactly (the tests hold it against the
    replay), so only the zero-bubble schedules are replayed."""
    if kind in ("1f1b", "gpipe", "interleaved") and (pp == 1 or _quantize_share(share) >= 1.0):
        return (M * V if pp == 1 else M * V + pp - 1) * (1.0 + b + w)
    return makespan_units(kind, pp, M, V, b, w, 0.0, share)


def makespan_units(kind: str, pp: int, M: int, V: int = 1, b: float = 2.0, w: float = 0.0,
                   comm: float = 0.0, share: float = 1.0) -> float:
    """Step time of ``kind`` in units of one chunk-forward, with backward ``b`` and weight
    gradient ``w`` (schedules without W actions run ``b + w`` as their backward) and a hand-off
    latency ``comm`` between ranks. The replay runs on ratios rounded by ``quantize_ratio`` (for
    the cache) and its result is scaled back to the true work per micro-batch. ``share`` < 1:
    the ranks share cores, each getting ``share`` of one while all compute
    (``_replay_shared``)."""
    fb, fw, comm = _quantized(kind, b, w, comm)
    if pp == 1:
        return M * V * (1.0 + b + w)
    share = _quantize_share(share)
    if share < 1.0:
        def replay(m):
            return _replay_shared(kind, pp, m, V, fb, fw, comm, share)
    else:
        def replay(m):
            return _replay(kind, pp, m, V, fb, fw, comm)
    cap = _cap(pp)
    if M <= cap + pp:
        units = replay(M)
    else:
        m1 = replay(cap)
        m2 = replay(cap + pp)
        units = m2 + (M - cap - pp) * (m2 - m1) / pp
    return units * _rescale(kind, b, w, fb, fw)
