"""CPU AdamW throughput: gigatrain's one-pass kernel against torch.optim.AdamW on the CPU.

Every variant updates the same flat fp32 buffers (params, exp_avg, exp_avg_sq), one step each
in turn, round after round, so all of them see the same machine load; we report the median
(and best) seconds per step as parameters per second and the ratio to the torch peer:

  fp32 gradients   torch AdamW(fused=True)  <- peer
                   torch AdamW(foreach=True)
                   ours, C++ kernel
                   ours, torch fallback
  bf16 gradients,  torch: copy grads to an fp32 buffer, AdamW(fused=True), copy params to bf16  <- peer
  bf16 param copy  ours, C++ kernel (one pass)
                   ours, torch fallback

    python benchmarks/bench_cpu_adam.py --sizes 10M,100M --out out/bench_cpu_adam.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gigatrain.optim import cpu_adam  # noqa: E402

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def make_variants(n: int, threads: int) -> tuple[dict, dict]:
    """Step functions sharing one set of buffers, and the peer each one is compared with."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=gen)
    g32 = torch.randn(n, generator=gen) * 1e-2
    g16 = g32.bfloat16()
    m, v = torch.zeros(n), torch.zeros(n)
    out16 = torch.empty(n, dtype=torch.bfloat16)
    g_tmp = torch.empty(n)  # the fp32 gradient buffer the torch pipeline needs
    param = torch.nn.Parameter(p)
    param.grad = g32

    def torch_opt(**kw):
        opt = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)
        # Share the moments so every variant touches the same memory.
        opt.state[param] = {"step": torch.tensor(0.0), "exp_avg": m, "exp_avg_sq": v}
        return opt

    fused, foreach = torch_opt(fused=True), torch_opt(foreach=True)
    counter = [0]

    def ours(grad, out=None, backend=None):
        def run():
            counter[0] += 1
            cpu_adam.adamw_step_(
                p, grad, m, v, counter[0], LR, BETAS[0], BETAS[1], EPS, WD,
                out_lowp=out, num_threads=threads, backend=backend,
            )  # fmt: skip

        return run

    def torch_bf16_pipeline():
        g_tmp.copy_(g16)
        param.grad = g_tmp
        fused.step()
        out16.copy_(p)
        param.grad = g32

    variants = {
        "torch_fused": fused.step,
        "torch_foreach": foreach.step,
        "ours_cpp": ours(g32),
        "ours_torch": ours(g32, backend="torch"),
        "torch_fused_bf16": torch_bf16_pipeline,
        "ours_cpp_bf16": ours(g16, out16),
        "ours_torch_bf16": ours(g16, out16, backend="torch"),
    }
    peers = {name: ("torch_fused_bf16" if "bf16" in name else "torch_fused") for name in variants}
    if cpu_adam.backend() != "cpp":
        del variants["ours_cpp"], variants["ours_cpp_bf16"]
    return variants, peers


def bench_size(n: int, rounds: int, threads: int, skip: set[str]) -> list[dict]:
    variants, peers = make_variants(n, threads)
    variants = {k: f for k, f in variants.items() if k not in skip}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():  # warm-up: first touch of state, thread pools
        f()
    for _ in range(rounds):
        for name, f in variants.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        peer = peers[name]
        peer_med = statistics.median(times[peer]) if peer in times else float("nan")
        rows.append(
            dict(
                size=n, variant=name, peer=peer, median_s=med, best_s=min(ts),
                params_per_s=n / med, best_params_per_s=n / min(ts), ratio_vs_peer=peer_med / med,
            )  # fmt: skip
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10M,100M", help="comma-separated parameter counts (K/M/G suffixes)")
    ap.add_argument("--rounds", type=int, default=9, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch and kernel threads")
    ap.add_argument("--skip", default="", help="comma-separated variants to leave out (e.g. torch_foreach)")
    ap.add_argument("--out", default="out/bench_cpu_adam.json", help="where to write the JSON results")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    info = cpu_adam.build_info()
    info["first_load_s"] = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {args.threads} threads, {cpu_model()}")
    print(f"kernel: {info}")
    rows = []
    skip = {s for s in args.skip.split(",") if s}
    for n in [parse_size(s) for s in args.sizes.split(",")]:
        size_rows = bench_size(n, args.rounds, args.threads, skip)
        rows += size_rows
        print(f"\n{n / 1e6:g}M params, {args.rounds} rounds")
        print(f"{'variant':<18} {'median Gparam/s':>16} {'best Gparam/s':>14} {'vs peer':>8}  peer")
        for r in size_rows:
            print(
                f"{r['variant']:<18} {r['params_per_s'] / 1e9:>16.3f} {r['best_params_per_s'] / 1e9:>14.3f} "
                f"{r['ratio_vs_peer']:>8.2f}  {r['peer']}"
            )
    result = dict(
        date=time.strftime("%Y-%m-%d"), machine=cpu_model(), cores=os.cpu_count(), threads=args.threads,
        torch=torch.__version__, python=platform.python_version(), kernel=info, results=rows,
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
