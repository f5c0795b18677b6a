"""Our ZeRO stage 3 vs torch FSDP2 (``fully_shard`` per block + root): step time on local gloo ranks.

Both train the same GPT from the same weights on the same batches with AdamW (forward, backward,
optimizer step, zero_grad); rounds alternate between the engines so machine noise hits all
alike. A step is as slow as its slowest rank: per step we take the max over ranks, then the
median over steps. Optionally (``--offload cpu,nvme``) our stage 3 with its optimizer on the host
or in files is timed too. Prints a table and writes JSON with ``--out``.

    python benchmarks/bench_zero3.py --nproc 2 --out bench_zero3.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time

import torch
from common import add_gpt_args, gpt_factory, median_step


def _run(rank, world, args):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.parallel.zero.stage3 import Stage3Strategy
    from gigatrain.precision import PrecisionPolicy

    torch.set_num_threads(args["threads"])
    dev = torch.device("cpu")
    make_gpt = gpt_factory(args)
    mesh = Mesh(ParallelDims(dp=world), dev)
    policy = PrecisionPolicy.from_name("fp32", dev)

    model = make_gpt

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)

    engines = {}
    offload_dir = os.path.join(args["tmp"], f"rank{rank}")
    for kind in ["none"] + [k for k in args["offload"] if k != "none"]:
        m = model()
        st = Stage3Strategy(m, mesh, lambda groups: adamw([{"params": g["params"]} for g in groups]),
                            bucket_mb=args["bucket_mb"], precision=policy, offload=kind,
                            offload_dir=offload_dir, prefetch=not args["no_prefetch"])

        def step(m=m, st=st):
            x, y = batch()
            m.loss(m(x), y).backward()
            st.after_backward()
            st.step(1e-4, 1.0)
            st.zero_grad()
        engines["ours" if kind == "none" else f"ours_{kind}"] = step

    fm = model()
    fmesh = init_device_mesh("cpu", (world,))
    for block in fm.blocks:
        fully_shard(block, mesh=fmesh)
    fully_shard(fm, mesh=fmesh)
    fopt = adamw(fm.parameters())

    def step_fsdp():
        x, y = batch()
        fm.loss(fm(x), y).backward()
        fopt.step()
        fopt.zero_grad()
    engines["fsdp2"] = step_fsdp

    g = torch.Generator().manual_seed(rank)
    B, T, V = args["micro_batch"], args["seq_len"], args["vocab"]

    def batch():
        x = torch.randint(0, V, (B, T), generator=g)
        return x, torch.roll(x, -1, 1)

    times = {k: [] for k in engines}
    for _ in range(args["warmup"]):
        for fn in engines.values():
            fn()
    for _ in range(args["rounds"]):
        for name, fn in engines.items():
            for _ in range(args["steps_per_round"]):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    mesh.stats.reset()
    engines["ours"]()
    sent = mesh.stats.total_sent("dp")
    params = sum(p.numel() for p in model().parameters())
    engines.clear()
    gc.collect()   # destroy the groups with the process group, not at interpreter shutdown
    return {"times": times, "params": params, "sent": sent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_gpt_args(ap, bucket_mb=25.0, rounds=6, steps_per_round=5, warmup=3)
    ap.add_argument("--offload", default="", help="also time our stage 3 with these offloads: cpu,nvme")
    ap.add_argument("--offload-dir", default=None, help="folder for nvme files (default: a temp dir)")
    ap.add_argument("--no-prefetch", action="store_true")
    a = ap.parse_args()
    from gigatrain.distributed.spawn import spawn

    args = {k.replace("-", "_"): v for k, v in vars(a).items()}
    args["offload"] = [k.strip() for k in a.offload.split(",") if k.strip()]
    tmp = tempfile.mkdtemp(prefix="bench-zero3-", dir=a.offload_dir)
    args["tmp"] = tmp
    try:
        res = spawn(_run, a.nproc, args, timeout_s=600)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = list(res[0]["times"])
    agg = {}
    for name in names:
        agg[name] = median_step(res, name)
    ratio = agg["ours"] / agg["fsdp2"]
    P, N = res[0]["params"], a.nproc
    print(f"GPT {P / 1e6:.2f}M params, {N} gloo ranks, micro-batch {a.micro_batch} x seq {a.seq_len}, AdamW fp32")
    print(f"{'engine':<12}{'median step (ms)':>18}{'vs fsdp2':>10}")
    for name in names:
        print(f"{name:<12}{agg[name] * 1e3:>18.1f}{agg[name] / agg['fsdp2']:>10.3f}")
    expected = 3 * P * (N - 1) / N * 4
    print(f"ratio ours/fsdp2 = {ratio:.3f} (target <= 1.00); bytes sent per step by each rank "
          f"{res[0]['sent']:,} = {res[0]['sent'] / expected:.4f} x 3P(N-1)/N")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": {k: v for k, v in args.items() if k != "tmp"}, "median_step_s": agg,
                       "ratio": ratio, "params": P, "sent_bytes_per_step": res[0]["sent"],
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
