"""Our bucketed data parallel vs torch DistributedDataParallel: step time on local gloo ranks.

Both train the same GPT from the same weights on the same batches; rounds alternate between the two
so machine noise hits both alike. Prints a table and writes JSON.

    python benchmarks/bench_dp.py --nproc 2 --out bench_dp.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from common import add_gpt_args, gpt_factory, median_step


def _run(rank, world, args):
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.parallel.data_parallel import DataParallel

    torch.set_num_threads(args["threads"])
    make_gpt = gpt_factory(args)
    mesh = Mesh(ParallelDims(dp=world), torch.device("cpu"))
    ours = make_gpt()
    theirs = make_gpt()
    dp = DataParallel(ours, mesh.dp, bucket_mb=args["bucket_mb"])
    ddp = DDP(theirs, bucket_cap_mb=args["bucket_mb"], gradient_as_bucket_view=True)
    opt_o = torch.optim.SGD(ours.parameters(), lr=1e-3)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    B, T, V = args["micro_batch"], args["seq_len"], args["vocab"]

    def batch():
        x = torch.randint(0, V, (B, T), generator=g)
        return x, torch.roll(x, -1, 1)

    def step_ours():
        x, y = batch()
        dp.set_sync(True)
        ours.loss(ours(x), y).backward()
        dp.after_backward()
        opt_o.step()
        dp.zero_grad()

    def step_ddp():
        x, y = batch()
        theirs.loss(ddp(x), y).backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=False)

    times = {"ours": [], "ddp": []}
    for _ in range(args["warmup"]):
        step_ours()
        step_ddp()
    for _ in range(args["rounds"]):
        for name, fn in (("ours", step_ours), ("ddp", step_ddp)):
            for _ in range(args["steps_per_round"]):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    params = sum(p.numel() for p in ours.parameters())
    return {"times": times, "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_gpt_args(ap, bucket_mb=1.0, rounds=6, steps_per_round=5, warmup=3)
    a = ap.parse_args()
    from gigatrain.distributed.spawn import spawn

    args = {k.replace("-", "_"): v for k, v in vars(a).items()}
    res = spawn(_run, a.nproc, args, timeout_s=600)
    # A step is as slow as its slowest rank: take the max over ranks per step, then the median.
    agg = {}
    for name in ("ours", "ddp"):
        agg[name] = median_step(res, name)
    ratio = agg["ours"] / agg["ddp"]
    print(f"GPT {res[0]['params'] / 1e6:.2f}M params, {a.nproc} gloo ranks, micro-batch {a.micro_batch} x seq {a.seq_len}")
    print(f"{'engine':<10}{'median step (ms)':>18}")
    for name in ("ours", "ddp"):
        print(f"{name:<10}{agg[name] * 1e3:>18.1f}")
    print(f"ratio ours/ddp = {ratio:.3f} (target <= 1.05)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": args, "median_step_s": agg, "ratio": ratio,
                       "params": res[0]["params"], "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
