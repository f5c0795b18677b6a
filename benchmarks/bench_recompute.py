"""Activation recomputation: step time and activation bytes kept per block, by mode.

    python benchmarks/bench_recompute.py [--rounds 6] [--out DIR]

One process, the benchmark GPT (benchmarks/common.py), AdamW fp32. The three modes train copies of
the same model in alternating rounds (the machine's load drifts; alternating spreads it evenly);
the step time is the median over all timed steps, the overhead the ratio to ``none``. Bytes kept
per block are measured with saved-tensor hooks (``recompute.saved_activation_bytes``) for the
default CPU attention kernel and for the math kernel, which materialises the T x T scores that
Korthikanti et al.'s formula counts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from common import add_gpt_args, alternate_steps, gpt_factory  # noqa: E402
from gigatrain.parallel.recompute import RecomputePolicy, apply_recompute, saved_activation_bytes  # noqa: E402

MODES = ("none", "selective", "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gpt_args(ap, bucket_mb=25.0, rounds=6, steps_per_round=4, warmup=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    make = gpt_factory(vars(args))
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]

    models = {m: apply_recompute(make(), RecomputePolicy(m)) for m in MODES}
    step, run = alternate_steps(models, (x, y), rounds=args.rounds, steps_per_round=args.steps_per_round)
    for m in MODES:
        for _ in range(args.warmup):
            step(m)
    times, losses = run()

    kept = {}
    h = models["none"].stem(x).detach().requires_grad_()
    for kernel, ctx in (("default", None), ("math", SDPBackend.MATH)):
        for m in MODES:
            blk = models[m].blocks[0]
            if ctx is None:
                kept[(kernel, m)] = saved_activation_bytes(blk, h)
            else:
                with sdpa_kernel(ctx):
                    kept[(kernel, m)] = saved_activation_bytes(blk, h)

    base = statistics.median(times["none"])
    rows = []
    print(f"GPT {sum(p.numel() for p in models['none'].parameters()) / 1e6:.2f}M params, {args.n_layer} layers, "
          f"d {args.d_model}, heads {args.n_head}, seq {args.seq_len}, micro-batch {args.micro_batch}, one process, "
          f"{args.threads} thread(s)")
    print("| mode | step (ms) | vs none | kept/block, default kernel (KiB) | kept/block, math kernel (KiB) |")
    print("|---|---|---|---|---|")
    for m in MODES:
        med = statistics.median(times[m])
        row = {"mode": m, "step_ms": med * 1e3, "ratio": med / base,
               "kept_default": kept[("default", m)], "kept_math": kept[("math", m)],
               "same_losses": losses[m] == losses["none"]}
        rows.append(row)
        print(f"| {m} | {med * 1e3:.1f} | {med / base:.3f} | {row['kept_default']['total'] / 1024:.0f} | "
              f"{row['kept_math']['total'] / 1024:.0f} |")
    print("losses identical to none:", {r["mode"]: r["same_losses"] for r in rows})
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_recompute.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
