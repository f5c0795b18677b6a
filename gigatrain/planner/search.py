"""The search: every layout of a job on a cluster, what fits, what is fastest.

``search(job, device, n_gpus, fixed)`` enumerates dp x pp x tp (divisors only; tp inside a
node and dividing the heads; pp dividing the blocks evenly, with V chunks each), sequence
parallel, ZeRO stage, offload, micro-batch, schedule and virtual stages, and recomputation,
honouring the ``fixed`` choices. It prunes before it simulates: model states alone are a lower
bound on memory for every micro-batch and schedule, and one micro-batch of one stage with full
recomputation a lower bound for every schedule, so the larger micro-batches are skipped once
that bound overflows. Schedule replays are cached (``pipeline``), so a 1T-parameter GPT on
3,072 GPUs is searched in seconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .cost import StepTime, block_times, step_time
from .memory import RECOMPUTE, Job, Layout, Memory, block_activation_bytes, memory_breakdown, rank_params
from .pipeline import live_profile
from ..parallel.zero.memory import model_state_bytes

__all__ = ["Candidate", "PlanResult", "PlanError", "search", "FIXABLE", "divisors"]

GiB = 2**30

#: Layout keys a user can fix, as dotted config keys, and the ``Layout`` field each sets.
FIXABLE = {
    "parallel.dp": "dp", "parallel.pp": "pp", "parallel.tp": "tp", "parallel.sequence_parallel": "sp",
    "parallel.zero": "zero", "parallel.offload": "offload", "parallel.pp_schedule": "schedule",
    "parallel.pp_virtual": "virtual", "parallel.pp_microbatches": "microbatches",
    "train.micro_batch": "micro_batch", "train.recompute": "recompute",
}


class PlanError(ValueError):
    """No layout is possible (the fixed choices contradict each other or the model), or none
    fits (``no_fit``); the message says which and what to change."""

    def __init__(self, message: str, no_fit: bool = False):
        super().__init__(message)
        self.no_fit = no_fit


@dataclass
class Candidate:
    """One evaluated layout with its predicted time and memory."""

    layout: Layout
    time: StepTime
    mem: Memory
    fits: bool
    n_gpus: int
    block_times: object = None  # kept to replay the pipeline without recomputing them

    @property
    def step_s(self) -> float:
        return self.time.total

    @property
    def tflops_per_gpu(self) -> float:
        return self.time.flops / self.time.total / self.n_gpus / 1e12

    def to_json(self) -> dict:
        lay = self.layout
        return {"dp": lay.dp, "pp": lay.pp, "tp": lay.tp, "sequence_parallel": lay.sp, "zero": lay.zero,
                "offload": lay.offload, "micro_batch": lay.micro_batch,
                "schedule": lay.schedule if lay.pp > 1 else None, "virtual": lay.virtual,
                "recompute": lay.recompute, "step_s": self.step_s, "tflops_per_gpu": self.tflops_per_gpu,
                "peak_mem_bytes": int(self.mem.peak), "fits": self.fits,
                "bubble": self.time.bubble_fraction, "comm_share": self.time.comm_share,
                "host_mem_bytes": int(self.mem.host)}


@dataclass
class PlanResult:
    """Every evaluated candidate, sorted by predicted step time (fitting or not), and the
    search's own statistics. ``best`` is the fastest that fits (None when none does)."""

    candidates: list
    search_s: float
    pruned: int
    device: object
    job: Job
    n_gpus: int
    pruned_reasons: dict = field(default_factory=dict)

    @property
    def fitting(self) -> list:
        return [c for c in self.candidates if c.fits]

    @property
    def best(self):
        fit = self.fitting
        return fit[0] if fit else None


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _options(fixed: dict, key: str, default: list) -> list:
    return [fixed[key]] if key in fixed else default


def _structure_problems(job: Job, n: int, fixed: dict, gpn: int) -> list[str]:
    """Why the fixed choices admit no layout at all (empty when they may)."""
    m, p = job.model, []
    t, pp, dp = fixed.get("tp"), fixed.get("pp"), fixed.get("dp")
    prod = 1
    for v in (t, pp, dp):
        prod *= v or 1
    if n % prod:
        p.append(f"parallel.dp x pp x tp fixed to {prod} does not divide the {n} GPUs")
    if all(v is not None for v in (t, pp, dp)) and t * pp * dp != n:
        p.append(f"parallel.dp ({dp}) x pp ({pp}) x tp ({t}) = {dp * pp * t}, not the {n} GPUs")
    if t is not None:
        if m.n_head % t:
            p.append(f"parallel.tp={t} does not divide model.n_head ({m.n_head})")
        if m.d_model % t:
            p.append(f"parallel.tp={t} does not divide model.d_model ({m.d_model})")
        if fixed.get("sp") and m.seq % t:
            p.append(f"sequence parallel with parallel.tp={t} needs the sequence ({m.seq}) divisible by {t}")
    if pp is not None and pp * fixed.get("virtual", 1) > m.n_layer:
        p.append(f"parallel.pp x pp_virtual = {pp * fixed.get('virtual', 1)} stages but the model has "
                 f"{m.n_layer} blocks")
    if fixed.get("offload", "none") != "none" and fixed.get("zero") == 0:
        p.append(f"parallel.offload={fixed['offload']} needs parallel.zero >= 1")
    if fixed.get("schedule") == "interleaved" and fixed.get("virtual", 2) < 2:
        p.append("parallel.pp_schedule=interleaved needs parallel.pp_virtual >= 2")
    if fixed.get("virtual", 1) > 1 and fixed.get("schedule") not in (None, "interleaved", "zb"):
        p.append(f"parallel.pp_virtual={fixed['virtual']} needs pp_schedule=interleaved or zb")
    b = fixed.get("micro_batch")
    if b is not None:
        if b > job.global_batch:
            p.append(f"train.micro_batch={b} is larger than train.global_batch ({job.global_batch})")
        elif dp is not None and job.global_batch % (b * dp):
            p.append(f"train.global_batch ({job.global_batch}) is not a multiple of micro_batch ({b}) x dp ({dp})")
    return p


def search(job: Job, device, n_gpus: int, fixed: dict | None = None, *, gpus_per_node: int | None = None,
           even_stages: bool = True, allowed_tp=None, keep: int = 50) -> PlanResult:
    """Evaluate the layouts of ``job`` on ``n_gpus`` devices (``gpus_per_node`` per node,
    default the device's) with the ``fixed`` choices (``Layout`` field names: dp, pp, tp, sp,
    zero, offload, micro_batch, schedule, virtual, recompute, and ``microbatches`` per dp rank;
    ``schedule`` may also be a tuple of the kinds allowed).

    Only layouts the engine could run are enumerated: offload with ZeRO >= 1, interleaved/zb
    chunks only when the micro-batches are a multiple of pp. Unless fixed, tp stays inside a node
    and pp divides the blocks evenly (``even_stages``: uneven stages idle the others).
    ``allowed_tp`` restricts tp (what the installed engine supports).

    Every layout that survives the memory bounds gets its memory and a lower bound of its step
    time; pipelines are then replayed in the order of that bound until the bound exceeds the
    ``keep``-th fastest fitting prediction, so the layouts left out are provably slower than
    ``keep`` fitting ones (counted in ``pruned``). Raises ``PlanError`` when the fixed choices
    admit no layout.
    """
    from dataclasses import replace

    t0 = time.perf_counter()
    fixed = dict(fixed or {})
    m = job.model
    gpn = gpus_per_node or device.gpus_per_node
    device = replace(device, gpus_per_node=gpn)
    n = n_gpus
    problems = _structure_problems(job, n, fixed, gpn)
    if problems:
        raise PlanError("; ".join(problems) + ".")

    tps = _options(fixed, "tp", [t for t in divisors(n) if t <= gpn and m.n_head % t == 0 and m.d_model % t == 0
                                 and (allowed_tp is None or t in allowed_tp)])
    cands: list[Candidate] = []
    pruned = 0
    reasons: dict[str, int] = {}

    def prune(why: str, count: int = 1):
        nonlocal pruned
        pruned += count
        reasons[why] = reasons.get(why, 0) + count

    for t in tps:
        if n % t:
            continue
        sps = _options(fixed, "sp", [False, True] if t > 1 else [False])
        pps = _options(fixed, "pp", [p for p in divisors(n // t) if p <= m.n_layer
                                     and (not even_stages or m.n_layer % p == 0)])
        for pp in pps:
            if (n // t) % pp:
                continue
            dp = n // (t * pp)
            if "dp" in fixed and fixed["dp"] != dp:
                continue
            zeros = _options(fixed, "zero", [0, 1, 2, 3])
            for zero in zeros:
                offloads = _options(fixed, "offload", ["none", "cpu"] if zero >= 1 else ["none"])
                for off in offloads:
                    if off != "none" and zero == 0:
                        continue
                    base = Layout(dp=dp, pp=pp, tp=t, zero=zero, offload=off)
                    # Lower bound 1: model states of the first pipeline rank (V = 1).
                    P0 = rank_params(job, base, 0)
                    st = model_state_bytes(P0, dp, zero, "cpu" if off != "none" else "none", job.param_bytes,
                                           job.adam, momentum=job.momentum)
                    if st["device"] + device.runtime_bytes > device.mem_bytes:
                        prune("model states exceed device memory")
                        continue
                    if off == "cpu" and st["host"] > device.host_mem_bytes:
                        prune("offloaded states exceed host memory")
                        continue
                    for sp in sps:
                        if sp and (t == 1 or m.seq % t):
                            continue
                        _micro_loop(job, device, n, fixed, base, sp, st["device"], cands, prune)
    cands = _refine(job, device, cands, keep, prune)
    if not cands:
        if not reasons:
            raise PlanError(f"no layout of {n} GPUs matches the fixed choices {fixed}.")
        why = "; ".join(f"{k} ({v} layouts)" for k, v in reasons.items())
        if not any("exceed" in k for k in reasons):
            raise PlanError(f"no layout of {n} GPUs is possible: {why}.")
        raise PlanError(f"no layout of {n} x {device.name} fits this job: {why}. Use more or bigger devices, "
                        "a smaller model or a smaller global batch.", no_fit=True)
    return PlanResult(candidates=cands, search_s=time.perf_counter() - t0, pruned=pruned, device=device,
                      job=job, n_gpus=n, pruned_reasons=reasons)


def _schedules(fixed: dict, pp: int, M: int, n_layer: int, even: bool = True) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    kinds = fixed.get("schedule", ["1f1b", "gpipe", "zb", "interleaved"])
    kinds = list(kinds) if isinstance(kinds, (list, tuple)) else [kinds]
    out = []
    for kind in kinds:
        if kind in ("naive", "gpipe", "1f1b"):
            vs = [1]
        else:
            vs = [v for v in divisors(n_layer // pp) if v <= 8] if n_layer % pp == 0 else [1, 2]
            if kind == "interleaved":
                vs = [v for v in vs if v >= 2]
        if "virtual" in fixed:
            vs = [v for v in vs if v == fixed["virtual"]] or ([fixed["virtual"]] if "schedule" in fixed else [])
        for v in vs:
            if v > 1 and M % pp:
                continue
            if pp * v > n_layer:
                continue
            out.append((kind, v))
    return out


def _micro_loop(job, device, n, fixed, base: Layout, sp: bool, states: float, cands: list, prune) -> None:
    from dataclasses import replace

    m, B, dp = job.model, job.global_batch, base.dp
    per_dp = B // dp if B % dp == 0 else 0
    if not per_dp:
        prune("global batch not divisible by dp")
        return
    bs = _options(fixed, "micro_batch", divisors(per_dp))
    rcs = _options(fixed, "recompute", list(RECOMPUTE))
    budget = device.mem_bytes - device.runtime_bytes
    chunk_min = -(-m.n_layer // base.pp)
    for rc in rcs:
        for b in sorted(bs):
            if per_dp % b:
                continue
            M = per_dp // b
            if "microbatches" in fixed and fixed["microbatches"] != M:
                continue
            # Lower bound 2: one micro-batch through one stage, whatever the schedule.
            lb = states + chunk_min * block_activation_bytes(m, b, base.tp, sp, rc, job.elem_bytes)
            if lb * (1 + device.alloc_margin) > budget:
                prune("one micro-batch's activations exceed device memory")
                break
            lay0 = replace(base, sp=sp, micro_batch=b, recompute=rc)
            bt = block_times(job, lay0, device)
            for kind, v in _schedules(fixed, base.pp, M, m.n_layer):
                lay = replace(lay0, schedule=kind, virtual=v)
                live = live_profile(kind if base.pp > 1 else "none", base.pp, M, v)
                mem = memory_breakdown(job, lay, device, live)
                fits = mem.peak <= device.mem_bytes and mem.host <= device.host_mem_bytes
                cands.append(Candidate(lay, step_time(job, lay, device, bt, bound=True), mem, fits, n, bt))


def _refine(job, device, cands: list, keep: int, prune) -> list:
    """Replace lower bounds by predictions, fastest bound first, until the bound of the next
    candidate exceeds the ``keep``-th fastest fitting prediction; returns the predicted
    candidates sorted by step time."""
    import bisect

    cands.sort(key=lambda c: c.step_s)
    done, fit_times, skipped = [], [], 0
    for c in cands:
        if c.layout.pp > 1:  # without a pipeline the bound is the prediction already
            if len(fit_times) >= keep and c.step_s > fit_times[keep - 1]:
                skipped += 1
                continue
            c.time = step_time(job, c.layout, device, c.block_times)
        done.append(c)
        if c.fits:
            bisect.insort(fit_times, c.step_s)
    if skipped:
        prune("slower than the fastest fitting layouts (by a lower bound)", skipped)
    done.sort(key=lambda c: (c.step_s, c.mem.peak))
    return done
