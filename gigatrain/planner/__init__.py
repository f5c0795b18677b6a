"""The planner: what fits and what is fastest, before anything is launched.

- ``memory``: the model (``ModelSpec``), a layout (``Layout``), memory per rank.
- ``cost``: FLOPs, device rates, collectives, the pipeline; step time per layout.
- ``pipeline``: the real schedules' in-flight counts and makespans, cached.
- ``search``: every layout of a job on a cluster, pruned by bounds, ranked.
- ``presets``: GPU figures, this machine, calibration files; ``calibrate`` measures one.
- ``plan``: configs in, layouts out (``plan_for``, ``predicted_peak_bytes``); ``report`` and
  ``cli`` make ``gigatrain plan``.
- ``auto``: the planner inside ``gigatrain train`` before launch: ``parallel.auto`` and the
  predicted memory of every run, refused when it does not fit.
"""
from .memory import Job, Layout, ModelSpec, block_activation_bytes, korthikanti_activation_bytes, memory_breakdown
from .cost import counted_flops, narayanan_flops, step_time
from .plan import plan_config, plan_for, predicted_peak_bytes
from .presets import PRESETS, Device, get_device
from .search import PlanError, PlanResult, search

__all__ = ["Job", "Layout", "ModelSpec", "block_activation_bytes", "korthikanti_activation_bytes",
           "memory_breakdown", "counted_flops", "narayanan_flops", "step_time", "plan_config", "plan_for",
           "predicted_peak_bytes", "PRESETS", "Device", "get_device", "PlanError", "PlanResult", "search"]
