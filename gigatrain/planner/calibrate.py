"""``gigatrain plan --calibrate``: measure this machine and write a device file for ``--gpu``.

Measured: the matmul rate at several sizes in the compute dtype (fp32 on a CPU, bf16 on a GPU),
with the threads one of ``ranks`` local processes gets, and the memory bandwidth (a large copy),
both scaled by each rank's share of the cores on a CPU with fewer cores than ranks; all-reduce,
all-gather, reduce-scatter and point-to-point times of ``ranks`` local gloo processes at several
sizes, fitted to the alpha-beta model (latency per ring step, bandwidth), all ops together and
each op alone (``Device.collective_fits``). Every time is the fastest of several windows, the
one least disturbed by other processes (what ``timeit`` recommends on a shared machine). The
file holds measured rates, so its ``link_eff`` is 1.
"""
from __future__ import annotations

import os
import time

__all__ = ["calibrate", "measure_matmul", "matmul_envelope", "fit_alpha_beta"]

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
    finally:
        torch.set_num_threads(threads)
    table = matmul_envelope(table)
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
    return Device(name=name or f"calibrated-{socket.gethostname()}", flops=flops, dtype=dtype, mem_bytes=mem,
                  mem_bw=mem_bw, intra_bw=bw, inter_bw=bw, intra_alpha=alpha, inter_alpha=alpha, link_eff=1.0,
                  matmul_table=tuple(table), host_mem_bytes=host / ranks, pcie_bw=mem_bw,
                  cpu_adam_rate=PRESETS["cpu"].cpu_adam_rate, runtime_bytes=runtime, alloc_margin=margin,
                  gpus_per_node=ranks, comm_overlap=cuda, collective_fits=tuple(fits),
                  source=f"measured by gigatrain plan --calibrate on {socket.gethostname()}, {ranks} gloo ranks, "
                         f"{time.strftime('%Y-%m-%d')}")


def _mem_total() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 16.0 * 2**30
