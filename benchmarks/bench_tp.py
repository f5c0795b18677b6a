"""Our tensor (and sequence) parallel GPT vs the same GPT under PyTorch DTensor's
``parallelize_module``: step time on local gloo ranks.

Both split the same layers the same way (qkv and fc column-parallel, the projections
row-parallel, the tied embedding / LM head over the vocabulary with a vocabulary-parallel loss;
with sequence parallelism the LayerNorms on sequence shards). They start from the same weights
and train on the same batches with SGD; the first losses must agree. Rounds alternate between
the engines so machine noise hits both alike. Prints a table and writes JSON.

    python benchmarks/bench_tp.py --tp 2 4 --out bench_tp.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import add_gpt_args, gpt_factory, median_step

ENGINES = ("ours", "dtensor", "ours_sp", "dtensor_sp")


def _dtensor_gpt(model, mesh, sp: bool):
    """``model`` parallelised with DTensor styles, the plan torchtitan uses for its models."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)

    head = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                           use_local_output=False)
    if not sp:
        plan = {"stem.wte": RowwiseParallel(input_layouts=Replicate()), "head.lm_head": head}
        for i in range(len(model.blocks)):
            plan.update({f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                         f"blocks.{i}.mlp.fc": ColwiseParallel(), f"blocks.{i}.mlp.proj": RowwiseParallel()})
    else:
        plan = {"stem.wte": RowwiseParallel(input_layouts=Replicate()),
                "stem": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                            use_local_output=False),
                "head.ln_f": SequenceParallel(), "head.lm_head": head}
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        for i in range(len(model.blocks)):
            b = f"blocks.{i}"
            plan.update({f"{b}.ln1": SequenceParallel(), f"{b}.ln2": SequenceParallel(),
                         f"{b}.attn": gather, f"{b}.mlp": gather,
                         f"{b}.attn.qkv": ColwiseParallel(), f"{b}.mlp.fc": ColwiseParallel(),
                         f"{b}.attn.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
                         f"{b}.mlp.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)})
    parallelize_module(model, mesh, plan)
    # Both styles shard the tied weight along dim 0 (vocabulary rows = output features): tie again.
    model.head.lm_head.weight = model.stem.wte.weight
    return model


def _run(rank, world, args):
    from torch.distributed.tensor.parallel import loss_parallel

    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.parallel.placement import Placements
    from gigatrain.parallel.policies import TensorParallelPolicy
    from gigatrain.parallel.tensor import apply_tensor_parallel

    torch.set_num_threads(args["threads"])
    make_gpt = gpt_factory(args)
    mesh = Mesh(ParallelDims(1, 1, world), torch.device("cpu"))
    models = {}
    for sp in (False, True):
        m = make_gpt()
        models["ours_sp" if sp else "ours"] = apply_tensor_parallel(
            m, mesh.tp, TensorParallelPolicy(world, sp), Placements.replicated_model(m))
        models["dtensor_sp" if sp else "dtensor"] = _dtensor_gpt(make_gpt(), mesh.device_mesh["tp"], sp)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)  # every tp rank must see the same batch
    B, T, V = args["micro_batch"], args["seq_len"], args["vocab"]

    def batch():
        x = torch.randint(0, V, (B, T), generator=g)
        return x, torch.roll(x, -1, 1)

    def step(name, xy=None):
        x, y = xy or batch()
        m = models[name]
        if name.startswith("dtensor"):
            with loss_parallel():
                loss = m.loss(m(x), y)
                loss.backward()
            loss = loss.full_tensor()
        else:
            loss = m.loss(m(x), y)
            loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=False)
        return float(loss.detach())

    fixed = batch()
    first = {name: step(name, fixed) for name in ENGINES}  # same weights, same batch
    times = {name: [] for name in ENGINES}
    for _ in range(args["warmup"]):
        for name in ENGINES:
            step(name)
    for _ in range(args["rounds"]):
        for name in ENGINES:
            for _ in range(args["steps_per_round"]):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t0)
    params = sum(p.numel() for p in make_gpt().parameters())
    return {"times": times, "first_loss": first, "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_gpt_args(ap, bucket_mb=1.0, rounds=6, steps_per_round=3, warmup=2)
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    a = ap.parse_args()
    from gigatrain.distributed.spawn import spawn

    args = {k.replace("-", "_"): v for k, v in vars(a).items()}
    table = {}
    for tp in a.tp:
        res = spawn(_run, tp, args, timeout_s=900)
        agg = {name: median_step(res, name) for name in ENGINES}
        first = res[0]["first_loss"]
        table[tp] = {"median_step_s": agg, "ratio": agg["ours"] / agg["dtensor"],
                     "ratio_sp": agg["ours_sp"] / agg["dtensor_sp"], "first_loss": first,
                     "spread": statistics.pstdev(first.values())}
        print(f"GPT {res[0]['params'] / 1e6:.2f}M params, tp={tp} gloo ranks, micro-batch {a.micro_batch} x seq "
              f"{a.seq_len}; first losses {', '.join(f'{k} {v:.6f}' for k, v in first.items())}")
    print(f"{'tp':<4}{'ours (ms)':>11}{'DTensor':>10}{'ratio':>8}{'ours+SP':>10}{'DTensor+SP':>12}{'ratio':>8}")
    for tp, row in table.items():
        m = {k: v * 1e3 for k, v in row["median_step_s"].items()}
        print(f"{tp:<4}{m['ours']:>11.1f}{m['dtensor']:>10.1f}{row['ratio']:>8.3f}{m['ours_sp']:>10.1f}"
              f"{m['dtensor_sp']:>12.1f}{row['ratio_sp']:>8.3f}")
    print("ratio = ours / DTensor step time (target <= 1.0)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": args, "results": table, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
