"""Our ZeRO stages 1 and 2 vs our stage 0, and stage 1 vs torch's ZeroRedundancyOptimizer.

Every engine trains the same GPT from the same weights on the same batches with AdamW (forward,
backward, gradient reduction, optimizer step, parameter all-gather, zero_grad), on local gloo
ranks; rounds alternate between the engines so machine noise hits all alike. A step is as slow as
its slowest rank: per step we take the max over ranks, then the median over steps. The peer for
stage 1 is torch's ``ZeroRedundancyOptimizer`` under ``DistributedDataParallel`` (all-reduce of the
gradients, sharded AdamW, broadcast of the updated parameters). Also reported: bytes each rank
sends per step and the model-state bytes each rank holds (measured). ``--offload`` adds our
stages with the optimizer on the host (on a CPU-only machine this measures the offload path's
overhead, not a memory saving). Prints a table and writes JSON with ``--out``.

    python benchmarks/bench_zero.py --nproc 2 --out bench_zero.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from common import add_gpt_args, gpt_factory, median_step

TARGET = 1.10   # stage 1 and stage 2 step time / stage 0 step time


def _run(rank, world, args):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.parallel.strategy import build_grad_strategy
    from gigatrain.parallel.zero.memory import measure_model_state_bytes
    from gigatrain.precision import PrecisionPolicy

    torch.set_num_threads(args["threads"])
    dev = torch.device("cpu")
    make_gpt = gpt_factory(args)
    mesh = Mesh(ParallelDims(dp=world), dev)
    policy = PrecisionPolicy.from_name("fp32", dev)
    hp = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)

    model = make_gpt

    def adamw(groups):
        return torch.optim.AdamW([{"params": g["params"], "weight_decay": hp["weight_decay"] if g["decay"] else 0.0}
                                  for g in groups], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], foreach=True)

    g = torch.Generator().manual_seed(rank)
    B, T, V = args["micro_batch"], args["seq_len"], args["vocab"]

    def batch():
        x = torch.randint(0, V, (B, T), generator=g)
        return x, torch.roll(x, -1, 1)

    engines, memory = {}, {}

    def ours(name, stage, offload="none"):
        m = model()
        st = build_grad_strategy(stage, m, mesh, adamw, bucket_mb=args["bucket_mb"], precision=policy,
                                 offload=offload)
        opt = st.optimizer

        def step():
            x, y = batch()
            st.set_sync(True)
            m.loss(m(x), y).backward()
            st.after_backward()
            st.step(hp["lr"], 1.0)
            st.zero_grad()

        engines[name] = step
        memory[name] = lambda: measure_model_state_bytes(
            st, opt, m, host=st.host_tensors())

    ours("stage0", 0)
    ours("stage1", 1)
    ours("stage2", 2)
    for off in args["offload"]:
        ours(f"stage1+{off}", 1, off)
        ours(f"stage2+{off}", 2, off)

    # torch's ZeRO-1: DDP all-reduces the gradients, each rank updates its parameter shard, and
    # the updated parameters are broadcast from their owners.
    tm = model()
    ddp = DDP(tm, bucket_cap_mb=args["bucket_mb"], gradient_as_bucket_view=True)
    decay = [p for p in tm.parameters() if p.dim() >= 2]
    no_decay = [p for p in tm.parameters() if p.dim() < 2]
    zero = ZeroRedundancyOptimizer([{"params": decay, "weight_decay": hp["weight_decay"]}],
                                   optimizer_class=torch.optim.AdamW, lr=hp["lr"], betas=hp["betas"],
                                   eps=hp["eps"], foreach=True, parameters_as_bucket_view=True)
    zero.add_param_group({"params": no_decay, "weight_decay": 0.0})

    def step_torch():
        x, y = batch()
        tm.loss(ddp(x), y).backward()
        zero.step()
        zero.zero_grad(set_to_none=False)

    engines["torch_zero1"] = step_torch
    memory["torch_zero1"] = lambda: measure_model_state_bytes(tm, zero.optim)

    times = {k: [] for k in engines}
    sent = {}
    for _ in range(args["warmup"]):
        for fn in engines.values():
            fn()
    for name, fn in engines.items():   # bytes on our counted collectives, one step each
        mesh.stats.reset()
        fn()
        sent[name] = mesh.stats.total_sent("dp")
    for _ in range(args["rounds"]):
        for name, fn in engines.items():
            for _ in range(args["steps_per_round"]):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    mem = {k: f() for k, f in memory.items()}
    params = sum(p.numel() for p in tm.parameters())
    dist.barrier()
    time.sleep(0.1)   # let gloo's threads drop their finished work objects before the exit
    return {"times": times, "params": params, "sent": sent, "memory": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gpt_args(ap, bucket_mb=1.0, rounds=4, steps_per_round=3, warmup=2)
    ap.add_argument("--offload", default="", help="comma-separated offload kinds to add, e.g. cpu")
    a = ap.parse_args()
    from gigatrain.distributed.spawn import spawn
    from gigatrain.parallel.zero.memory import model_state_bytes

    args = {k.replace("-", "_"): v for k, v in vars(a).items()}
    args["offload"] = [k for k in a.offload.split(",") if k]
    res = spawn(_run, a.nproc, args, timeout_s=900)
    names = list(res[0]["times"])
    median = {}
    for name in names:
        median[name] = median_step(res, name)
    P, N = res[0]["params"], a.nproc
    formula = {"stage0": model_state_bytes(P, N, 0, param_bytes=4),
               "stage1": model_state_bytes(P, N, 1, param_bytes=4),
               "stage2": model_state_bytes(P, N, 2, param_bytes=4)}
    for off in args["offload"]:
        formula[f"stage1+{off}"] = model_state_bytes(P, N, 1, off, param_bytes=4)
        formula[f"stage2+{off}"] = model_state_bytes(P, N, 2, off, param_bytes=4)
    base = median["stage0"]
    print(f"GPT {P / 1e6:.2f}M params, {N} gloo ranks, AdamW, fp32, micro-batch {a.micro_batch} x seq {a.seq_len}, "
          f"buckets {a.bucket_mb} MB, {a.threads} thread(s) per rank")
    print(f"{'engine':<14}{'step (ms)':>10}{'vs stage0':>10}{'sent/step (MB)':>16}"
          f"{'state dev (MB)':>16}{'state host (MB)':>17}{'formula dev/host (MB)':>23}")
    rows = {}
    for name in names:
        mem = res[0]["memory"][name]
        f = formula.get(name)
        sent = res[0]["sent"].get(name, 0)
        rows[name] = {"median_step_s": median[name], "vs_stage0": median[name] / base,
                      "sent_bytes_per_step": sent, "state_bytes": mem, "formula_bytes": f}
        ftxt = f"{f['device'] / 2**20:.1f}/{f['host'] / 2**20:.1f}" if f else "-"
        stxt = f"{sent / 2**20:.2f}" if name != "torch_zero1" else "(torch)"
        print(f"{name:<14}{median[name] * 1e3:>10.1f}{median[name] / base:>10.3f}{stxt:>16}"
              f"{mem['device'] / 2**20:>16.1f}{mem['host'] / 2**20:>17.1f}{ftxt:>23}")
    r1, r2 = median["stage1"] / base, median["stage2"] / base
    vs_torch = median["stage1"] / median["torch_zero1"]
    print(f"stage1/stage0 = {r1:.3f}, stage2/stage0 = {r2:.3f} (target <= {TARGET}); "
          f"stage1/torch ZeroRedundancyOptimizer = {vs_torch:.3f}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"config": args, "params": P, "engines": rows, "stage1_vs_stage0": r1,
                       "stage2_vs_stage0": r2, "stage1_vs_torch_zero1": vs_torch, "target": TARGET,
                       "torch": torch.__version__}, fh, indent=1)


if __name__ == "__main__":
    main()
