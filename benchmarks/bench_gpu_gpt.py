"""World-size-1 GPT training on one GPU: our engine vs a plain PyTorch loop, tokens/s and MFU.

Both train the same GPT (bf16 autocast, fp32 master weights, fused AdamW, same batches); steps
alternate in rounds so clock and thermal drift hit both alike. Needs CUDA.

    python benchmarks/bench_gpu_gpt.py --size 350m --out gpu_350m.json
    python benchmarks/bench_gpu_gpt.py --size 1.3b --micro-batch 16 --compile --out gpu_1p3b.json
"""
from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

SIZES = {  # n_layer, d_model, n_head (GPT-2 medium / GPT-3 XL shapes)
    "125m": (12, 768, 12),
    "350m": (24, 1024, 16),
    "1.3b": (24, 2048, 16),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", choices=sorted(SIZES), default="350m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps-per-round", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model in both set-ups")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_gpt.py needs a CUDA GPU")

    import torch.distributed as dist

    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.api import parallelize
    from gigatrain.metrics import device_peak_flops
    from gigatrain.models import build_model
    from gigatrain.optim import build_optimizer, param_groups
    from gigatrain.parallel.policies import ParallelPlan

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=dev)
    n_layer, d_model, n_head = SIZES[a.size]
    mcfg = SimpleNamespace(name="gpt", n_layer=n_layer, n_head=n_head, d_model=d_model, seq_len=a.seq_len)
    tcfg = SimpleNamespace(optimizer="adamw", lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), momentum=0.0)

    def make():
        torch.manual_seed(0)
        m = build_model(mcfg, vocab_size=a.vocab).to(dev)
        return m

    # Plain PyTorch: the loop everyone writes.
    plain = make()
    plain_opt = build_optimizer(tcfg, param_groups(plain.named_parameters()), dev)
    plain_fwd = torch.compile(plain) if a.compile else plain

    def plain_step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = plain.loss(plain_fwd(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    ours_model = make()
    mesh = Mesh(ParallelDims(dp=1), dev)
    engine = parallelize(ours_model, mesh, lambda g: build_optimizer(tcfg, g, dev),
                         ParallelPlan(dims=mesh.dims, precision="bf16", grad_clip=1.0))
    if a.compile:
        engine.model.forward = torch.compile(engine.model.forward)

    def ours_step(x, y):
        engine.train_step([(x, y)], lr=1e-4)

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, a.vocab, (a.micro_batch, a.seq_len), device=dev, generator=g)
    y = torch.roll(x, -1, 1)
    times = {"plain": [], "ours": []}
    for fn in (plain_step, ours_step):
        for _ in range(a.warmup):
            fn(x, y)
    for _ in range(a.rounds):
        for name, fn in (("plain", plain_step), ("ours", ours_step)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.steps_per_round):
                fn(x, y)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / a.steps_per_round)
    tokens = a.micro_batch * a.seq_len
    flops = ours_model.train_flops_per_sample() * a.micro_batch
    peak = device_peak_flops(dev, "bf16")
    rows = {}
    for name, ts in times.items():
        best = sorted(ts)[len(ts) // 2]
        rows[name] = {"step_s": best, "tokens_per_s": tokens / best,
                      "mfu": flops / best / peak if peak else None}
    params = sum(p.numel() for p in ours_model.parameters())
    print(f"GPT {a.size} ({params / 1e6:.0f}M params), seq {a.seq_len}, micro-batch {a.micro_batch}, "
          f"bf16, {torch.cuda.get_device_name(dev)}, compile={a.compile}")
    for name, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{name:<6} {r['step_s'] * 1e3:8.1f} ms/step {r['tokens_per_s']:12,.0f} tok/s  MFU {mfu}")
    ratio = rows["ours"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
    print(f"tokens/s ours / plain = {ratio:.3f} (target >= 0.97); peak memory "
          f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows, "ratio": ratio, "params": params}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
