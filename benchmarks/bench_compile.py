"""``train.compile``: step time of compiled blocks against eager, one process.

    python benchmarks/bench_compile.py [--mode default] [--rounds 6] [--out DIR]

The benchmark GPT (benchmarks/common.py), AdamW fp32, one process. The blocks of one copy are
compiled as ``gigatrain.parallel.compile.apply_compile`` does (each block's forward on its own);
the eager copy starts from the same weights. After the warm-up steps (which include compilation,
reported separately), the two alternate in rounds; the figure is the ratio of median step times.
The losses of the two are compared step by step (fp32: within 1e-5).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import add_gpt_args, alternate_steps, gpt_factory  # noqa: E402
from gigatrain.parallel.compile import CompilePolicy, apply_compile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gpt_args(ap, bucket_mb=25.0, rounds=6, steps_per_round=4, warmup=3)
    ap.add_argument("--mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    make = gpt_factory(vars(args))
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    models = {"eager": make(), "compiled": apply_compile(make(), CompilePolicy(args.mode))}
    step, run = alternate_steps(models, (x, y), rounds=args.rounds, steps_per_round=args.steps_per_round)
    losses = {k: [] for k in models}
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        losses["compiled"].append(step("compiled"))
    warm = time.perf_counter() - t0
    for _ in range(args.warmup):
        losses["eager"].append(step("eager"))
    times, timed = run()
    for k in models:
        losses[k] += timed[k]
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["compiled"], losses["eager"]))
    print(f"GPT {sum(p.numel() for p in models['eager'].parameters()) / 1e6:.2f}M params, {args.n_layer} layers, "
          f"d {args.d_model}, seq {args.seq_len}, micro-batch {args.micro_batch}, one process, "
          f"{args.threads} thread(s), compile mode {args.mode}")
    print("| engine | step (ms) | vs eager |")
    print("|---|---|---|")
    print(f"| eager | {eager * 1e3:.1f} | 1.000 |")
    print(f"| compiled blocks | {comp * 1e3:.1f} | {comp / eager:.3f} |")
    print(f"warm-up with compilation: {warm:.1f} s for {args.warmup} steps; largest relative loss difference "
          f"{worst:.1e} over {len(losses['eager'])} steps")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_compile.json").write_text(json.dumps(
            {"args": vars(args), "eager_ms": eager * 1e3, "compiled_ms": comp * 1e3, "ratio": comp / eager,
             "compile_warmup_s": warm, "max_rel_loss_diff": worst}, indent=1))


if __name__ == "__main__":
    main()
