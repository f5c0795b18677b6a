"""The planner's entry points for configs: a job from a config, fixed choices from command-line
overrides, the best layout as config overrides (``plan_for``), the predicted peak memory of a
config's own layout (``predicted_peak_bytes``), and one-line explanations of the alternatives.
"""
from __future__ import annotations

from dataclasses import replace

from .memory import RECOMPUTE, Job, Layout, ModelSpec, memory_breakdown
from .presets import PRESETS, Device, get_device
from .search import FIXABLE, PlanError, PlanResult, search

__all__ = ["job_from_config", "split_overrides", "plan_config", "plan_for", "predicted_peak_bytes",
           "layout_from_config", "layout_overrides", "resolve_device", "explain_alternatives"]

GiB = 2**30
_OFFLOADS = ("none", "cpu", "nvme")
_KINDS = ("naive", "gpipe", "1f1b", "interleaved", "zb")


def resolve_device(device=None) -> Device:
    """A ``Device`` from a preset name, a calibration file, a ``Device``, or None: the local
    GPU's preset when its name says which (A100/H100/H200), with its real memory, else ``cpu``."""
    if isinstance(device, Device):
        return device
    if device is not None:
        return get_device(device)
    import torch

    if not torch.cuda.is_available():
        return PRESETS["cpu"]
    props = torch.cuda.get_device_properties(0)
    name = props.name.upper()
    base = PRESETS["h200"] if "H200" in name else PRESETS["h100-80g"] if "H100" in name else (
        PRESETS["a100-80g" if props.total_memory > 50e9 else "a100-40g"] if "A100" in name else PRESETS["h100-80g"])
    return replace(base, name=f"{base.name} ({props.name})", mem_bytes=float(props.total_memory))


def job_from_config(cfg, device: Device) -> Job:
    """The job a config describes: its model, global batch, precision (``auto`` = the device's
    dtype), optimizer and bucket size."""
    spec = ModelSpec.from_config(cfg.model, cfg.data)
    precision = device.dtype if cfg.precision == "auto" else cfg.precision
    return Job(model=spec, global_batch=cfg.train.global_batch, param_bytes=4 if precision == "fp32" else 2,
               adam=cfg.train.optimizer == "adamw", momentum=cfg.train.momentum > 0,
               bucket_mb=cfg.parallel.bucket_mb)


def _parse_fixed(key: str, text: str):
    from ..config import parse_value

    field = FIXABLE[key]
    value = parse_value(text)
    if value is None:
        return None
    ok = True
    if field in ("dp", "pp", "tp", "virtual", "micro_batch", "microbatches"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        want = "a positive integer"
    elif field == "zero":
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3
        want = "0, 1, 2 or 3"
    elif field == "sp":
        ok = isinstance(value, bool)
        want = "true or false"
    elif field == "offload":
        ok = value in _OFFLOADS
        want = "one of " + ", ".join(_OFFLOADS)
    elif field == "schedule":
        ok = value in _KINDS
        want = "one of " + ", ".join(_KINDS)
    else:
        ok = value in RECOMPUTE
        want = "one of " + ", ".join(RECOMPUTE)
    if not ok:
        raise PlanError(f"{key}={text} is not valid: expected {want}.")
    return value


def split_overrides(overrides) -> tuple[list[str], dict]:
    """Split command-line ``key=value`` overrides into those for ``load_config`` and the fixed
    layout choices (``FIXABLE`` keys, by ``Layout`` field). Layout keys the config schema does
    not know yet (``train.recompute``, ``parallel.sequence_parallel``) are taken by the planner
    alone; ``null`` leaves a key to the search."""
    from ..config import config_keys

    known = set(config_keys())
    to_config, fixed = [], {}
    for item in overrides:
        key, _, text = item.partition("=")
        key = key.strip()
        if key in FIXABLE:
            value = _parse_fixed(key, text.strip())
            if value is not None:
                fixed[FIXABLE[key]] = value
            if key in known:
                to_config.append(item)
        else:
            to_config.append(item)
    return to_config, fixed


def plan_config(cfg, n_gpus: int, device=None, fixed: dict | None = None, *, gpus_per_node: int | None = None,
                supported_only: bool = False, keep: int = 50) -> PlanResult:
    """Search the layouts of ``cfg``'s job on ``n_gpus`` devices. ``supported_only`` keeps to
    what the installed engine runs (``config.SUPPORTED``, and keys its config schema has)."""
    dev = resolve_device(device)
    fixed = dict(fixed or {})
    allowed_tp = None
    if supported_only:
        from ..config import SUPPORTED, config_keys

        keys = set(config_keys())
        allowed_tp = SUPPORTED.get("parallel.tp")
        if "parallel.sequence_parallel" not in keys:
            fixed.setdefault("sp", False)
        if "train.recompute" not in keys:
            fixed.setdefault("recompute", "none")
    job = job_from_config(cfg, dev)
    return search(job, dev, n_gpus, fixed, gpus_per_node=gpus_per_node, allowed_tp=allowed_tp, keep=keep)


def layout_overrides(lay: Layout, known_keys=None) -> dict:
    """Config overrides (dotted key -> value) that run ``lay``. Keys the installed config schema
    does not have are left out when their value is the default, else kept (the caller decides
    how to show them)."""
    out = {"parallel.dp": lay.dp, "parallel.pp": lay.pp, "parallel.tp": lay.tp, "parallel.zero": lay.zero,
           "parallel.offload": lay.offload, "train.micro_batch": lay.micro_batch,
           "parallel.pp_schedule": lay.schedule if lay.pp > 1 else "1f1b",
           "parallel.pp_virtual": lay.virtual if lay.pp > 1 else 1, "parallel.pp_microbatches": None}
    if lay.pp > 1:
        out["parallel.pp_balance"] = "uniform"  # the partition the plan assumed
    extra = {"parallel.sequence_parallel": lay.sp, "train.recompute": lay.recompute}
    defaults = {"parallel.sequence_parallel": False, "train.recompute": "none"}
    for k, v in extra.items():
        if known_keys is None or k in known_keys or v != defaults[k]:
            out[k] = v
    return out


def plan_for(cfg, world: int, device=None) -> dict:
    """Best layout for ``cfg``'s job on ``world`` processes of ``device`` (see
    ``resolve_device``), among those the installed engine runs, as config overrides
    (``layout_overrides``) for ``load_config``/``parallel.auto``. One node of
    ``min(world, device.gpus_per_node)`` devices per ``gpus_per_node`` is assumed. Raises
    ``PlanError`` when nothing fits, saying what overflows in the least demanding layout."""
    from ..config import config_keys

    dev = resolve_device(device)
    res = plan_config(cfg, world, dev, gpus_per_node=min(world, dev.gpus_per_node), supported_only=True)
    if res.best is None:
        raise PlanError(no_fit_message(res), no_fit=True)
    return layout_overrides(res.best.layout, set(config_keys()))


def layout_from_config(cfg) -> Layout:
    """The layout a config resolved for its world size (``resolve_for_world``) asks for."""
    p, t = cfg.parallel, cfg.train
    if p.dp is None:
        raise PlanError("the config's layout is not resolved: call resolve_for_world(cfg, world_size) first")
    return Layout(dp=p.dp, pp=p.pp, tp=p.tp, sp=bool(getattr(p, "sequence_parallel", False)), zero=p.zero,
                  offload=p.offload if p.zero else "none", micro_batch=t.micro_batch,
                  schedule=p.pp_schedule, virtual=p.pp_virtual, recompute=getattr(t, "recompute", "none") or "none")


def predicted_peak_bytes(cfg, device=None) -> int:
    """Predicted peak device memory per rank of a resolved config's own layout on ``device``
    (see ``resolve_device``): tensors, the runtime and the allocator margin
    (``memory.memory_breakdown``; pipeline stages cut uniformly)."""
    dev = resolve_device(device)
    job = job_from_config(cfg, dev)
    return int(memory_breakdown(job, layout_from_config(cfg), dev).peak)


# -- explanations ---------------------------------------------------------------------------
_MEM_TERMS = ("states", "activations", "temporaries", "gathered", "buckets")
_TIME_TERMS = {"compute": "compute", "bubble": "pipeline bubble", "tp_comm": "tensor-parallel communication",
               "p2p": "pipeline hand-offs", "dp_comm": "data-parallel communication", "optimizer": "optimizer step"}


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB" if x >= GiB / 10 else f"{x / 2**20:.0f} MiB"


def memory_why(c, device) -> str:
    """Which memory term makes ``c`` overflow, in one clause."""
    m = c.mem
    if m.peak <= device.mem_bytes and m.host > device.host_mem_bytes:
        return f"its offloaded states need {_gib(m.host)} of host memory per GPU (> {_gib(device.host_mem_bytes)})"
    term = max(_MEM_TERMS, key=lambda k: getattr(m, k))
    detail = {"states": "model states", "activations": f"activations ({m.in_flight} micro-batch chunks in flight)",
              "temporaries": "temporaries (logits, recomputed block)", "gathered": "gathered ZeRO-3 units",
              "buckets": "communication buckets"}[term]
    return f"needs {_gib(m.peak)} > {_gib(device.mem_bytes)}: {detail} {_gib(getattr(m, term))}"


def time_why(c, best) -> str:
    """Which time term makes ``c`` slower than ``best``, in one clause."""
    diffs = {k: getattr(c.time, k) - getattr(best.time, k) for k in _TIME_TERMS}
    k = max(diffs, key=diffs.get)
    return f"{_TIME_TERMS[k]} {getattr(c.time, k):.3g} s vs {getattr(best.time, k):.3g} s"


def explain_alternatives(res: PlanResult, n: int = 3) -> list[str]:
    """One line each for the best alternatives to the pick: the fastest layouts that do not fit
    (which memory term overflows) and the fastest fitting ones of another dp x pp x tp shape
    (which time term is larger)."""
    best, dev, lines = res.best, res.device, []
    seen = set()
    for c in res.candidates:
        if best is not None and c.step_s >= best.step_s:
            break
        shape = (c.layout.dp, c.layout.pp, c.layout.tp)
        if c.fits or shape in seen:
            continue
        seen.add(shape)
        faster = f"{(1 - c.step_s / best.step_s) * 100:.0f}% faster but " if best else ""
        lines.append(f"{c.layout.describe()}: {faster}{memory_why(c, dev)}")
        if len(seen) >= n:
            break
    if best is None:
        return lines
    seen = {(best.layout.dp, best.layout.pp, best.layout.tp)}
    k = 0
    for c in res.fitting[1:]:
        shape = (c.layout.dp, c.layout.pp, c.layout.tp)
        if shape in seen:
            continue
        seen.add(shape)
        lines.append(f"{c.layout.describe()}: {(c.step_s / best.step_s - 1) * 100:.1f}% slower: {time_why(c, best)}")
        k += 1
        if k >= n:
            break
    return lines


def no_fit_message(res: PlanResult) -> str:
    """Why nothing fits, from the layout that needs the least memory."""
    c = min(res.candidates, key=lambda c: c.mem.peak)
    return (f"no layout of {res.n_gpus} x {res.device.name} fits this job; the least demanding, "
            f"{c.layout.describe()}, {memory_why(c, res.device)}. Use more or bigger devices, a smaller "
            "model, or a smaller global batch.")
