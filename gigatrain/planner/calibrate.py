"""``gigatrain plan --calibrate``: measure this machine and write a device file for ``--gpu``.

Measured: the matmul rate at several sizes in the compute dtype (fp32 on a CPU, bf16 on a GPU),
with the threads one of ``ranks`` local processes gets, and the memory bandwidth (a large copy),
both scaled by each rank's share of the cores on a CPU with fewer cores than ranks; all-reduce,
all-gather, reduce-scatter and point-to-point times of ``ranks`` local gloo processes at several
sizes, fitted to the alpha-beta model (latency per ring step, bandwidth), all ops together and
each op alone (``Device.collective_fits``); and the fixed costs (``measure_blocks``,
``fit_fixed``): a real transformer block, and a chunk of two, run forward and forward+backward
at four micro-batch sizes, and the times fitted against the cost model's own prediction for
that work, ``t = action + blocks * (block_fixed + slope * predicted)``: what is left at zero
work is the per-block cost of dispatching its operators and the per-call overhead of a chunk.
Every time is the fastest of several windows, the one least disturbed by other processes (what
``timeit`` recommends on a shared machine). The file holds measured rates, so its
``link_eff`` is 1.
"""
from __future__ import annotations

import os
import time

__all__ = ["calibrate", "measure_matmul", "matmul_envelope", "fit_alpha_beta", "measure_blocks", "fit_fixed",
           "calibrate_fixed"]

_SIZES_BYTES = (4 << 10, 256 << 10, 4 << 20, 16 << 20)


def _timeit(fn, min_s: float = 0.2, sync=lambda: None, windows: int = 1) -> float:
    """Seconds per call in the fastest of ``windows`` windows of at least ``min_s`` each."""
    fn()
    sync()
    out = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync()
            dt = time.perf_counter() - t0
            if dt >= min_s and n >= 3:
                out.append(dt / n)
                break
    return min(out)


def measure_matmul(device: str = "cpu", dtype=None, sizes=(128, 256, 512, 1024, 2048)) -> list[tuple[float, float]]:
    """(FLOPs per call, FLOP/s) of square matmuls of the given sides (fastest of 10 windows)."""
    import torch

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        dt = _timeit(lambda: a @ b, min_s=0.05, sync=sync, windows=10)
        out.append((2.0 * n ** 3, 2.0 * n ** 3 / dt))
    return out


def matmul_envelope(table) -> list[tuple[float, float]]:
    """``table`` (FLOPs, FLOP/s) sorted by size, each rate raised to the best rate of the sizes
    below it: a larger matmul can always run as tiles of a smaller one, so a dip is a window
    disturbed by other processes, not a property of the device."""
    out, best = [], 0.0
    for f, r in sorted(table):
        best = max(best, r)
        out.append((f, best))
    return out


def _mem_bw(device: str = "cpu") -> float:
    import torch

    x = torch.empty(64 << 20 if device == "cpu" else 256 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dt = _timeit(lambda: y.copy_(x), sync=sync, windows=3)
    return 2 * x.numel() / dt


def _timed_reps(fn, reps: int, windows: int = 3) -> float:
    """Seconds per call in the fastest of ``windows`` windows of ``reps`` calls (the same number
    of calls on every rank: a time budget per rank would not match up)."""
    fn()
    out = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps)
    return min(out)


def _collectives(rank: int, world: int, sizes) -> dict:
    import torch
    import torch.distributed as dist

    out = {}
    for nbytes in sizes:
        reps = max(3, min(30, int(32e6 / nbytes)))
        n = nbytes // 4
        full = torch.ones(n)
        shard = torch.ones(n // world)
        ops = {
            "all_reduce": lambda: dist.all_reduce(full),
            "all_gather": lambda: dist.all_gather_single(full[: (n // world) * world], shard),
            "reduce_scatter": lambda: dist.reduce_scatter_single(shard, full[: (n // world) * world]),
        }
        for name, fn in ops.items():
            dist.barrier()
            out[(name, nbytes)] = _timed_reps(fn, reps)

        def p2p():
            if rank == 0:
                dist.send(full, 1)
                dist.recv(full, 1)
            elif rank == 1:
                dist.recv(full, 0)
                dist.send(full, 0)
        dist.barrier()
        out[("p2p", nbytes)] = _timed_reps(p2p, reps) / 2
    return out


def fit_alpha_beta(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares of ``t = steps * alpha + volume / bw`` over (steps, volume bytes, seconds)
    points, in relative error (each row divided by its ``t``: microsecond messages count as much
    as millisecond ones, so the latency is not lost under the bandwidth term); returns (alpha,
    bw), both kept positive."""
    import numpy as np

    A = np.array([[s / t, v / t] for s, v, t in points], dtype=float)
    coef, *_ = np.linalg.lstsq(A, np.ones(len(points)), rcond=None)
    alpha = max(float(coef[0]), 1e-7)
    inv_bw = float(coef[1])
    if inv_bw <= 0:  # latency-dominated everywhere: take the largest message alone
        s, v, t = max(points, key=lambda p: p[1])
        inv_bw = max(t - s * alpha, 1e-12) / v
    return alpha, 1.0 / inv_bw


# The block the fixed costs are measured on: small enough that its fixed cost is a visible part
# of its time at micro-batch 1, as it is in the models where it matters.
_FIXED_BLOCK = dict(d_model=256, n_head=8, seq=128)
_FIXED_MICRO = (1, 2, 4, 8)
_FIXED_CHUNKS = (1, 2)


def measure_blocks(device: str = "cpu", dtype=None, micro=_FIXED_MICRO, chunks=_FIXED_CHUNKS,
                   d_model: int = _FIXED_BLOCK["d_model"], n_head: int = _FIXED_BLOCK["n_head"],
                   seq: int = _FIXED_BLOCK["seq"]) -> list[tuple[int, int, float, float]]:
    """(blocks per chunk, micro-batch, forward s, forward+backward s) of a chunk of gigatrain's
    GPT blocks (``models.gpt.Block``), its input requiring a gradient as a pipeline stage's
    does; each the fastest of 5 windows."""
    import torch
    from torch import nn

    from ..models.gpt import Block

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    out = []
    for k in chunks:
        chunk = nn.Sequential(*[Block(d_model, n_head, causal=True) for _ in range(k)]).to(device=device, dtype=dtype)
        for b in micro:
            x = torch.randn(b, seq, d_model, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(b, seq, d_model, device=device, dtype=dtype)

            def fwd():
                chunk(x)

            def fwd_bwd():
                torch.autograd.backward(chunk(x), grad_tensors=g)

            tf = _timeit(fwd, min_s=0.03, sync=sync, windows=5)
            tfb = _timeit(fwd_bwd, min_s=0.03, sync=sync, windows=5)
            out.append((k, b, tf, tfb))
        del chunk
    return out


def fit_fixed(points: list[tuple[int, float, float]]) -> tuple[float, float, float]:
    """Least squares of ``t = action + blocks * (fixed + slope * predicted)`` over (blocks per
    call, the cost model's seconds per block without fixed costs, measured seconds per call)
    points, in relative error; returns (action, fixed, slope). A coefficient the fit makes
    negative (noise on a cost near zero) is set to 0 and the others refitted."""
    import numpy as np

    def solve(cols):
        A = np.array([[c(k, v) / t for c in cols] for k, v, t in points], dtype=float)
        coef, *_ = np.linalg.lstsq(A, np.ones(len(points)), rcond=None)
        return [float(x) for x in coef]

    terms = {"action": lambda k, v: 1.0, "fixed": lambda k, v: float(k), "slope": lambda k, v: k * v}
    names = list(terms)
    while True:
        coef = dict(zip(names, solve([terms[n] for n in names])))
        neg = [n for n in names if n != "slope" and coef[n] < 0]
        if not neg:
            break
        names.remove(min(neg, key=lambda n: coef[n]))
    return coef.get("action", 0.0), coef.get("fixed", 0.0), max(coef["slope"], 0.0)


def calibrate_fixed(dev, measured=None, device: str = "cpu", scale: float = 1.0):
    """``dev`` with its fixed costs fitted (``fit_fixed``) from ``measured`` (``measure_blocks``'
    rows; measured now when None) against ``dev``'s own prediction of the same work, every time
    multiplied by ``scale`` (the ranks' share of the cores, as for the matmul rates)."""
    from dataclasses import replace

    from .cost import block_times
    from .memory import Job, Layout, ModelSpec

    measured = measure_blocks(device) if measured is None else measured
    base = replace(dev, block_fixed_f=0.0, block_fixed_b=0.0, action_overhead=0.0)
    spec = ModelSpec("gpt", 1, _FIXED_BLOCK["d_model"], _FIXED_BLOCK["n_head"], _FIXED_BLOCK["seq"], 256)
    job = Job(spec, 8, param_bytes=2 if dev.dtype == "bf16" else 4)
    fwd, both = [], []
    for k, b, tf, tfb in measured:
        bt = block_times(job, Layout(1, 1, 1, micro_batch=b), base)
        fwd.append((k, bt.f, tf * scale))
        both.append((k, bt.f + bt.b + bt.w, tfb * scale))
    act_f, fix_f, _ = fit_fixed(fwd)
    act_fb, fix_fb, _ = fit_fixed(both)
    return replace(dev, block_fixed_f=fix_f, block_fixed_b=max(fix_fb - fix_f, 0.0),
                   action_overhead=act_fb / 2)


def calibrate(ranks: int = 2, name: str | None = None, sizes_bytes=_SIZES_BYTES):
    """Measure this machine as one node of ``ranks`` devices; returns a ``presets.Device``."""
    import socket

    import torch

    from ..distributed.spawn import spawn
    from .presets import PRESETS, Device

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    sizes = (256, 512, 1024, 2048, 4096, 8192) if cuda else (64, 128, 256, 512, 1024)
    if not cuda:
        torch.set_num_threads(max(1, cores // ranks))  # what each of `ranks` local processes gets
    try:
        table = measure_matmul(dev, sizes=sizes)
        mem_bw = _mem_bw(dev)
        blocks = measure_blocks(dev)
    finally:
        torch.set_num_threads(threads)
    table = matmul_envelope(table)
    share = 1.0
    if not cuda and ranks > cores:
        # Busy ranks share the cores: each computes at its share of one core's rate.
        share = cores / ranks
        table = [(f, r * share) for f, r in table]
        mem_bw *= share
    alpha, bw, fits = 60e-6, 1e9, []
    if ranks > 1:
        res = spawn(_collectives, ranks, list(sizes_bytes), timeout_s=120)[0]
        by_op: dict[str, list] = {}
        for (op, nbytes), t in res.items():
            if op == "p2p":
                by_op.setdefault(op, []).append((1, nbytes, t))
            else:
                steps = 2 * (ranks - 1) if op == "all_reduce" else ranks - 1
                by_op.setdefault(op, []).append((steps, steps / ranks * nbytes, t))
        alpha, bw = fit_alpha_beta([p for pts in by_op.values() for p in pts])
        fits = [(op, *fit_alpha_beta(pts)) for op, pts in sorted(by_op.items())]
    host = _mem_total()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        base = PRESETS["h100-80g"]
        mem, flops, dtype = float(props.total_memory), base.flops, "bf16"
        runtime, margin = base.runtime_bytes, base.alloc_margin
    else:
        mem, flops, dtype = host / ranks, max(r for _, r in table) * 1.2, "fp32"
        runtime, margin = PRESETS["cpu"].runtime_bytes, 0.0
    dev0 = Device(name=name or f"calibrated-{socket.gethostname()}", flops=flops, dtype=dtype, mem_bytes=mem,
                  mem_bw=mem_bw, intra_bw=bw, inter_bw=bw, intra_alpha=alpha, inter_alpha=alpha, link_eff=1.0,
                  matmul_table=tuple(table), host_mem_bytes=host / ranks, pcie_bw=mem_bw,
                  cpu_adam_rate=PRESETS["cpu"].cpu_adam_rate, runtime_bytes=runtime, alloc_margin=margin,
                  gpus_per_node=ranks, comm_overlap=cuda, collective_fits=tuple(fits), core_share=share,
                  source=f"measured by gigatrain plan --calibrate on {socket.gethostname()}, {ranks} gloo ranks, "
                         f"{time.strftime('%Y-%m-%d')}")
    return calibrate_fixed(dev0, blocks, dev, scale=1.0 / share)


def _mem_total() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 16.0 * 2**30
