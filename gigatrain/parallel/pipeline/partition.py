"""Cutting ``model.blocks`` into contiguous pipeline stages.

A ``Partition`` gives each stage a contiguous range of blocks; stage 0 also runs ``model.stem``
and the last stage ``model.head`` (and the loss). Stages are numbered globally: with ``pp`` ranks
and ``V`` chunks per rank there are ``pp * V`` of them and stage ``s`` runs on rank ``s % pp``.

Ways to choose one:
- ``uniform``: equal block counts (the extra blocks go to the middle stages, which carry no
  stem or head).
- ``balance_params``: minimise the variance of per-stage parameter counts (memory balance).
- ``balance_time``: minimise the slowest stage's time (throughput balance), exactly, then among
  those optima the variance of stage times.
- ``explicit``: a user's list of per-stage block counts, validated.
``partition_model`` picks one by name, measures or counts what it needs, and returns the
partition with a table that explains it (``describe_partition``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "Partition", "BlockCosts", "uniform", "explicit", "balance_params", "balance_time",
    "count_params", "measure_block_times", "stage_loads", "describe_partition", "partition_model",
]


@dataclass(frozen=True)
class Partition:
    """Stage ``s`` runs ``blocks[bounds[s]:bounds[s+1]]``."""

    bounds: tuple[int, ...]

    def __post_init__(self):
        b = tuple(int(x) for x in self.bounds)
        object.__setattr__(self, "bounds", b)
        if len(b) < 2 or b[0] != 0 or any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
            raise ValueError(f"partition bounds must start at 0 and strictly increase, got {b}")

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "Partition":
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + int(n))
        return cls(tuple(bounds))

    @property
    def n_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def n_blocks(self) -> int:
        return self.bounds[-1]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.bounds[i + 1] - self.bounds[i] for i in range(self.n_stages))

    def blocks(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])


@dataclass(frozen=True)
class BlockCosts:
    """A cost (parameters, seconds, ...) for the stem, every block, and the head."""

    stem: float
    blocks: tuple[float, ...]
    head: float


def _check(n_blocks: int, n_stages: int) -> None:
    if n_stages < 1:
        raise ValueError(f"need at least one stage, got {n_stages}")
    if n_blocks < n_stages:
        raise ValueError(f"cannot cut {n_blocks} blocks into {n_stages} stages: every stage needs "
                         "at least one block (use fewer stages or a model with more blocks)")


def uniform(n_blocks: int, n_stages: int) -> Partition:
    """Equal block counts; when they do not divide, the middle stages get one more (the first
    and last stages also carry the stem and the head)."""
    _check(n_blocks, n_stages)
    base, extra = divmod(n_blocks, n_stages)
    # Hand the extras to the stages closest to the middle.
    order = sorted(range(n_stages), key=lambda s: (abs(s - (n_stages - 1) / 2), s))
    sizes = [base] * n_stages
    for s in order[:extra]:
        sizes[s] += 1
    return Partition.from_sizes(sizes)


def explicit(sizes: Sequence[int], n_blocks: int, n_stages: int) -> Partition:
    """Per-stage block counts chosen by the user, checked against the model and the layout."""
    sizes = [int(x) for x in sizes]
    if len(sizes) != n_stages:
        raise ValueError(f"explicit partition has {len(sizes)} entries but the pipeline has "
                         f"{n_stages} stages (pp x virtual)")
    if any(x < 1 for x in sizes):
        raise ValueError(f"every stage needs at least one block, got {sizes}")
    if sum(sizes) != n_blocks:
        raise ValueError(f"explicit partition {sizes} covers {sum(sizes)} blocks, the model has {n_blocks}")
    return Partition.from_sizes(sizes)


def _loads(costs: Sequence[float], bounds: Sequence[int], stem: float, head: float) -> list[float]:
    loads = [float(sum(costs[bounds[s]:bounds[s + 1]])) for s in range(len(bounds) - 1)]
    loads[0] += stem
    loads[-1] += head
    return loads


def _prefix(costs: Sequence[float]) -> list[float]:
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + float(c))
    return pre


def _dp(costs: Sequence[float], n_stages: int, stem: float, head: float, combine, limit=None) -> Partition:
    """Exact dynamic programme over cut points. ``combine(best_so_far, stage_load)`` folds one
    more stage into a prefix's score (``max`` for the slowest stage, ``a + x*x`` for the sum of
    squares); stages heavier than ``limit`` are not allowed."""
    n = len(costs)
    pre = _prefix(costs)
    INF = float("inf")
    # best[k][i]: best score cutting the first i blocks into k stages; arg for reconstruction.
    best = [[INF] * (n + 1) for _ in range(n_stages + 1)]
    arg = [[-1] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        last = k == n_stages
        for i in range(k, n - (n_stages - k) + 1):
            if last and i != n:
                continue
            for j in range(k - 1, i):
                if best[k - 1][j] == INF:
                    continue
                load = pre[i] - pre[j] + (stem if k == 1 else 0.0) + (head if last else 0.0)
                if limit is not None and load > limit:
                    continue
                score = combine(best[k - 1][j], load)
                if score < best[k][i]:
                    best[k][i], arg[k][i] = score, j
    if best[n_stages][n] == INF:
        raise ValueError("no partition satisfies the constraints")
    bounds = [n]
    for k in range(n_stages, 0, -1):
        bounds.append(arg[k][bounds[-1]])
    return Partition(tuple(reversed(bounds)))


def balance_params(block_params: Sequence[float], n_stages: int, *, stem: float = 0.0, head: float = 0.0) -> Partition:
    """Contiguous stages minimising the variance of per-stage parameter counts, with ``stem``
    counted on the first stage and ``head`` on the last. (The mean is fixed, so this minimises
    the sum of squared stage sizes; exact dynamic programme, O(n_stages * n_blocks^2).)"""
    _check(len(block_params), n_stages)
    return _dp(block_params, n_stages, stem, head, lambda acc, x: acc + x * x)


def balance_time(block_times: Sequence[float], n_stages: int, *, stem: float = 0.0, head: float = 0.0) -> Partition:
    """Contiguous stages minimising the slowest stage's time (the pipeline's step rate), stem on
    the first stage and head on the last. Exact: a min-max dynamic programme finds the optimum
    T*, then a second one picks, among partitions whose stages all fit in T*, the one with the
    smallest variance of stage times."""
    _check(len(block_times), n_stages)
    opt = _dp(block_times, n_stages, stem, head, max)
    t_star = max(_loads(block_times, opt.bounds, stem, head))
    return _dp(block_times, n_stages, stem, head, lambda acc, x: acc + x * x,
               limit=t_star * (1 + 1e-12) + 1e-300)


def count_params(model) -> BlockCosts:
    """Parameter counts of stem, blocks and head. A weight tied between stem and head counts in
    both: split over two ranks, each holds a copy."""
    def n(m):
        return float(sum(p.numel() for p in m.parameters()))

    return BlockCosts(n(model.stem), tuple(n(b) for b in model.blocks), n(model.head))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_block_times(model, example_batch, *, warmup: int = 1, repeats: int = 3) -> BlockCosts:
    """Seconds for forward + backward of the stem, of every block and of the head with the loss,
    each timed on its own (input detached, a gradient of ones flowing back). ``warmup`` untimed
    rounds first; the median of ``repeats`` timed rounds is kept. Gradients the model had before
    are restored."""
    inputs, targets = example_batch
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    inputs, targets = inputs.to(device), targets.to(device)
    saved = [p.grad for p in params]
    samples: list[list[float]] = []

    def timed(fn):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return out, time.perf_counter() - t0

    try:
        for it in range(warmup + repeats):
            row = []

            def stem():
                h = model.stem(inputs)
                h.backward(torch.ones_like(h))
                return h.detach()

            h, t = timed(stem)
            row.append(t)
            for block in model.blocks:
                def run(block=block, h=h):
                    x = h.requires_grad_(h.is_floating_point())
                    y = block(x)
                    y.backward(torch.ones_like(y))
                    return y.detach()

                h, t = timed(run)
                row.append(t)

            def head(h=h):
                x = h.requires_grad_(True)
                model.loss(model.head(x), targets).backward()

            _, t = timed(head)
            row.append(t)
            if it >= warmup:
                samples.append(row)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    med = [statistics.median(col) for col in zip(*samples)]
    return BlockCosts(med[0], tuple(med[1:-1]), med[-1])


def stage_loads(partition: Partition, costs: BlockCosts) -> list[float]:
    """Per-stage totals of a per-block cost (stem on stage 0, head on the last stage)."""
    return _loads(costs.blocks, partition.bounds, costs.stem, costs.head)


def describe_partition(partition: Partition, params: BlockCosts, times: BlockCosts | None = None,
                       method: str = "", pp: int | None = None) -> str:
    """Human-readable table: per stage its blocks, parameters, time, and the imbalance."""
    S = partition.n_stages
    p_loads = stage_loads(partition, params)
    t_loads = stage_loads(partition, times) if times is not None else None
    head = f"pipeline partition{f' ({method})' if method else ''}: {partition.n_blocks} blocks over {S} stages"
    if pp:
        head += f" on {pp} ranks"
    lines = [head, f"{'stage':>5} {'rank':>4}  {'blocks':<16} {'params':>10}" + (f" {'time ms':>9}" if t_loads else "")]
    for s in range(S):
        r = partition.blocks(s)
        extra = ("+stem" if s == 0 else "") + ("+head" if s == S - 1 else "")
        blocks = f"{r.start}-{r.stop - 1}" if len(r) > 1 else f"{r.start}"
        blocks = f"{blocks} ({len(r)}){extra}"
        row = f"{s:>5} {s % pp if pp else '-':>4}  {blocks:<16} {_human(p_loads[s]):>10}"
        if t_loads:
            row += f" {t_loads[s] * 1e3:>9.3f}"
        lines.append(row)

    def ratio(x):
        m = sum(x) / len(x)
        return max(x) / m if m > 0 else 1.0

    summary = f"imbalance (max / mean): params {ratio(p_loads):.3f}x"
    if t_loads:
        summary += f", time {ratio(t_loads):.3f}x (the slowest stage sets the pipeline's pace)"
    lines.append(summary)
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def partition_model(model, n_stages: int, method="time", *, example_batch=None,
                    block_times: BlockCosts | None = None, pp: int | None = None) -> tuple[Partition, str]:
    """Partition ``model.blocks`` into ``n_stages`` (= pp * virtual) stages.

    ``method``: ``"uniform"``, ``"params"``, ``"time"`` (needs ``block_times`` or an
    ``example_batch`` to measure them with ``measure_block_times``), or a list of per-stage block
    counts. Returns the partition and the explanation that ``describe_partition`` prints.
    """
    n_blocks = len(model.blocks)
    params = count_params(model)
    times = block_times
    if times is None and example_batch is not None:
        times = measure_block_times(model, example_batch)
    if isinstance(method, (list, tuple)):
        part, name = explicit(method, n_blocks, n_stages), "explicit"
    elif method == "uniform":
        part, name = uniform(n_blocks, n_stages), "uniform"
    elif method == "params":
        part, name = balance_params(params.blocks, n_stages, stem=params.stem, head=params.head), "parameter-balanced"
    elif method == "time":
        if times is None:
            raise ValueError("time-balanced partition needs block_times or an example_batch to measure them")
        part, name = balance_time(times.blocks, n_stages, stem=times.stem, head=times.head), "time-balanced"
    else:
        raise ValueError(f"unknown partition method {method!r}; use 'uniform', 'params', 'time' or a list of block counts")
    return part, describe_partition(part, params, times, name, pp)
