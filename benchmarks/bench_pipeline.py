"""Pipeline schedules on CPU gloo ranks: measured bubble vs the simulator, and step throughput of
our runtime vs torch.distributed.pipelining on the same model and split.

For every schedule we run a few timed steps of a small GPT, keep per-action timings of the last
one, and
- measure the bubble (idle share of the ranks' compute capacity over the step);
- feed the measured per-stage F / B / W durations (means), a measured message latency and the
  cost of a message to our runtime (LogP's L and o, from probes before each schedule runs: o
  from our runtime running the schedule on stages that compute next to nothing) to the
  simulator ("sim"), and report its predicted bubble and step time next to the measured ones;
  also the simulator with o measured inside the timed steps ("sim(o)"), and a replay of each
  step with every action at its own duration;
- send our messages as a user's run does (``parallel.pp_transport=auto``: through shared memory
  between these CPU ranks; ``--transport backend``: through gloo, as torch's do), and run the
  message probes through the same transport;
- time torch's ScheduleGPipe / Schedule1F1B / ScheduleInterleaved1F1B /
  ScheduleInterleavedZeroBubble on the same stage modules, micro-batches and loss (its step
  followed by what ours does inside the step: summing the tied embedding's gradient over the
  first and last stage, and sharing the loss with every pp rank), and its compute per action
  (forward, backward or its input-gradient part, weight gradient) next to ours.

Usage:
    python benchmarks/bench_pipeline.py --world 2 --out runs/bench_pipeline.json
    python benchmarks/bench_pipeline.py --world 2 --transport backend   # ours through gloo too

One thread per rank; with 2 cores prefer --world 2 for throughput comparisons.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# (label, our kind, V, torch schedule class name)
SCHEDULES = [
    ("naive", "naive", 1, None),
    ("gpipe", "gpipe", 1, "ScheduleGPipe"),
    ("1f1b", "1f1b", 1, "Schedule1F1B"),
    ("interleaved V=2", "interleaved", 2, "ScheduleInterleaved1F1B"),
    ("zb V=1", "zb", 1, None),
    ("zb V=2", "zb", 2, "ScheduleInterleavedZeroBubble"),
]


def _model(cfg):
    from gigatrain.models.gpt import GPT

    torch.manual_seed(0)
    return GPT(vocab_size=cfg["vocab"], seq_len=cfg["seq"], n_layer=cfg["layers"], n_head=cfg["heads"],
               d_model=cfg["d_model"])


def _batch(cfg, model, step):
    g = torch.Generator().manual_seed(step)
    return model.example_batch(cfg["mb"] * cfg["microbatches"], generator=g)


def _send(comm, t, peer):
    return comm.p2p_ops([(t, peer)], [], count=False)[0]


def _recv(comm, t, peer):
    return comm.p2p_ops([], [(t, peer)], count=False)[0]


def _latency(comm, shape, reps=20):
    """One-way time of one activation-sized message (half a ping-pong round trip)."""
    rank, peer = comm.rank, 1 - comm.rank
    if rank > 1:
        return 0.0
    t = torch.zeros(shape)
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        if rank == 0:
            _send(comm, t, peer).wait()
            _recv(comm, t, peer).wait()
        else:
            _recv(comm, t, peer).wait()
            _send(comm, t, peer).wait()
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times[2:])


def _post_overheads(comm, shape, reps=20):
    """Host time to post one non-blocking send and one receive of an activation-sized message
    (LogP's o, the part of a message's cost the poster pays on its own thread): ranks 0 and 1
    post to each other in turn, each timing only its own call, then both wait."""
    rank = comm.rank
    if rank > 1:
        return 0.0, 0.0
    peer = 1 - rank
    t = torch.zeros(shape)
    sends, recvs = [], []
    for i in range(reps + 2):
        sender = i % 2
        t0 = time.perf_counter()
        w = _send(comm, t, peer) if rank == sender else _recv(comm, t, peer)
        dt = time.perf_counter() - t0
        w.wait()
        if i >= 2:
            (sends if rank == sender else recvs).append(dt)
        comm.barrier()
    return statistics.median(sends), statistics.median(recvs)


def _streaming_overhead(comm, shape, rounds=40, trials=3, compute_s=0.004):
    """What a message costs its poster while messages stream both ways and both ranks compute,
    as in a pipeline step: ranks 0 and 1 run ``rounds`` rounds of a matrix product (about
    ``compute_s``), once alone and once with a send to and a receive from the other posted at the
    start of each round and waited for a round later. The extra time per posted message is o.
    Through gloo the idle probe above misses most of it: gloo's transport thread holds a pair's
    lock while it moves earlier messages, and it shares the cores with both ranks' compute."""
    rank = comm.rank
    if rank > 1:
        return 0.0
    peer = 1 - rank
    a, b = torch.randn(shape[0] * shape[1], shape[-1]), torch.randn(shape[-1], 4 * shape[-1])
    t0 = time.perf_counter()
    a @ b
    reps = torch.tensor([max(1, round(compute_s / max(time.perf_counter() - t0, 1e-6)))])
    comm.all_reduce(reps, op=dist.ReduceOp.MAX)  # both ranks the same work
    reps = int(reps.item())

    def compute():
        for _ in range(reps):
            a @ b

    sends, recvs = [torch.randn(shape) for _ in range(2)], [torch.empty(shape) for _ in range(2)]
    out = []
    for _ in range(trials):
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(rounds):
            compute()
        alone = time.perf_counter() - t0
        comm.barrier()
        prev: list = []
        t0 = time.perf_counter()
        for i in range(rounds):
            works = comm.p2p_ops([(sends[i % 2], peer)], [(recvs[i % 2], peer)], count=False)
            compute()
            for w in prev:
                w.wait()
            prev = works
        for w in prev:
            w.wait()
        out.append(max(0.0, (time.perf_counter() - t0 - alone) / (2 * rounds)))
    return statistics.median(out)


class _Scale(torch.nn.Module):
    """x * s: the cheapest block that still has a parameter and an input gradient."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.s


class _Spread(torch.nn.Module):
    """(mb, seq) token ids -> (mb, seq, d) activations, one multiply."""

    def __init__(self, d):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(d))

    def forward(self, ids):
        return ids.unsqueeze(-1).float() * self.w


class _NoCompute(torch.nn.Module):
    """A pipeline model whose stages do (almost) nothing: activations of the real model's shape
    travel through our runtime, so its steps measure what the runtime and the transport cost per
    message, with next to no compute."""

    def __init__(self, cfg):
        super().__init__()
        self.stem = _Spread(cfg["d_model"])
        self.blocks = torch.nn.ModuleList(_Scale() for _ in range(cfg["layers"]))
        self.head = _Scale()

    def loss(self, out, targets):
        return out.mean()


def _runtime_overhead(group, cfg, kind, V, steps=6):
    """Our runtime's host time per posted message (LogP's o as the simulator needs it: posting,
    the transport and the runtime's bookkeeping between actions), measured on ``_NoCompute``
    with the schedule and activation shapes of the real run, before the real run."""
    from gigatrain.parallel.pipeline.partition import uniform
    from gigatrain.parallel.pipeline.runtime import PipelineRuntime, split_microbatches
    from gigatrain.parallel.pipeline.schedules import build_schedule

    pp = dist.get_world_size(group)
    sched = build_schedule(kind, pp, cfg["microbatches"], V)
    rt = PipelineRuntime(_NoCompute(cfg), uniform(cfg["layers"], pp * V), sched, pp_group=group,
                         virtual=V, record=True, transport=cfg["transport"])
    n = cfg["mb"] * cfg["microbatches"]
    ids = torch.randint(0, cfg["vocab"], (n, cfg["seq"]), generator=torch.Generator().manual_seed(0))
    mbs = split_microbatches((ids, ids), cfg["microbatches"])
    out = []
    for i in range(steps + 2):
        dist.barrier(group=group)
        rt.step(mbs)
        parts = [None] * pp
        dist.all_gather_object(parts, rt.records, group=group)
        if i >= 2:
            out.append(_host_overhead([r for part in parts for r in part], sched))
    rt.close()
    return statistics.median(out)


def _stage_costs(records, n_stages):
    """Median measured F / B / W seconds per stage (0 where a kind is absent)."""
    out = {}
    for kind in "FBW":
        per = []
        for s in range(n_stages):
            d = [r.end - r.start for r in records if r.action.kind == kind and r.action.stage == s]
            per.append(statistics.median(d) if d else 0.0)
        out[kind] = per
    return out


def _host_overhead(records, schedule):
    """Host time per posted message inside the step, measured in situ: on each rank the time
    between its compute actions that is neither compute nor waiting for a receive (posting
    messages, the runtime's bookkeeping), over the messages that rank posts."""
    total, msgs = 0.0, 0
    for rk, actions in enumerate(schedule):
        comp = sorted((r for r in records if r.rank == rk and r.action.is_compute), key=lambda r: r.start)
        if not comp:
            continue
        lo, hi = comp[0].start, comp[-1].end
        gaps = sum(max(0.0, b.start - a.end) for a, b in zip(comp, comp[1:]))
        waits = sum(r.end - r.start for r in records
                    if r.rank == rk and not r.action.is_compute and lo <= r.end <= hi)
        total += max(0.0, gaps - waits)
        msgs += sum(not a.is_compute for a in actions)
    return total / msgs if msgs else 0.0


def _replay(schedule, records, latency):
    """The simulator on this very step: every compute action at its own measured duration,
    messages at the probe's latency, posting at the in-situ host overhead per message."""
    from gigatrain.parallel.pipeline.simulate import Costs, simulate

    durs = {(r.action.kind, r.action.stage, r.action.mb): r.end - r.start for r in records if r.action.is_compute}
    o = _host_overhead(records, schedule)
    sim = simulate(schedule, Costs(comm=latency, send_overhead=o, recv_overhead=o, actions=durs))
    return sim.bubble_fraction, sim.makespan, o


def _timed(group, fn):
    """Wall time of ``fn()`` as the slowest rank saw it (ranks start together)."""
    dist.barrier(group=group)
    t0 = time.perf_counter()
    fn()
    span = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(span, op=dist.ReduceOp.MAX, group=group)
    return span.item()


class _Ours:
    def __init__(self, cfg, group, kind, V):
        from gigatrain.parallel.pipeline.partition import uniform
        from gigatrain.parallel.pipeline.runtime import PipelineRuntime
        from gigatrain.parallel.pipeline.schedules import build_schedule

        self.cfg, self.group, self.V = cfg, group, V
        self.pp = dist.get_world_size(group)
        self.model = _model(cfg)
        self.sched = build_schedule(kind, self.pp, cfg["microbatches"], V)
        self.rt = PipelineRuntime(self.model, uniform(cfg["layers"], self.pp * V), self.sched,
                                  pp_group=group, virtual=V, record=True, transport=cfg["transport"])
        self.times, self.bubbles, self.costs, self.recs, self.losses = [], [], [], [], []
        self.own_recs: list = []  # this rank's records of each kept step

    def step(self, step, keep):
        from gigatrain.parallel.pipeline.runtime import split_microbatches

        mbs = split_microbatches(_batch(self.cfg, self.model, step), self.cfg["microbatches"])
        loss = []
        dt = _timed(self.group, lambda: loss.append(self.rt.step(mbs)))
        self.losses.append(loss[0])
        for p in self.rt.parameters():
            p.grad = None
        if keep:
            # Gathered across ranks once, in result(): pickling and sending them between steps
            # left garbage that the next steps paid for (0.7% of a step in an A/B), which torch's
            # steps, with nothing to gather, did not.
            self.times.append(dt)
            self.own_recs.append(self.rt.records)

    def result(self, latency, overheads=(0.0, 0.0)):
        from gigatrain.parallel.pipeline.simulate import Costs, simulate
        from gigatrain.parallel.pipeline.timeline import measured_bubble

        self.rt.close()
        parts = [None] * self.pp
        dist.all_gather_object(parts, self.own_recs, group=self.group)
        for k in range(len(self.own_recs)):
            recs = [r for part in parts for r in part[k]]
            self.bubbles.append(measured_bubble(recs, self.pp))
            self.costs.append(_stage_costs(recs, self.pp * self.V))
            self.recs.append(recs)
        S = self.pp * self.V
        med = {k: [statistics.median(c[k][s] for c in self.costs) for s in range(S)] for k in "FBW"}
        # The simulator gets each action kind's mean duration per stage: a step's length adds
        # durations up, so their expectation is what it needs (the jitter here is one-sided: a
        # page fault or the other rank's burst makes an action longer, never shorter). The
        # medians are printed to compare ours and torch's compute, which a few outliers must
        # not decide.
        durs = {k: [[r.end - r.start for recs in self.recs for r in recs
                     if r.action.kind == k and r.action.stage == s] for s in range(S)] for k in "FBW"}
        mean = {k: [statistics.fmean(d) if d else 0.0 for d in durs[k]] for k in "FBW"}
        sim = simulate(self.sched, Costs(f=mean["F"], b=mean["B"], w=mean["W"], comm=latency,
                                         send_overhead=overheads[0], recv_overhead=overheads[1]))
        sim0 = simulate(self.sched, Costs(f=mean["F"], b=mean["B"], w=mean["W"], comm=0.0))
        replays = [_replay(self.sched, recs, latency) for recs in self.recs]
        o_step = statistics.median(r[2] for r in replays)
        sim_o = simulate(self.sched, Costs(f=mean["F"], b=mean["B"], w=mean["W"], comm=latency,
                                           send_overhead=o_step, recv_overhead=o_step))
        return {
            "predicted_bubble_insitu_o": sim_o.bubble_fraction,
            "replay_bubble": statistics.median(r[0] for r in replays),
            "replay_step_s": statistics.median(r[1] for r in replays),
            "host_overhead_per_message_s": statistics.median(r[2] for r in replays),
            "step_s": statistics.median(self.times), "step_s_min": min(self.times),
            "measured_bubble": statistics.median(self.bubbles),
            "predicted_bubble": sim.bubble_fraction,
            "predicted_bubble_free_comm": sim0.bubble_fraction,
            "predicted_step_s": sim.makespan,
            "stage_costs_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in med.items()},
        }


class _Torch:
    def __init__(self, cfg, group, cls_name, V):
        import torch.distributed.pipelining as tpp

        from gigatrain.parallel.pipeline.partition import uniform
        from gigatrain.parallel.pipeline.runtime import build_stage_modules, tied_parameters

        self.cfg, self.group = cfg, group
        self.pp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.model = _model(cfg)
        chunks = build_stage_modules(self.model, uniform(cfg["layers"], self.pp * V), self.rank, self.pp, V)
        stages = [tpp.PipelineStage(c, c.stage, self.pp * V, torch.device("cpu"), group=group) for c in chunks]
        self.sched = getattr(tpp, cls_name)(stages if V > 1 else stages[0], cfg["microbatches"],
                                            loss_fn=self.model.loss)
        self.times, self.keep, self.losses = [], False, []
        self.tied = tied_parameters(self.model)
        self.actions: dict[tuple[str, int], list[float]] = {}  # (kind, stage) -> durations
        for st in stages:
            self._time_actions(st)

    def _time_actions(self, stage):
        """Time the stage's compute per action, as ours records it: forward, backward (the input
        gradient when the schedule splits it, else all of it) and weight gradient."""
        for name, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"),
                           ("backward_weight_one_chunk", "W")):
            fn = getattr(stage, name, None)
            if fn is None:
                continue

            def timed(*a, _fn=fn, _key=(kind, stage.stage_index), **k):
                t0 = time.perf_counter()
                out = _fn(*a, **k)
                if self.keep:
                    self.actions.setdefault(_key, []).append(time.perf_counter() - t0)
                return out
            setattr(stage, name, timed)

    def step(self, step, keep):
        x, y = _batch(self.cfg, self.model, step)
        kwargs = {"target": y, "losses": []} if self.rank == self.pp - 1 else {}
        args = (x,) if self.rank == 0 else ()
        self.keep = keep

        def run():
            self.sched.step(*args, **kwargs)
            self.losses.append(self._finish(kwargs.get("losses")))
        dt = _timed(self.group, run)
        for p in self.model.parameters():
            p.grad = None
        if keep:
            self.times.append(dt)

    def _finish(self, losses):
        """What torch's step leaves to its user and ours does inside its step, so that both
        steps do the same work: the tied embedding / LM head's gradient summed over the first
        and last stage (each holds a copy; without this the copies drift apart), and the mean
        loss shared with every pp rank."""
        last = self.pp - 1
        if self.rank in (0, last) and last > 0:
            peer = dist.get_global_rank(self.group, last if self.rank == 0 else 0)
            for p in self.tied:
                other = torch.empty_like(p.grad)
                ops = [dist.P2POp(dist.isend, p.grad, peer, group=self.group),
                       dist.P2POp(dist.irecv, other, peer, group=self.group)]
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
                p.grad.add_(other)
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        dist.broadcast(loss, dist.get_global_rank(self.group, last), group=self.group)
        return loss.item()

    def result(self):
        parts = [None] * self.pp
        dist.all_gather_object(parts, self.actions, group=self.group)
        med = {}
        for part in parts:
            for (kind, s), d in part.items():
                med.setdefault(kind, {})[s] = round(statistics.median(d) * 1e3, 3)
        costs = {k: [v.get(s, 0.0) for s in range(max(v) + 1)] for k, v in med.items()}
        return {"step_s": statistics.median(self.times), "step_s_min": min(self.times),
                "stage_costs_ms": costs}


def _worker(rank, world, cfg):
    torch.set_num_threads(1)
    from gigatrain.distributed.comm import Comm

    group = dist.new_group(list(range(world)))
    cfg = dict(cfg)
    # The probes go through the transport our runtime uses (shared memory or gloo).
    probe = Comm(group, "probe")
    if cfg["transport"] == "auto":
        probe.use_local_p2p()
    cfg["latency"] = _latency(probe, (cfg["mb"], cfg["seq"], cfg["d_model"]))
    lat = torch.tensor([cfg["latency"]])
    dist.broadcast(lat, 0, group=group)
    cfg["latency"] = lat.item()
    shape = (cfg["mb"], cfg["seq"], cfg["d_model"])
    o = torch.tensor(_post_overheads(probe, shape) + (_streaming_overhead(probe, shape),))
    probe.close_local_p2p()
    dist.all_reduce(o, group=group)
    o = (o / min(2, world)).tolist()
    cfg["idle_overheads"], cfg["overheads"] = o[:2], (o[2], o[2])
    rows = []
    for label, kind, V, peer in SCHEDULES:
        if cfg["only"] and label not in cfg["only"]:
            continue
        row = {"schedule": label, "kind": kind, "virtual": V}
        o_rt = _runtime_overhead(group, cfg, kind, V)
        runners = [_Ours(cfg, group, kind, V)]
        if peer:
            try:
                runners.append(_Torch(cfg, group, peer, V))
            except Exception as e:  # report, keep benchmarking the rest
                row["torch"] = {"class": peer, "error": f"{type(e).__name__}: {e}"}
        # Alternate the two implementations step by step, so that load drifts hit both alike,
        # and which of them goes first (A B B A ...): the second of a pair runs on memory the
        # first has just released and page-faults less (about 1.5% per step here).
        for step in range(cfg["warmup"] + cfg["steps"]):
            for r in (runners if step % 2 == 0 else runners[::-1]):
                r.step(step, keep=step >= cfg["warmup"])
        row["ours"] = runners[0].result(cfg["latency"], (o_rt, o_rt))
        row["ours"]["runtime_overhead_per_message_s"] = o_rt
        if len(runners) > 1:
            row["torch"] = {"class": peer, **runners[1].result()}
            # The ratio within each pair of neighbouring steps (one each), then the median: a
            # drift of the machine's speed over the run moves both steps of a pair alike.
            pairs = [t / o for o, t in zip(runners[0].times, runners[1].times, strict=True)]
            row["torch"]["paired_ratio"] = statistics.median(pairs)
            # Same batches, same initial weights, gradients cleared after each step: the losses
            # must agree, or the two are not timing the same computation.
            row["torch"]["max_loss_diff"] = max(abs(a - b) for a, b in zip(runners[0].losses, runners[1].losses,
                                                                          strict=True))
        rows.append(row)
    return {"latency_s": cfg["latency"], "send_overhead_s": cfg["overheads"][0],
            "recv_overhead_s": cfg["overheads"][1], "idle_send_overhead_s": cfg["idle_overheads"][0],
            "idle_recv_overhead_s": cfg["idle_overheads"][1], "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="pipeline ranks (gloo CPU processes)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--mb", type=int, default=4, help="micro-batch size (sequences)")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--only", nargs="*", default=None, help="schedule labels to run")
    ap.add_argument("--transport", choices=["auto", "backend"], default="auto",
                    help="our runtime's messages: auto = shared memory between these CPU ranks (the "
                         "default, parallel.pp_transport), backend = gloo like torch's")
    ap.add_argument("--out", default=None, help="write JSON results here")
    args = ap.parse_args(argv)
    cfg = {"layers": args.layers, "d_model": args.d_model, "heads": args.heads, "seq": args.seq,
           "vocab": args.vocab, "mb": args.mb, "microbatches": args.microbatches,
           "warmup": args.warmup, "steps": args.steps, "only": args.only, "transport": args.transport}

    from gigatrain.distributed.spawn import spawn

    t0 = time.time()
    res = spawn(_worker, args.world, cfg, timeout_s=600)[0]
    tokens = args.mb * args.microbatches * args.seq
    model = _model(cfg)
    print(f"GPT {args.layers}x{args.d_model}, seq {args.seq}, {sum(p.numel() for p in model.parameters())/1e6:.2f}M params; "
          f"pp={args.world} gloo CPU ranks, 1 thread each; {args.microbatches} micro-batches of {args.mb}; "
          f"our messages through {'shared memory' if args.transport == 'auto' else 'gloo'}, torch's through gloo; "
          f"message latency {res['latency_s']*1e3:.3f} ms; the transport costs a message's poster "
          f"{res['send_overhead_s']*1e3:.3f} ms while messages stream and both ranks compute (idle probe: a send "
          f"{res['idle_send_overhead_s']*1e3:.3f} ms, a receive {res['idle_recv_overhead_s']*1e3:.3f} ms); 'sim' "
          "takes o from 'o probe' (our runtime running the schedule on stages that compute next to nothing), "
          "'sim(o)' from the timed steps ('o ms'); median (and min) of "
          f"{args.steps} steps, ours and torch's alternating step by step; torch/ours = median ratio of neighbouring steps")
    hdr = (f"{'schedule':<16} {'ours ms':>8} {'(min)':>6} {'tok/s':>8} {'torch ms':>9} {'(min)':>6} {'torch/ours':>10} "
           f"{'bubble meas':>11} {'sim':>6} {'sim(0 lat)':>10} {'sim ms':>7} {'sim(o)':>7} {'replay':>7} {'o ms':>5} "
           f"{'o probe':>7}")
    print(hdr)
    print("-" * len(hdr))
    for row in res["rows"]:
        o = row["ours"]
        t = row.get("torch", {})
        t_ms = (f"{t['step_s']*1e3:9.1f} {t['step_s_min']*1e3:6.1f}" if "step_s" in t
                else f"{'-' if not t else 'error':>9} {'':>6}")
        ratio = f"{t['paired_ratio']:10.3f}" if "step_s" in t else f"{'-':>10}"
        o["tokens_per_s"] = tokens / o["step_s"]
        if "step_s" in t:
            t["tokens_per_s"] = tokens / t["step_s"]
        print(f"{row['schedule']:<16} {o['step_s']*1e3:8.1f} {o['step_s_min']*1e3:6.1f} {o['tokens_per_s']:8.0f} {t_ms} {ratio} "
              f"{o['measured_bubble']:11.1%} {o['predicted_bubble']:6.1%} {o['predicted_bubble_free_comm']:10.1%} "
              f"{o['predicted_step_s']*1e3:7.1f} {o['predicted_bubble_insitu_o']:7.1%} {o['replay_bubble']:7.1%} "
              f"{o['host_overhead_per_message_s']*1e3:5.2f} {o['runtime_overhead_per_message_s']*1e3:7.3f}")
        if "error" in t:
            print(f"    torch {t['class']}: {t['error']}")
    diffs = [row["torch"]["max_loss_diff"] for row in res["rows"] if "max_loss_diff" in row.get("torch", {})]
    if diffs:
        print(f"losses of ours and torch's, step by step: largest difference {max(diffs):.2e}")
    print("\nmedian compute per action and stage, ms (ours | torch's, same stage modules):")
    for row in res["rows"]:
        t = row.get("torch", {}).get("stage_costs_ms", {})
        cells = []
        for kind in "FBW":
            ours = row["ours"]["stage_costs_ms"][kind]
            if not any(ours) and not any(t.get(kind, [])):
                continue
            theirs = t.get(kind)
            cells.append(f"{kind} " + " ".join(f"{x:.1f}" for x in ours)
                         + (" | " + " ".join(f"{x:.1f}" for x in theirs) if theirs else ""))
        print(f"  {row['schedule']:<16} " + "; ".join(cells))
    out = {"config": {**cfg, "world": args.world}, "machine": platform.platform(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0, **res}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
