"""Pipeline schedules, simulator, partitioner and timeline plot (ladder 0: no process group)."""
import itertools
import random

import pytest

from gigatrain.parallel.pipeline.partition import (
    Partition, balance_params, balance_time, explicit, measure_block_times, partition_model, uniform,
)
from gigatrain.parallel.pipeline.schedules import (
    B, F, RECV_B, RECV_F, SEND_B, SEND_F, W, KINDS, ScheduleError, build_schedule, compute_order,
    format_schedule,
)
from gigatrain.parallel.pipeline.simulate import Costs, DeadlockError, simulate, validate_schedule
from gigatrain.parallel.pipeline.timeline import measured_bubble, plot_timeline

pytestmark = pytest.mark.rung0


def _valid_cases():
    for kind in KINDS:
        for K in (1, 2, 4):
            for M in range(1, 9):
                for V in (1, 2):
                    if kind in ("naive", "gpipe", "1f1b") and V > 1:
                        continue
                    if V > 1 and M % K:
                        continue
                    if kind == "interleaved" and M % K:
                        continue
                    yield kind, K, M, V


# ---- expected tables ----------------------------------------------------------------------
def _short(lst):
    return " ".join(str(a) for a in lst)


def test_expected_compute_orders():
    assert [_short(x) for x in compute_order("1f1b", 2, 3)] == [
        "0F0 0F1 0B0 0F2 0B1 0B2",
        "1F0 1B0 1F1 1B1 1F2 1B2",
    ]
    assert [_short(x) for x in compute_order("gpipe", 2, 2)] == ["0F0 0F1 0B0 0B1", "1F0 1F1 1B0 1B1"]
    assert [_short(x) for x in compute_order("naive", 2, 2)] == ["0F0 0B0 0F1 0B1", "1F0 1B0 1F1 1B1"]
    # ZB-H1: step x runs F(x), B(x - (pp-1-r)), W(x - (pp-1)).
    assert [_short(x) for x in compute_order("zb", 2, 3)] == [
        "0F0 0F1 0B0 0W0 0F2 0B1 0W1 0B2 0W2",
        "1F0 1B0 1F1 1B1 1W0 1F2 1B2 1W1 1W2",
    ]
    # Interleaved: micro-batches in groups of pp through chunk 0 then chunk 1 (stage = chunk*pp + rank).
    inter = compute_order("interleaved", 2, 4, 2)
    assert [str(a) for a in inter[0] if isinstance(a, F)] == ["0F0", "0F1", "2F0", "2F1", "0F2", "0F3", "2F2", "2F3"]
    assert [str(a) for a in inter[1] if isinstance(a, B)] == ["3B0", "3B1", "1B0", "1B1", "3B2", "3B3", "1B2", "1B3"]


def test_expected_messages_1f1b_pp2():
    """Megatron's pairing falls out of the placement: send of F1 batched with receive of B0."""
    assert format_schedule(build_schedule("1f1b", 2, 3)).splitlines() == [
        "rank 0: 0F0 [0SEND_F0] 0F1 [0SEND_F1 0RECV_B0] 0B0 0F2 [0SEND_F2 0RECV_B1] 0B1 [0RECV_B2] 0B2",
        "rank 1: [1RECV_F0] 1F0 [1RECV_F1] 1B0 [1SEND_B0] 1F1 1B1 [1RECV_F2 1SEND_B1] 1F2 1B2 [1SEND_B2]",
    ]
    s = SEND_F(3, 1)
    assert s.peer == 4 and RECV_F(4, 1).message == s.message
    assert SEND_B(4, 1).peer == 3 and RECV_B(3, 1).message == SEND_B(4, 1).message


# ---- bubbles and memory -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("K", [2, 4])
def test_gpipe_1f1b_bubble_formula(kind, K):
    for M in range(1, 9):
        r = simulate(build_schedule(kind, K, M), Costs(f=1, b=2, w=0, comm=0))
        assert r.bubble_fraction == pytest.approx((K - 1) / (M + K - 1), abs=1e-12), (kind, K, M)
        assert r.makespan == pytest.approx(3 * (M + K - 1))


def test_naive_has_no_overlap():
    for K, M in [(2, 3), (4, 5)]:
        r = simulate(build_schedule("naive", K, M), Costs(1, 2))
        assert r.bubble_fraction == pytest.approx((K - 1) / K)
        assert r.makespan == pytest.approx(3 * K * M)


@pytest.mark.parametrize("K,V", [(2, 2), (4, 2), (2, 3), (4, 4)])
def test_interleaved_bubble_formula(K, V):
    for M in range(K, 17, K):
        r = simulate(build_schedule("interleaved", K, M, V), Costs(f=1 / V, b=2 / V))
        assert r.bubble_fraction == pytest.approx((K - 1) / (V * M + K - 1), abs=1e-9), (K, M, V)


def test_in_flight_1f1b_bounded_gpipe_holds_all():
    for K in (2, 4):
        for M in range(1, 9):
            one = simulate(build_schedule("1f1b", K, M)).peak_in_flight
            gp = simulate(build_schedule("gpipe", K, M)).peak_in_flight
            assert max(one.values()) <= K
            assert one[0] == min(K, M)
            assert [one[s] for s in range(K)] == [min(K - s, M) for s in range(K)]
            assert all(v == M for v in gp.values())
            zb = simulate(build_schedule("zb", K, M), Costs(1, 1, 1)).peak_in_flight
            assert max(zb.values()) <= K  # ZB-H1 keeps 1F1B's peak (held until W)


def test_zero_bubble_beats_1f1b():
    c = Costs(f=1, b=1, w=1)  # 1F1B runs B+W as one backward of cost 2
    for K in (2, 4):
        for M in range(1, 9):
            zb = simulate(build_schedule("zb", K, M), c).bubble_fraction
            one = simulate(build_schedule("1f1b", K, M), c).bubble_fraction
            assert zb < one, (K, M, zb, one)
            if M >= K:  # ZB-H1: (K-1)(F+B-W) idle per rank instead of (K-1)(F+B+W)
                assert zb == pytest.approx((K - 1) / (3 * M + K - 1))
        for M in range(K, 9, K):
            zb2 = simulate(build_schedule("zb", K, M, 2), c).bubble_fraction
            il2 = simulate(build_schedule("interleaved", K, M, 2), c).bubble_fraction
            assert zb2 < il2


# ---- validity of every schedule -------------------------------------------------------------
COSTS = [
    Costs(1, 2, 0),
    Costs(1, 1, 1, comm=0.3),
    Costs(f=[1, 2, 3, 1, 2, 1, 1, 3], b=[2, 1, 1, 3, 1, 2, 2, 1], w=[0.5, 1, 2, 1, 1, 0.5, 1, 1], comm=0.1),
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_schedule_is_complete_ordered_and_deadlock_free(kind):
    n = 0
    for k, K, M, V in _valid_cases():
        if k != kind:
            continue
        sched = build_schedule(kind, K, M, V)
        n_stages = K * V
        # Independent count: every (stage, mb) has one F, one B (and one W for zb), on its rank.
        seen = {}
        for r, lst in enumerate(sched):
            for a in lst:
                assert a.stage % K == r
                seen[(a.kind, a.stage, a.mb)] = seen.get((a.kind, a.stage, a.mb), 0) + 1
        kinds = ("F", "B", "W") if kind == "zb" else ("F", "B")
        for s, m, t in itertools.product(range(n_stages), range(M), kinds):
            assert seen.get((t, s, m)) == 1, (kind, K, M, V, t, s, m)
        assert not any(k_ == "W" for (k_, _, _) in seen) or kind == "zb"
        assert validate_schedule(sched)[:2] == (n_stages, M)
        for c in COSTS:
            res = simulate(sched, c)
            end = {(x.action.kind, x.action.stage, x.action.mb): x for x in res.records if x.action.is_compute}
            for (t, s, m), rec in end.items():  # dependencies respected in the simulated timeline
                deps = {"F": [("F", s - 1, m)] if s else [],
                        "B": [("F", s, m)] + ([("B", s + 1, m)] if s < n_stages - 1 else []),
                        "W": [("B", s, m)]}[t]
                for d in deps:
                    assert end[d].end <= rec.start + 1e-9, (kind, K, M, V, t, s, m, d)
        n += 1
    assert n > 0


def test_invalid_requests_explain_themselves():
    with pytest.raises(ScheduleError, match="multiple of pp"):
        build_schedule("interleaved", 4, 6, 2)
    with pytest.raises(ScheduleError, match="unknown schedule kind"):
        build_schedule("2f2b", 2, 4)
    with pytest.raises(ScheduleError, match="virtual"):
        build_schedule("1f1b", 2, 4, 2)
    with pytest.raises(ScheduleError):
        build_schedule("gpipe", 0, 4)


# ---- the simulator catches broken schedules ------------------------------------------------
def test_simulator_detects_deadlock():
    sched = build_schedule("gpipe", 2, 2)
    # Rank 0 posts its gradient receive first: the batch blocks rank 0's queue, so its
    # activation send never leaves and rank 1 never produces the gradient.
    r0 = [RECV_B(0, 0)] + [a for a in sched[0] if not isinstance(a, RECV_B)]
    r0.insert(r0.index(B(0, 1)), RECV_B(0, 1))
    sched = [r0, sched[1]]
    with pytest.raises(DeadlockError) as e:
        simulate(sched)
    msg = str(e.value)
    assert "RECV_B(stage=0, mb=0)" in msg and "SEND_F(stage=0, mb=0)" in msg and "rank 1" in msg


def test_simulator_rejects_malformed_schedules():
    good = build_schedule("1f1b", 2, 2)
    # Messages between two ranks in different orders.
    swapped = [list(good[0]), list(good[1])]
    i, j = swapped[1].index(RECV_F(1, 0)), swapped[1].index(RECV_F(1, 1))
    swapped[1][i], swapped[1][j] = swapped[1][j], swapped[1][i]
    with pytest.raises(ScheduleError, match="order"):
        simulate(swapped)
    # A backward before its own forward.
    early = [list(good[0]), list(good[1])]
    early[0].remove(B(0, 0))
    early[0].insert(0, B(0, 0))
    with pytest.raises(ScheduleError, match="runs before"):
        simulate(early)
    # Missing work, and an action on the wrong rank.
    with pytest.raises(ScheduleError, match="appears 0 times"):
        simulate([[a for a in good[0] if a != F(0, 1)], good[1]])
    with pytest.raises(ScheduleError, match="lives on rank"):
        simulate([good[0] + [W(1, 0)], good[1]])


# ---- partitioner ----------------------------------------------------------------------------
def _compositions(n, k):
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0,) + cuts + (n,)
        yield b


def _loads(costs, b, stem, head):
    loads = [sum(costs[b[i]:b[i + 1]]) for i in range(len(b) - 1)]
    loads[0] += stem
    loads[-1] += head
    return loads


def test_balancers_match_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [rng.choice([1, 2, 3, 5, 8]) * rng.random() + 0.1 for _ in range(n)]
        stem, head = rng.random() * 4, rng.random() * 4
        allb = list(_compositions(n, k))
        best_max = min(max(_loads(costs, b, stem, head)) for b in allb)
        got = balance_time(costs, k, stem=stem, head=head)
        assert max(_loads(costs, got.bounds, stem, head)) == pytest.approx(best_max)
        among = [b for b in allb if max(_loads(costs, b, stem, head)) <= best_max * (1 + 1e-9)]
        best_sq = min(sum(x * x for x in _loads(costs, b, stem, head)) for b in among)
        assert sum(x * x for x in _loads(costs, got.bounds, stem, head)) == pytest.approx(best_sq)
        got_p = balance_params(costs, k, stem=stem, head=head)
        best_var = min(sum(x * x for x in _loads(costs, b, stem, head)) for b in allb)
        assert sum(x * x for x in _loads(costs, got_p.bounds, stem, head)) == pytest.approx(best_var)


def test_partition_cases():
    assert uniform(8, 4).sizes == (2, 2, 2, 2)
    assert uniform(10, 4).sizes == (2, 3, 3, 2)  # extras to the middle
    assert uniform(5, 5).blocks(3) == range(3, 4)
    # A big embedding on stage 0 pushes blocks to later stages.
    assert balance_params([1] * 8, 2, stem=4).sizes == (2, 6)
    assert balance_time([4, 1, 1, 1, 1, 4], 3).sizes == (1, 4, 1)
    assert balance_time([1, 1, 1, 1, 1], 2, head=3).sizes == (4, 1)
    assert explicit([3, 1, 4], 8, 3) == Partition((0, 3, 4, 8))
    for bad in ([3, 5], [0, 4, 4], [3, 3, 3]):
        with pytest.raises(ValueError):
            explicit(bad, 8, 3)
    with pytest.raises(ValueError, match="at least one block"):
        uniform(3, 4)
    with pytest.raises(ValueError):
        Partition((0, 2, 2, 4))


def test_measure_and_explain_partition():
    import torch

    from gigatrain.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=32, seq_len=8, n_layer=4, n_head=2, d_model=16, vocab_multiple=32)
    batch = model.example_batch(2, generator=torch.Generator().manual_seed(0))
    times = measure_block_times(model, batch, repeats=1)
    assert len(times.blocks) == 4 and all(t > 0 for t in times.blocks) and times.stem > 0 and times.head > 0
    assert all(p.grad is None for p in model.parameters())
    part, text = partition_model(model, 2, "time", block_times=times, pp=2)
    assert part.n_stages == 2 and part.n_blocks == 4
    assert "time-balanced" in text and "imbalance" in text and "+stem" in text and "+head" in text
    part, text = partition_model(model, 4, "params")
    assert part.sizes == (1, 1, 1, 1) and "params" in text
    part, _ = partition_model(model, 2, [1, 3])
    assert part.sizes == (1, 3)


# ---- timeline ---------------------------------------------------------------------------------
def test_timeline_plot_and_measured_bubble(tmp_path):
    r = simulate(build_schedule("interleaved", 4, 8, 2), Costs(0.5, 1.0))
    assert measured_bubble(r.records, 4) == pytest.approx(r.bubble_fraction)
    path = tmp_path / "interleaved.png"
    plot_timeline(r.records, path, "interleaved 1F1B, pp=4, M=8, V=2 (simulated)")
    assert path.stat().st_size > 10_000
    zb = simulate(build_schedule("zb", 4, 8), Costs(1, 1, 1))
    plot_timeline(zb.records, tmp_path / "zb.png", "ZB-H1, pp=4, M=8 (simulated)")
    assert (tmp_path / "zb.png").stat().st_size > 10_000


def test_posting_overheads_delay_the_poster_only():
    """LogP's o: naive pp2, one micro-batch, F=1 B=2. Rank 0 posts SEND_F+RECV_B as one batch
    after F, rank 1 posts RECV_F at 0 and SEND_B after B, so a send overhead o lies twice on
    the critical path (6 + 2o) and a receive overhead once (rank 0's batch: 6 + o); compute is
    unchanged and the posting time counts as idle."""
    sched = build_schedule("naive", 2, 1)
    base = simulate(sched, Costs(1, 2))
    assert base.makespan == 6.0
    o = 0.25
    send = simulate(sched, Costs(1, 2, send_overhead=o))
    recv = simulate(sched, Costs(1, 2, recv_overhead=o))
    assert send.makespan == pytest.approx(6 + 2 * o) and recv.makespan == pytest.approx(6 + o)
    assert send.busy == base.busy == [3.0, 3.0]
    assert send.bubble_fraction == pytest.approx(1 - 6 / (2 * (6 + 2 * o)))
    # The latency still adds on top, once per message on the path.
    both = simulate(sched, Costs(1, 2, comm=0.1, send_overhead=o))
    assert both.makespan == pytest.approx(6 + 2 * o + 2 * 0.1)


def test_replayed_action_durations_override_the_per_stage_costs():
    sched = build_schedule("1f1b", 2, 4)
    base = simulate(sched, Costs(1, 2, comm=0.1))
    same = {(a.kind, a.stage, a.mb): (1.0 if a.kind == "F" else 2.0) for lst in sched for a in lst if a.is_compute}
    assert simulate(sched, Costs(comm=0.1, actions=same)).makespan == pytest.approx(base.makespan)
    # One slow backward on the last stage delays everything after it by its excess.
    slow = dict(same)
    slow[("B", 1, 3)] = 3.0
    assert simulate(sched, Costs(comm=0.1, actions=slow)).makespan == pytest.approx(base.makespan + 1.0)
