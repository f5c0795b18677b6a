"""A/B of the pipeline runtime's receives posted ahead (``PipelineRuntime.RECV_AHEAD``): the same
two gloo ranks alternate a runtime that posts up to two receives ahead of their place in the
schedule and one that posts each receive when the schedule reaches it (``RECV_AHEAD = 0``), step
by step, so load drifts hit both alike; median and fastest step per schedule.

    python benchmarks/bench_recv_ahead.py [--d-model 128 --seq 64 --steps 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import bench_pipeline as bp  # noqa: E402

SCHEDULES = [("gpipe", "gpipe", 1), ("1f1b", "1f1b", 1), ("interleaved V=2", "interleaved", 2),
             ("zb V=1", "zb", 1), ("zb V=2", "zb", 2)]


def _worker(rank, world, cfg):
    from gigatrain.parallel.pipeline.runtime import PipelineRuntime, split_microbatches

    torch.set_num_threads(1)
    group = dist.new_group(list(range(world)))
    default = PipelineRuntime.RECV_AHEAD
    out = {}
    for label, kind, V in SCHEDULES:
        runs = {0: bp._Ours(cfg, group, kind, V), default: bp._Ours(cfg, group, kind, V)}
        times = {k: [] for k in runs}
        for step in range(2 + cfg["steps"]):
            for ahead, o in runs.items():
                PipelineRuntime.RECV_AHEAD = ahead
                mbs = split_microbatches(bp._batch(cfg, o.model, step), cfg["microbatches"])
                dt = bp._timed(group, lambda: o.rt.step(mbs))
                for p in o.rt.parameters():
                    p.grad = None
                if step >= 2:
                    times[ahead].append(dt)
        PipelineRuntime.RECV_AHEAD = default
        out[label] = {k: (statistics.median(t), min(t)) for k, t in times.items()}
    return out, default


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    cfg = dict(layers=8, d_model=args.d_model, heads=4, seq=args.seq, vocab=512, mb=4, microbatches=8,
               steps=args.steps)
    from gigatrain.distributed.spawn import spawn

    res, ahead = spawn(_worker, 2, cfg, timeout_s=1200)[0]
    print(f"GPT 8x{args.d_model}, seq {args.seq}, pp=2 gloo ranks, 8 micro-batches of 4, {args.steps} steps each")
    print(f"{'schedule':<16} {'posted in place ms (min)':>26} {f'{ahead} ahead ms (min)':>20} {'shorter':>8}")
    for label, r in res.items():
        (m0, f0), (m1, f1) = r[0], r[ahead]
        print(f"{label:<16} {m0*1e3:17.1f} ({f0*1e3:6.1f}) {m1*1e3:11.1f} ({f1*1e3:6.1f}) {1 - m1/m0:8.1%}")


if __name__ == "__main__":
    main()
