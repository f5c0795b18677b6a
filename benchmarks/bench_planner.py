"""The planner against reality: published large runs, and memory measured on local gloo ranks.

``--sanity``: for GPT layouts published by Narayanan et al. 2021 ("Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM", Table 1: A100 80GB, seq 2048, vocab 51200,
micro-batch 1, full recomputation, data parallel without ZeRO, attention that materialises the
scores), the planner's predicted TFLOP/s per GPU for the published (t, p) with 1F1B and with the
interleaved schedule, against the published figure; then what the planner picks with that
toolbox fixed (no sequence parallel, ZeRO 0, full recomputation) and with everything searched,
and how long each search took.

``--memory``: predicted vs measured memory per rank for layouts that run today on ``--nproc``
gloo ranks (data parallel with ZeRO 0-3 and offload, pipelines 1F1B, GPipe, interleaved and zero
bubble), fp32 AdamW on a small GPT. Model states are measured with
``measure_model_state_bytes``; activations as the peak of the bytes autograd keeps saved for
backward during one step (saved-tensor hooks; parameter storages excluded, each storage once).

    python benchmarks/bench_planner.py --sanity --out planner_sanity.json
    python benchmarks/bench_planner.py --memory --nproc 2 --out planner_memory.json
"""
from __future__ import annotations

import argparse
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
    ("pp 1f1b", {"pp": 0, "pp_schedule": "1f1b"}, 4, 4),
    ("pp gpipe", {"pp": 0, "pp_schedule": "gpipe"}, 4, 4),
    ("pp interleaved x2", {"pp": 0, "pp_schedule": "interleaved", "pp_virtual": 2}, 4, 4),
    ("pp zb", {"pp": 0, "pp_schedule": "zb"}, 4, 4),
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
        return _Token(self, key, t)

    @staticmethod
    def unpack(x):
        return x.t if isinstance(x, _Token) else x


class _Token:
    def __init__(self, owner, key, t):
        self.owner, self.key, self.t = owner, key, t

    def __del__(self):
        n, nbytes = self.owner.refs[self.key]
        if n == 1:
            del self.owner.refs[self.key]
            self.owner.live -= nbytes
        else:
            self.owner.refs[self.key] = (n - 1, nbytes)


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
        if par.get("pp") == 0:
            par["pp"] = world
        pp = par.get("pp", 1)
        dp = world // pp
        cfg = {"parallel": dict(par, dp=dp, pp_balance="uniform", bucket_mb=1.0),
               "train": {"global_batch": mb * M * dp, "micro_batch": mb, "optimizer": "adamw"},
               "precision": "fp32"}
        mcfg = SimpleNamespace(name="gpt", dropout=0.0, **{k: v for k, v in MODEL.items() if k != "vocab"})
        torch.manual_seed(0)
        model = build_model(mcfg, vocab_size=MODEL["vocab"])
        engine = gigatrain.initialize(model, cfg)
        g = torch.Generator().manual_seed(rank // pp)
        batches = [model.example_batch(mb, g) for _ in range(M)]
        engine.train_step(batches, lr=1e-4)  # optimizer states exist from here on

        def params():
            return {p.untyped_storage().data_ptr() for p in engine.model.parameters()}

        saved = _Saved(params)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            engine.train_step(batches, lr=1e-4)
        st = engine.strategy
        states = measure_model_state_bytes(st, st.optimizer, engine.stages.owned, host=st.host_tensors())
        out.append({"label": label, "rank": rank, "pp_rank": rank % pp, "states_device": states["device"],
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
        pp = nproc if par.get("pp") == 0 else 1
        dp = nproc // pp
        lay = Layout(dp=dp, pp=pp, tp=1, zero=par.get("zero", 0), offload=par.get("offload", "none"), micro_batch=mb,
                     schedule=par.get("pp_schedule", "1f1b"), virtual=par.get("pp_virtual", 1))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sanity", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--gpu", default="a100-80g", help="--sanity: the device preset")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {}
    if args.sanity or not args.memory:
        result["sanity"] = sanity(args.gpu)
    if args.memory:
        result["memory"] = memory(args.nproc)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
