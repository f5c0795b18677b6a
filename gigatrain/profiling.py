"""Where a step's time goes: forward, backward, exposed communication, optimizer.

``StepProfile`` is the timer the engine and the stages share. Code marks its phases
(``with profile.phase("forward"): ...``); the time spent blocked in communication inside a phase
(``CommStats.blocked_s``: synchronous collectives, and waits on asynchronous ones that overlap did
not hide) is moved from that phase to ``comm``, so the four numbers do not overlap and their sum
is the step's time outside untimed glue. Each phase is also a ``torch.profiler`` range, so traces
(``train.profile_steps``) show the same names.

On CUDA the phases synchronise the device at their ends (kernels are asynchronous; without it
the time of a phase would land in whichever later call waits for the GPU).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

PHASES = ("forward", "backward", "comm", "optimizer")


class StepProfile:
    """Seconds per phase of the current step (see the module docstring)."""

    def __init__(self, stats, device: torch.device):
        self.stats = stats
        self._sync = device.type == "cuda"
        self._device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def begin(self) -> None:
        """Start a new step: every phase back to zero."""
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the enclosed code as ``name``, less the communication it was blocked in."""
        with torch.profiler.record_function(name):
            t0, b0 = time.perf_counter(), self.stats.blocked_s
            try:
                yield
            finally:
                if self._sync:
                    torch.cuda.synchronize(self._device)
                blocked = self.stats.blocked_s - b0
                self.seconds[name] += time.perf_counter() - t0 - blocked
                self.seconds["comm"] += blocked

    def add(self, name: str, seconds: float) -> None:
        """Add seconds measured elsewhere (a pipeline schedule's compute records)."""
        self.seconds[name] += seconds

    def record(self) -> dict[str, float]:
        """This step's seconds as ``metrics.jsonl`` keys: ``forward_s``, ``backward_s``,
        ``comm_exposed_s``, ``optimizer_s``."""
        s = self.seconds
        return {"forward_s": s["forward"], "backward_s": s["backward"], "comm_exposed_s": s["comm"],
                "optimizer_s": s["optimizer"]}


class TraceWindow:
    """A ``torch.profiler`` trace of steps ``first``..``last`` (1-based, inclusive), written as
    ``<out>/profile/rank<R>.pt.trace.json``: Chrome trace JSON, which Perfetto
    (ui.perfetto.dev) opens, and TensorBoard lists with ``--logdir <out>/profile`` (torch-tb-profiler)."""

    def __init__(self, steps: tuple[int, int] | None, out: str | Path, rank: int, device: torch.device):
        self.first, self.last = steps if steps else (0, -1)
        self.path = Path(out) / "profile" / f"rank{rank}.pt.trace.json"
        self.device = device
        self._prof = None

    def before(self, step: int) -> None:
        """Called before step ``step`` (1-based) runs."""
        if step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()

    def after(self, step: int) -> None:
        """Called after step ``step`` finished; writes the trace after the window's last step."""
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write a trace in progress (a run that ended inside the window)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
