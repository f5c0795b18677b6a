"""``gigatrain plan``: which layout to run a job with, before anything is launched.

    gigatrain plan [CONFIG] [key=value ...] --gpus N [--gpus-per-node G] [--gpu NAME|FILE.json]
                   [--top K] [--json FILE] [--chart FILE.png] [--save FILE.yaml]
    gigatrain plan --calibrate [--ranks N] [--out FILE.json]

Layout keys given on the command line (``parallel.*``, ``train.micro_batch``,
``train.recompute``) are fixed; everything else about the layout is searched. Exit codes: 0 a
plan was found; 1 nothing fits on these devices (the message says what overflows); 2 bad input
(config, unknown device, a fixed layout that cannot exist).
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_plan_parser", "run_plan"]


def add_plan_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="predict memory and speed of every layout and pick the best")
    p.add_argument("items", nargs="*", metavar="[CONFIG] key=value",
                   help="a config file and overrides; parallel.*, train.micro_batch and train.recompute given "
                        "here are fixed, the rest of the layout is searched")
    p.add_argument("--gpus", type=int, default=None, help="devices in the cluster (default: the config's nproc or 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="devices per node (default: the preset's, at most --gpus)")
    p.add_argument("--gpu", default=None, help="device preset (a100-40g, a100-80g, h100-80g, h200, cpu) or a "
                                               "JSON file from --calibrate (default: cpu, or the local GPU)")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    p.add_argument("--json", default=None, metavar="FILE", help="write every predicted candidate as JSON")
    p.add_argument("--chart", default=None, metavar="FILE.png", help="plot predicted time against memory")
    p.add_argument("--save", default=None, metavar="FILE.yaml", help="write the best layout as a ready config")
    p.add_argument("--calibrate", action="store_true", help="measure this machine and write a device file")
    p.add_argument("--ranks", type=int, default=2, help="--calibrate: local gloo processes for the collectives")
    p.add_argument("--out", default=None, metavar="FILE.json", help="--calibrate: where to write the device file")
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"gigatrain: error: {msg}", file=sys.stderr, flush=True)
    return code


def run_plan(args, split_args) -> int:
    """Run ``gigatrain plan`` for parsed ``args``; ``split_args`` separates the config path from
    the overrides (the CLI's own rule). Returns the exit code."""
    from ..config import ConfigError, load_config
    from .plan import (explain_alternatives, layout_overrides, no_fit_message, plan_config, resolve_device,
                       split_overrides)
    from .report import format_table, ready_config, write_chart, write_json
    from .search import PlanError

    if args.calibrate:
        return _calibrate(args)
    try:
        path, overrides = split_args(args.items)
        to_config, fixed = split_overrides(overrides)
        cfg = load_config(path, to_config)
        dev = resolve_device(args.gpu)
        n = args.gpus if args.gpus is not None else (cfg.nproc or 1)
        if n < 1:
            return _fail(f"--gpus {n}: the number of devices must be at least 1.")
        gpn = args.gpus_per_node if args.gpus_per_node is not None else min(n, dev.gpus_per_node)
        if gpn < 1:
            return _fail(f"--gpus-per-node {gpn}: must be at least 1.")
        res = plan_config(cfg, n, dev, fixed, gpus_per_node=gpn, keep=max(50, args.top))
    except (ConfigError, ValueError) as e:
        code = 1 if isinstance(e, PlanError) and e.no_fit else 2
        return _fail(str(e).rstrip(".") + ".", code)

    job = res.job
    m = job.model
    print(f"gigatrain plan: {m.name} {m.n_layer} layers x {m.d_model} ({m.total_params() / 1e9:.3g}B parameters), "
          f"seq {m.seq}, vocab {m.vocab}, global batch {job.global_batch}, "
          f"{'bf16' if job.param_bytes == 2 else 'fp32'}; {n} x {dev.name} ({gpn} per node)")
    for note in m.notes:
        print(f"  note: {note}")
    if fixed:
        print("  fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    print(f"  searched in {res.search_s:.2f} s: {len(res.candidates)} layouts predicted, "
          f"{len(res.fitting)} fit; {res.pruned} pruned by bounds")
    if args.json:
        write_json(res, args.json)
        print(f"  wrote {args.json}")
    if args.chart:
        write_chart(res, args.chart)
        print(f"  wrote {args.chart}")
    best = res.best
    if best is None:
        return _fail(no_fit_message(res), 1)
    print()
    print(format_table(res, args.top))
    print()
    from ..config import config_keys

    ov = layout_overrides(best.layout, set(config_keys()))
    mem = best.mem
    print(f"best: {best.layout.describe()}: {best.step_s:.4g} s/step, {best.tflops_per_gpu:.3g} TFLOP/s per GPU, "
          f"{mem.peak / 2**30:.2f} GiB per rank (states {mem.states / 2**30:.2f}, activations "
          f"{mem.activations / 2**30:.2f}, other {(mem.peak - mem.states - mem.activations) / 2**30:.2f})")
    args_text = " ".join(f"{k}={_yaml_scalar(v)}" for k, v in ov.items())
    launch = f"--nproc {n}" if n <= gpn else f"(on {n // gpn} nodes under torchrun or srun)"
    print(f"  run it: gigatrain train {path + ' ' if path else ''}{args_text} {launch}")
    alts = explain_alternatives(res)
    if alts:
        print("alternatives:")
        for line in alts:
            print("  " + line)
    if args.save:
        with open(args.save, "w") as f:
            f.write(ready_config(cfg, ov))
        print(f"  wrote {args.save}")
    return 0


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _calibrate(args) -> int:
    from .calibrate import calibrate

    if args.ranks < 1:
        return _fail(f"--ranks {args.ranks}: must be at least 1.")
    dev = calibrate(ranks=args.ranks)
    text = dev.to_json()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}: use it with gigatrain plan --gpu {args.out}")
    else:
        print(text)
    return 0
