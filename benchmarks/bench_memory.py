"""Huge models really fit: per-rank host memory of a ~300M GPT on 4 gloo ranks with ZeRO-3.

Each rank's peak resident set (VmHWM, reset between phases through /proc/self/clear_refs) during
initialisation, one training step (AdamW: its states appear then) and one sharded checkpoint
save, against the ideal: the rank's shard of parameters, gradients and AdamW's two moments
(16 bytes per parameter / N) plus the largest unit gathered whole (its parameters and its full
gradient, 8 bytes per element). Target: at most 1.3 x ideal + 300 MB (the interpreter, torch,
gloo). The same phases are measured with the model built whole on every rank first (how every
layout started before meta initialisation).

Then the save time of the sharded checkpoint against the full-gather save (whole tensors
gathered over dp, written by one rank), in one run, on the same engine. That comparison trains
with plain SGD: the full-gather save holds the whole model *and* its optimizer states on every
rank at once, which with AdamW would be 4.8 GB per rank here (more than this machine lends
four ranks), the very problem sharded checkpoints remove.

    python benchmarks/bench_memory.py --out bench_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from types import SimpleNamespace

import torch

MB = 2**20


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build(args, meta: bool):
    from gigatrain.models import build_model

    cfg = SimpleNamespace(name="gpt", n_layer=args["n_layer"], n_head=args["n_head"], d_model=args["d_model"],
                          seq_len=args["seq_len"])
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return build_model(cfg, vocab_size=args["vocab"])
    return build_model(cfg, vocab_size=args["vocab"])


def _engine(model, world, optimizer):
    from gigatrain.api import parallelize
    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.parallel.policies import ParallelPlan, ZeroPolicy

    mesh = Mesh(ParallelDims(dp=world), torch.device("cpu"))
    plan = ParallelPlan(dims=mesh.dims, zero=ZeroPolicy(3, bucket_mb=25.0))

    def factory(groups):
        if optimizer == "adamw":
            return torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-4, foreach=False)
        return torch.optim.SGD([{"params": g["params"]} for g in groups], lr=1e-4)
    return parallelize(model, mesh, factory, plan), mesh


def _batch(args, rank):
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, args["vocab"], (args["micro_batch"], args["seq_len"] + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _memory(rank, world, args, meta):
    from gigatrain.metrics import peak_host_bytes

    base = _rss()
    out = {"base": base}
    _reset_peak()
    model = _build(args, meta)
    eng, mesh = _engine(model, world, "adamw")
    out["init"] = peak_host_bytes()
    st = eng.strategy
    out["shard_numel"] = st.shard_numel
    out["largest_unit"] = max(u.padded for u in st.units)
    out["params"] = sum(u.numel for u in st.units)
    _reset_peak()
    t0 = time.perf_counter()
    x, y = _batch(args, rank)
    eng.train_step([(x, y)], 1e-4)
    out["step_s"] = time.perf_counter() - t0
    out["step"] = peak_host_bytes()
    _reset_peak()
    t0 = time.perf_counter()
    eng.save(os.path.join(args["tmp"], "meta" if meta else "whole"))
    out["save_s"] = time.perf_counter() - t0
    out["save"] = peak_host_bytes()
    eng.close()
    return out


def _save_time(rank, world, args):
    eng, mesh = _engine(_build(args, True), world, "sgd")
    x, y = _batch(args, rank)
    eng.train_step([(x, y)], 1e-4)
    times = {}
    for kind in ("sharded", "full-gather", "sharded", "full-gather"):
        mesh.world.barrier()
        t0 = time.perf_counter()
        eng.save(os.path.join(args["tmp"], kind), sharded=kind == "sharded")
        mesh.world.barrier()
        times.setdefault(kind, []).append(time.perf_counter() - t0)
    eng.close()
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    from gigatrain.distributed.spawn import spawn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--n-layer", type=int, default=20)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--n-head", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--skip-whole", action="store_true", help="do not measure the whole-model build")
    ap.add_argument("--skip-save-time", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gigatrain-bench-memory-")
    args = dict(n_layer=a.n_layer, d_model=a.d_model, n_head=a.n_head, vocab=a.vocab, seq_len=a.seq_len,
                micro_batch=a.micro_batch, tmp=tmp)
    report: dict = {"args": {k: v for k, v in args.items() if k != "tmp"}, "nproc": a.nproc}
    try:
        runs = {"meta": spawn(_memory, a.nproc, args, True, timeout_s=1800)}
        shutil.rmtree(os.path.join(tmp, "meta"), ignore_errors=True)
        if not a.skip_whole:
            runs["whole"] = spawn(_memory, a.nproc, args, False, timeout_s=1800)
            shutil.rmtree(os.path.join(tmp, "whole"), ignore_errors=True)
        r0 = runs["meta"][0]
        ideal = 16 * r0["shard_numel"] + 8 * r0["largest_unit"]
        report.update(params=r0["params"], shard_numel=r0["shard_numel"], largest_unit=r0["largest_unit"],
                      ideal_bytes=ideal, target_bytes=int(1.3 * ideal + 300 * MB))
        print(f"GPT {r0['params'] / 1e6:.1f}M parameters on {a.nproc} ranks, ZeRO-3, AdamW fp32; ideal per rank "
              f"{ideal / MB:,.0f} MB (16 B x {r0['shard_numel'] / 1e6:.1f}M shard + 8 B x "
              f"{r0['largest_unit'] / 1e6:.1f}M largest unit); target {report['target_bytes'] / MB:,.0f} MB")
        print(f"{'build':<7} {'phase':<6} {'max rank MB':>12} {'x ideal':>8} {'target met':>10}")
        for build, res in runs.items():
            report[build] = res
            for phase in ("init", "step", "save"):
                peak = max(r[phase] for r in res)
                report[f"{build}_{phase}_peak"] = peak
                print(f"{build:<7} {phase:<6} {peak / MB:>12,.0f} {peak / ideal:>8.2f} "
                      f"{'yes' if peak <= report['target_bytes'] else 'NO':>10}")
        print(f"interpreter + torch + gloo before the model: {max(r['base'] for r in runs['meta']) / MB:,.0f} MB; "
              f"step {max(r['step_s'] for r in runs['meta']):.1f} s, save {max(r['save_s'] for r in runs['meta']):.1f} s")
        if not a.skip_save_time:
            t = spawn(_save_time, a.nproc, args, timeout_s=1800)
            sharded = max(r["sharded"] for r in t)
            full = max(r["full-gather"] for r in t)
            report["save_time"] = {"sharded_s": sharded, "full_gather_s": full, "ratio": sharded / full}
            print(f"save (parameters only, SGD): sharded {sharded:.2f} s, full-gather {full:.2f} s, "
                  f"ratio {sharded / full:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
