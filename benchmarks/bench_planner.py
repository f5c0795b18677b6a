"""The planner against reality: published large runs, and memory measured on local gloo ranks.

``--sanity``: for GPT layouts published by Narayanan et al. 2021 ("Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM", Table 1: A100 80GB, seq 2048, vocab 51200,
micro-batch 1, full recomputation, data parallel without ZeRO, attention that materialises the
scores), the planner's predicted TFLOP/s per GPU for the published (t, p) with 1F1B and with the
interleaved schedule, against the published figure; then what the planner picks with that
toolbox fixed (no sequence parallel, ZeRO 0, full recomputation) and with everything searched,
and how long each search took.

``--memory``: predicted vs measured memory per rank for layouts that run on ``--nproc`` gloo
ranks (data parallel with ZeRO 0-3 and offload, pipelines of 2 stages with 1F1B, GPipe,
interleaved and zero bubble, tensor parallel 2 with and without sequence parallel, selective and
full recomputation, and their products; a layout whose degrees do not divide ``--nproc`` is
skipped), fp32 AdamW on a small GPT. Model states are measured with
``measure_model_state_bytes``; activations as the peak of the bytes autograd keeps saved for
backward during one step (saved-tensor hooks, and what recomputation stores again in backward;
parameter storages excluded, each storage once).

``--time``: predicted vs measured step time of a grid of layouts on ``--nproc`` gloo ranks
(``TIME_LAYOUTS``, plus the planner's own pick for the job), predicted with ``--gpu FILE.json``
from ``gigatrain plan --calibrate --ranks N`` (calibrated here first when no file is given).
Each layout runs the real engine (``gigatrain.initialize``); a step is as slow as its slowest
rank; ``--steps`` steps are timed after ``--warmup`` in each of ``--rounds`` passes over the grid
(alternately forward and backward, so a change of the machine's load hits every layout alike).
The figure is the median of those steps (the fastest step is reported beside it). Reports the
Spearman rank correlation, the mean absolute percentage error, and how far the measured time of
the planner's pick is from the fastest measured layout. ``--measured FILE.json`` takes the step
times of an earlier run and measures only the layouts it lacks (a new calibration may pick
another layout), since measuring is what takes minutes.

    python benchmarks/bench_planner.py --sanity --out planner_sanity.json
    python benchmarks/bench_planner.py --memory --nproc 4 --out planner_memory.json
    gigatrain plan --calibrate --ranks 4 --out cpu4.json
    python benchmarks/bench_planner.py --time --nproc 4 --gpu cpu4.json --out planner_time.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

# (name, heads, hidden, layers, t, p, GPUs, global batch, published TFLOP/s per GPU)
TABLE1 = [
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137),
    ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135),
    ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138),
    ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148),
    ("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    ("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163),
    ("1008B", 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def sanity(device_name: str = "a100-80g") -> list[dict]:
    from gigatrain.planner.memory import Job, ModelSpec
    from gigatrain.planner.presets import get_device
    from gigatrain.planner.search import PlanError, search

    dev = get_device(device_name)
    rows = []
    toolbox = {"sp": False, "zero": 0, "recompute": "full"}
    for name, a, h, L, t, p, N, B, pub in TABLE1:
        spec = ModelSpec("gpt", L, h, a, 2048, 51200, stem_extra=2048 * h, flash=False)
        job = Job(spec, B)
        dp = N // (t * p)
        row = {"model": name, "layers": L, "hidden": h, "heads": a, "gpus": N, "batch": B, "t": t, "p": p,
               "published": pub}
        for kind in ("1f1b", "interleaved"):
            if kind == "interleaved" and p == 1:
                continue
            fixed = dict(toolbox, tp=t, pp=p, dp=dp, micro_batch=1, schedule=kind)
            try:
                res = search(job, dev, N, fixed, even_stages=False)
                c = res.candidates[0]
                row[kind] = {"tflops": c.tflops_per_gpu, "virtual": c.layout.virtual, "fits": c.fits,
                             "peak_gib": c.mem.peak / 2**30, "bubble": c.time.bubble_fraction}
            except PlanError as e:
                row[kind] = {"error": str(e)}
        for label, fixed in (("pick_2021_toolbox", dict(toolbox, schedule=("1f1b", "interleaved"))), ("pick_all", {})):
            t0 = time.process_time()
            res = search(job, dev, N, fixed)
            b = res.best
            row[label] = {"layout": b.layout.describe(), "tflops": b.tflops_per_gpu, "search_cpu_s": time.process_time() - t0}
        rows.append(row)
        pub_t = row["1f1b"].get("tflops", float("nan"))
        inter = row.get("interleaved", {}).get("tflops", float("nan"))
        print(f"{name:>7} t={t} p={p:<3} {N:>5} GPUs  published {pub:>4}  predicted 1f1b {pub_t:6.1f} "
              f"({pub_t / pub:4.2f}x)  interleaved {inter:6.1f}  | toolbox pick {row['pick_2021_toolbox']['layout']} "
              f"{row['pick_2021_toolbox']['tflops']:.0f} | full pick {row['pick_all']['layout']} "
              f"{row['pick_all']['tflops']:.0f} ({row['pick_all']['search_cpu_s']:.1f} s)", flush=True)
    return rows


# -- measured memory ------------------------------------------------------------------------
MODEL = dict(n_layer=4, d_model=256, n_head=4, seq_len=128, vocab=256)

LAYOUTS = [  # (label, parallel overrides, micro-batch, micro-batches per step)
    ("dp zero0", {"zero": 0}, 8, 1),
    ("dp zero1", {"zero": 1}, 8, 1),
    ("dp zero2", {"zero": 2}, 8, 1),
    ("dp zero3", {"zero": 3}, 8, 1),
    ("dp zero2 + cpu offload", {"zero": 2, "offload": "cpu"}, 8, 1),
    ("dp zero0, 4 micro-batches", {"zero": 0}, 4, 4),
    ("pp 1f1b", {"pp": 2, "pp_schedule": "1f1b"}, 4, 4),
    ("pp gpipe", {"pp": 2, "pp_schedule": "gpipe"}, 4, 4),
    ("pp interleaved x2", {"pp": 2, "pp_schedule": "interleaved", "pp_virtual": 2}, 4, 4),
    ("pp zb", {"pp": 2, "pp_schedule": "zb"}, 4, 4),
    ("tp2", {"tp": 2}, 8, 1),
    ("tp2 + sequence parallel", {"tp": 2, "sequence_parallel": True}, 8, 1),
    ("tp2 pp2 1f1b", {"tp": 2, "pp": 2}, 4, 4),
    ("tp2+sp zero1", {"tp": 2, "sequence_parallel": True, "zero": 1}, 8, 1),
    ("dp rc-full", {"recompute": "full"}, 8, 1),
    ("dp rc-selective", {"recompute": "selective"}, 8, 1),
    ("pp 1f1b rc-full", {"pp": 2, "recompute": "full"}, 4, 4),
    ("pp zb rc-selective", {"pp": 2, "pp_schedule": "zb", "recompute": "selective"}, 4, 4),
    ("pp zb rc-full", {"pp": 2, "pp_schedule": "zb", "recompute": "full"}, 4, 4),
    ("tp2+sp rc-selective", {"tp": 2, "sequence_parallel": True, "recompute": "selective"}, 8, 1),
    ("tp2+sp rc-full", {"tp": 2, "sequence_parallel": True, "recompute": "full"}, 8, 1),
]


class _Saved:
    """Live bytes of saved tensors; a saved storage counts once, from its first pack until the
    last packed reference to it is gone (autograd frees packed values with the graph)."""

    def __init__(self, exclude):
        self.exclude, self.refs, self.live, self.peak = exclude, {}, 0, 0

    def pack(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.exclude() or st.nbytes() == 0:
            return t
        n = self.refs.get(key, (0, st.nbytes()))[0]
        if n == 0:
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] = (n + 1, st.nbytes())
        # Detached: a saved output (of softmax, LayerNorm, attention) kept with its grad_fn would
        # make a reference cycle through that node, which no collector breaks when the graph is
        # kept past a pass (``retain_graph=True``, the zero-bubble B): its bytes would never go.
        return _Token(self, key, t.detach())

    @staticmethod
    def unpack(x):
        return x.t if isinstance(x, _Token) else x

    def track(self, t):
        """Count ``t`` (a tensor recomputation stores for backward) while its Python object lives:
        the checkpoint keeps it in a dict entry that goes when the node that needs it is done."""
        import weakref

        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.exclude() or st.nbytes() == 0:
            return
        n = self.refs.get(key, (0, st.nbytes()))[0]
        if n == 0:
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] = (n + 1, st.nbytes())
        weakref.finalize(t, _Token.release, self, key)

    @contextlib.contextmanager
    def recomputation(self):
        """Also count what recomputation saves in backward (``torch.utils.checkpoint`` stores it
        through its own saved-tensor hooks, which the outer hooks never see)."""
        from torch.utils import checkpoint as ckpt

        init = ckpt._recomputation_hook.__init__

        def counting_init(hook, *args, **kwargs):
            init(hook, *args, **kwargs)
            pack = hook.pack_hook

            def counted(x):
                # Detached here, so what the checkpoint stores is this very tensor; counted before
                # the call, since storing the last one ends the recomputation with an exception.
                x = x.detach() if x.requires_grad else x
                self.track(x)
                return pack(x)
            hook.pack_hook = counted

        ckpt._recomputation_hook.__init__ = counting_init
        try:
            yield
        finally:
            ckpt._recomputation_hook.__init__ = init


class _Token:
    def __init__(self, owner, key, t):
        self.owner, self.key, self.t = owner, key, t

    def __del__(self):
        _Token.release(self.owner, self.key)

    @staticmethod
    def release(owner, key):
        n, nbytes = owner.refs[key]
        if n == 1:
            del owner.refs[key]
            owner.live -= nbytes
        else:
            owner.refs[key] = (n - 1, nbytes)


def _measure(rank, world, layouts):
    import gc
    from types import SimpleNamespace

    import torch

    import gigatrain
    from gigatrain.models import build_model
    from gigatrain.parallel.zero.memory import measure_model_state_bytes

    torch.set_num_threads(1)
    out = []
    for label, par, mb, M in layouts:
        par = dict(par)
        recompute = par.pop("recompute", "none")
        pp, tp = par.get("pp", 1), par.get("tp", 1)
        if world % (pp * tp):
            out.append(None)
            continue
        dp = world // (pp * tp)
        cfg = {"parallel": dict(par, dp=dp, pp_balance="uniform", bucket_mb=1.0),
               "train": {"global_batch": mb * M * dp, "micro_batch": mb, "optimizer": "adamw",
                         "recompute": recompute},
               "precision": "fp32", "model": {k: v for k, v in MODEL.items() if k != "vocab"}}
        mcfg = SimpleNamespace(name="gpt", dropout=0.0, **{k: v for k, v in MODEL.items() if k != "vocab"})
        torch.manual_seed(0)
        model = build_model(mcfg, vocab_size=MODEL["vocab"])
        engine = gigatrain.initialize(model, cfg)
        g = torch.Generator().manual_seed(rank // (pp * tp))  # tp ranks see the same samples
        batches = [model.example_batch(mb, g) for _ in range(M)]
        engine.train_step(batches, lr=1e-4)  # optimizer states exist from here on

        def params():
            return {p.untyped_storage().data_ptr() for p in engine.model.parameters()}

        saved = _Saved(params)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), saved.recomputation():
            engine.train_step(batches, lr=1e-4)
        st = engine.strategy
        states = measure_model_state_bytes(st, st.optimizer, engine.stages.owned, host=st.host_tensors())
        out.append({"label": label, "rank": rank, "pp_rank": rank // tp % pp, "states_device": states["device"],
                    "states_host": states["host"], "activations": saved.peak})
        engine = model = st = saved = None  # free this layout before the next
        gc.collect()
    return out


def memory(nproc: int) -> list[dict]:
    from gigatrain.distributed.spawn import spawn
    from gigatrain.planner.memory import Job, Layout, ModelSpec, memory_breakdown
    from gigatrain.planner.presets import get_device

    measured = spawn(_measure, nproc, LAYOUTS, timeout_s=300)
    dev = get_device("cpu")
    spec = ModelSpec("gpt", MODEL["n_layer"], MODEL["d_model"], MODEL["n_head"], MODEL["seq_len"], MODEL["vocab"],
                     stem_extra=MODEL["seq_len"] * MODEL["d_model"])
    rows = []
    for i, (label, par, mb, M) in enumerate(LAYOUTS):
        pp, tp = par.get("pp", 1), par.get("tp", 1)
        if measured[0][i] is None:
            continue
        dp = nproc // (pp * tp)
        lay = Layout(dp=dp, pp=pp, tp=tp, sp=par.get("sequence_parallel", False), zero=par.get("zero", 0),
                     offload=par.get("offload", "none"), micro_batch=mb, schedule=par.get("pp_schedule", "1f1b"),
                     virtual=par.get("pp_virtual", 1), recompute=par.get("recompute", "none"))
        job = Job(spec, mb * M * dp, param_bytes=4, bucket_mb=1.0)
        for r in range(nproc):
            m = measured[r][i]
            pr = m["pp_rank"]
            if pr not in (0, pp - 1):
                continue
            pred = memory_breakdown(job, lay, dev, rank=pr)
            meas_total = m["states_device"] + m["activations"]
            pred_total = pred.states + pred.activations
            rows.append({"layout": label, "rank": r, "pred_states": pred.states, "meas_states": m["states_device"],
                         "pred_host": pred.host, "meas_host": m["states_host"], "pred_act": pred.activations,
                         "meas_act": m["activations"], "pred_total": pred_total, "meas_total": meas_total,
                         "error": pred_total / meas_total - 1})
    print(f"{'layout':<26} {'rank':>4} {'states MB pred/meas':>20} {'activations MB pred/meas':>25} "
          f"{'sum MB pred/meas':>18} {'error':>7}")
    for r in rows:
        print(f"{r['layout']:<26} {r['rank']:>4} {r['pred_states'] / 1e6:>9.2f}/{r['meas_states'] / 1e6:<9.2f} "
              f"{r['pred_act'] / 1e6:>12.2f}/{r['meas_act'] / 1e6:<11.2f} {r['pred_total'] / 1e6:>8.2f}/"
              f"{r['meas_total'] / 1e6:<9.2f} {r['error'] * 100:>6.1f}%")
    errs = [abs(r["error"]) for r in rows]
    print(f"mean |error| {sum(errs) / len(errs) * 100:.1f}%, max {max(errs) * 100:.1f}%")
    return rows


# -- measured step time ---------------------------------------------------------------------
TIME_MODEL = dict(n_layer=8, d_model=256, n_head=8, seq_len=128, vocab=256)
TIME_BATCH = 16
TIME_BUCKET_MB = 4.0

TIME_LAYOUTS = [  # (label, parallel keys (dp = world / (pp x tp)), micro-batch)
    ("dp zero0", {}, 4),
    ("dp zero0 mb1", {}, 1),
    ("dp zero1", {"zero": 1}, 4),
    ("dp zero2", {"zero": 2}, 4),
    ("dp zero3", {"zero": 3}, 4),
    ("dp zero2 + cpu offload", {"zero": 2, "offload": "cpu"}, 4),
    ("pp4 1f1b", {"pp": 4}, 2),
    ("pp4 gpipe", {"pp": 4, "pp_schedule": "gpipe"}, 2),
    ("pp4 interleaved x2", {"pp": 4, "pp_schedule": "interleaved", "pp_virtual": 2}, 2),
    ("pp4 zb", {"pp": 4, "pp_schedule": "zb"}, 2),
    ("dp2 pp2 1f1b", {"pp": 2}, 2),
    ("dp2 tp2", {"tp": 2}, 4),
    ("dp2 tp2+sp", {"tp": 2, "sequence_parallel": True}, 4),
    ("dp2 tp2+sp zero1", {"tp": 2, "sequence_parallel": True, "zero": 1}, 4),
    ("tp4", {"tp": 4}, 4),
    ("tp4+sp", {"tp": 4, "sequence_parallel": True}, 4),
    ("tp2 pp2 1f1b", {"tp": 2, "pp": 2}, 2),
]


def _time_spec():
    from gigatrain.planner.memory import ModelSpec

    m = TIME_MODEL
    return ModelSpec("gpt", m["n_layer"], m["d_model"], m["n_head"], m["seq_len"], m["vocab"],
                     stem_extra=m["seq_len"] * m["d_model"])


def _layout_of(par: dict, mb: int, world: int, recompute: str = "none"):
    from gigatrain.planner.memory import Layout

    pp, tp = par.get("pp", 1), par.get("tp", 1)
    return Layout(dp=world // (pp * tp), pp=pp, tp=tp, sp=par.get("sequence_parallel", False),
                  zero=par.get("zero", 0), offload=par.get("offload", "none"), micro_batch=mb,
                  schedule=par.get("pp_schedule", "1f1b"), virtual=par.get("pp_virtual", 1), recompute=recompute)


def _par_of(lay) -> dict:
    par = {"pp": lay.pp, "tp": lay.tp, "zero": lay.zero, "offload": lay.offload}
    if lay.tp > 1:
        par["sequence_parallel"] = lay.sp
    if lay.pp > 1:
        par.update(pp_schedule=lay.schedule, pp_virtual=lay.virtual)
    return par


def _time_rank(rank, world, layouts, warmup, steps, rounds):
    """Per layout, this rank's step times (seconds), over every round."""
    import gc
    import time as _time
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    import gigatrain
    from gigatrain.models import build_model

    torch.set_num_threads(1)
    times = {label: [] for label, *_ in layouts}
    for rnd in range(rounds):
        for label, par, mb, recompute in (layouts if rnd % 2 == 0 else layouts[::-1]):
            pp, tp = par.get("pp", 1), par.get("tp", 1)
            dp = world // (pp * tp)
            cfg = {"parallel": dict(par, dp=dp, pp_balance="uniform", bucket_mb=TIME_BUCKET_MB),
                   "train": {"global_batch": TIME_BATCH, "micro_batch": mb, "optimizer": "adamw",
                             **({"recompute": recompute} if recompute != "none" else {})},
                   "precision": "fp32", "model": {k: v for k, v in TIME_MODEL.items() if k != "vocab"}}
            m = TIME_MODEL
            mcfg = SimpleNamespace(name="gpt", dropout=0.0, n_layer=m["n_layer"], d_model=m["d_model"],
                                   n_head=m["n_head"], seq_len=m["seq_len"])
            torch.manual_seed(0)
            model = build_model(mcfg, vocab_size=m["vocab"])
            engine = gigatrain.initialize(model, cfg)
            g = torch.Generator().manual_seed(rank // (pp * tp))
            batches = [model.example_batch(mb, g) for _ in range(TIME_BATCH // (mb * dp))]
            for _ in range(warmup):
                engine.train_step(batches, lr=1e-4)
            for _ in range(steps):
                dist.barrier()
                t0 = _time.perf_counter()
                engine.train_step(batches, lr=1e-4)
                times[label].append(_time.perf_counter() - t0)
            engine.close()
            engine = model = None
            gc.collect()
    return times


def spearman(xs, ys) -> float:
    """Spearman's rank correlation (ties get their average rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def step_times(nproc: int, gpu: str | None, warmup: int, steps: int, rounds: int, measured: str | None = None) -> dict:
    """Predict, measure (what ``measured``, the JSON of an earlier ``--time`` run, does not hold
    already) and compare; prints the table and returns the JSON-able result."""
    import statistics

    from gigatrain.distributed.spawn import spawn
    from gigatrain.planner.calibrate import calibrate
    from gigatrain.planner.cost import step_time
    from gigatrain.planner.memory import Job
    from gigatrain.planner.presets import get_device
    from gigatrain.planner.search import search

    dev = get_device(gpu) if gpu else calibrate(ranks=nproc)
    if not gpu:
        print(f"calibrated {nproc} local ranks: matmul {max(r for _, r in dev.matmul_table) / 1e9:.0f} GFLOP/s, "
              f"links {dev.intra_bw / 1e9:.2f} GB/s, {dev.intra_alpha * 1e6:.0f} us", flush=True)
    job = Job(_time_spec(), TIME_BATCH, param_bytes=4, adam=True, momentum=False, bucket_mb=TIME_BUCKET_MB)
    res = search(job, dev, nproc, gpus_per_node=nproc)
    pick = res.best.layout
    grid = [(label, par, mb, "none") for label, par, mb in TIME_LAYOUTS
            if nproc % (par.get("pp", 1) * par.get("tp", 1)) == 0]
    layouts = {label: _layout_of(par, mb, nproc) for label, par, mb, _ in grid}
    pick_label = next((k for k, v in layouts.items() if v == pick), None)
    if pick_label is None:
        pick_label = "planner's pick: " + pick.describe()
        grid.append((pick_label, _par_of(pick), pick.micro_batch, pick.recompute))
        layouts[pick_label] = pick
    times = {}
    if measured:
        with open(measured) as f:
            old = json.load(f)["time"]
        if old["nproc"] != nproc:
            raise SystemExit(f"--measured {measured} was measured on {old['nproc']} ranks, not {nproc}")
        warmup, steps, rounds = old["warmup"], old["steps"], old["rounds"]  # measure the rest alike
        known = {tuple(sorted(r["fields"].items())): r["meas_all_s"] for r in old["rows"]}
        for label, lay in layouts.items():
            key = tuple(sorted(dataclasses.asdict(lay).items()))
            if key in known:
                times[label] = known[key]
    todo = [g for g in grid if g[0] not in times]
    print(f"planner's pick for {nproc} x {dev.name}: {pick.describe()} ({res.best.step_s:.3g} s predicted); "
          f"measuring {len(todo)} of {len(grid)} layouts x {rounds} rounds", flush=True)
    if todo:
        per_rank = spawn(_time_rank, nproc, todo, warmup, steps, rounds, timeout_s=600)
        for label, *_ in todo:
            # A step is as slow as its slowest rank.
            times[label] = [max(r[label][i] for r in per_rank) for i in range(len(per_rank[0][label]))]
    rows = []
    for label, *_ in grid:
        lay, per_step = layouts[label], times[label]
        st = step_time(job, lay, dev)
        rows.append({"layout": label, "describe": lay.describe(), "fields": dataclasses.asdict(lay),
                     "pred_s": st.total, "meas_s": statistics.median(per_step), "meas_min_s": min(per_step),
                     "meas_all_s": per_step,
                     "pred_parts": {"compute": st.compute, "bubble": st.bubble, "tp_comm": st.tp_comm,
                                    "p2p": st.p2p, "dp_comm": st.dp_comm, "optimizer": st.optimizer}})
    pred, meas = [r["pred_s"] for r in rows], [r["meas_s"] for r in rows]
    rho = spearman(pred, meas)
    rho_min = spearman(pred, [r["meas_min_s"] for r in rows])
    mape = sum(abs(p - m) / m for p, m in zip(pred, meas)) / len(rows)
    fastest = min(rows, key=lambda r: r["meas_s"])
    picked = next(r for r in rows if r["layout"] == pick_label)
    over = picked["meas_s"] / fastest["meas_s"] - 1
    in_grid = {label for label, _, _ in TIME_LAYOUTS}
    top = min((r for r in rows if r["layout"] in in_grid), key=lambda r: r["pred_s"])
    top_over = top["meas_s"] / fastest["meas_s"] - 1
    print(f"{'layout':<34} {'predicted s':>11} {'measured s':>10} {'error':>7} {'fastest s':>9}")
    for r in sorted(rows, key=lambda r: r["meas_s"]):
        print(f"{r['layout']:<34} {r['pred_s']:>11.3f} {r['meas_s']:>10.3f} "
              f"{(r['pred_s'] / r['meas_s'] - 1) * 100:>6.0f}% {r['meas_min_s']:>9.3f}")
    print(f"Spearman {rho:.3f} (against the fastest steps {rho_min:.3f}); MAPE {mape * 100:.1f}%; planner's pick "
          f"{picked['layout']} ({pick.describe()}) measured {picked['meas_s']:.3f} s, {over * 100:.1f}% above the "
          f"fastest ({fastest['layout']}, {fastest['meas_s']:.3f} s); the grid's fastest predicted, {top['layout']}, "
          f"measured {top_over * 100:.1f}% above it")
    return {"device": dev.name, "device_source": dev.source, "nproc": nproc, "model": TIME_MODEL,
            "global_batch": TIME_BATCH, "warmup": warmup, "steps": steps, "rounds": rounds, "rows": rows,
            "spearman": rho, "spearman_fastest_steps": rho_min, "mape": mape, "pick": picked["layout"],
            "pick_meas_s": picked["meas_s"], "fastest": fastest["layout"], "fastest_meas_s": fastest["meas_s"],
            "pick_over_fastest": over, "grid_pick": top["layout"], "grid_pick_over_fastest": top_over}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sanity", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--gpu", default=None, help="--sanity: the device preset (default a100-80g); --time: a file "
                                                "from gigatrain plan --calibrate (default: calibrate now)")
    ap.add_argument("--warmup", type=int, default=2, help="--time: steps before timing, per layout and round")
    ap.add_argument("--steps", type=int, default=3, help="--time: timed steps per layout and round")
    ap.add_argument("--rounds", type=int, default=3, help="--time: passes over the grid")
    ap.add_argument("--measured", default=None, metavar="FILE.json",
                    help="--time: reuse the step times of an earlier --time run (same --nproc); measure only "
                         "layouts it does not hold")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {}
    if args.sanity or not (args.memory or args.time):
        result["sanity"] = sanity(args.gpu or "a100-80g")
    if args.memory:
        result["memory"] = memory(args.nproc)
    if args.time:
        result["time"] = step_times(args.nproc, args.gpu, args.warmup, args.steps, args.rounds, args.measured)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
