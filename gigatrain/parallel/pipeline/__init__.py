"""Pipeline parallelism: schedules as data, a simulator, a partitioner and a runtime.

- ``schedules``: ``build_schedule(kind, pp, microbatches, virtual)`` -> per-rank action lists
  (naive, gpipe, 1f1b, interleaved, zb), messages placed so the lists never deadlock.
- ``simulate``: runs the lists on a cost model; deadlock detection, timeline, bubble, memory.
- ``partition``: contiguous stages over the model's blocks (uniform, by parameters, by time).
- ``runtime``: ``PipelineRuntime`` executes one rank's list per training step on a pp group.
- ``timeline``: per-action records, measured bubble, paper-style PNG.
"""
from .partition import (
    BlockCosts, Partition, balance_params, balance_time, count_params, describe_partition, explicit,
    measure_block_times, partition_model, stage_loads, uniform,
)
from .runtime import PipelineRuntime, SplitBackward, StageModule, build_stage_modules, split_microbatches, tied_parameters
from .schedules import (
    B, F, KINDS, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, ScheduleError, build_schedule, compute_order,
    format_schedule, lower_communication,
)
from .simulate import Costs, DeadlockError, SimResult, simulate, validate_schedule
from .timeline import Record, measured_bubble, plot_timeline

__all__ = [
    "Action", "F", "B", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "KINDS", "ScheduleError",
    "build_schedule", "compute_order", "lower_communication", "format_schedule",
    "Costs", "SimResult", "simulate", "validate_schedule", "DeadlockError",
    "Partition", "BlockCosts", "uniform", "explicit", "balance_params", "balance_time", "count_params",
    "measure_block_times", "stage_loads", "describe_partition", "partition_model",
    "PipelineRuntime", "StageModule", "SplitBackward", "build_stage_modules", "split_microbatches",
    "tied_parameters", "Record", "measured_bubble", "plot_timeline",
]
