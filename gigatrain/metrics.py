"""Throughput, FLOPs, MFU and memory; JSONL + TensorBoard logs; the progress bar."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, most specific first.
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
    ("V100", 125e12),
]


def device_peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """The device's dense peak for the training precision, or None when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            if precision in ("bf16", "fp16"):
                return peak
            # fp32 matmuls reach half the bf16 rate only as TF32; plain fp32 has no tensor-core
            # peak we could honestly compare with.
            return peak / 2 if torch.backends.cuda.matmul.allow_tf32 else None
    return None


def peak_host_bytes() -> int:
    """Peak resident set size of this process: the kernel's high-water mark (``VmHWM``), or
    ``getrusage``'s ``ru_maxrss`` where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_device_bytes(device: torch.device) -> int | None:
    """Peak device memory allocated by this process; None without an accelerator."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def peak_memory(comm, device: torch.device) -> dict:
    """``{"peak_host_bytes": ..., "peak_mem_bytes": ...}``: the largest peaks over the ranks of
    ``comm`` (a ``Comm``; None: this process alone), ``peak_mem_bytes`` None without an
    accelerator. Collective over ``comm``: one all-reduce of two numbers."""
    import torch.distributed as dist

    dev = peak_device_bytes(device)
    # float64 holds byte counts exactly up to 8 PiB.
    t = torch.tensor([float(peak_host_bytes()), -1.0 if dev is None else float(dev)], dtype=torch.float64,
                     device=device)
    if comm is not None:
        comm.all_reduce(t, op=dist.ReduceOp.MAX)
    host, dev = t.tolist()
    return {"peak_host_bytes": int(host), "peak_mem_bytes": None if dev < 0 else int(dev)}


def format_peaks(peaks: dict) -> str:
    """One line for the end of a run."""
    gib = 2**30
    dev = "n/a" if peaks.get("peak_mem_bytes") is None else f"{peaks['peak_mem_bytes'] / gib:.2f} GiB"
    return f"peak memory per rank (largest over ranks): host {peaks['peak_host_bytes'] / gib:.2f} GiB, device {dev}"


def step_metrics(*, step: int, loss: float, lr: float, grad_norm: float, seconds: float,
                 samples: int, tokens_per_sample: int, flops_per_sample: float, world_size: int,
                 device: torch.device, precision: str, **extra) -> dict:
    """One JSON-able record for ``metrics.jsonl``; throughput is for the whole job. Memory peaks
    (``peak_memory``, a collective) come in ``extra``."""
    rate = samples / seconds if seconds > 0 else float("nan")
    tflops = flops_per_sample * rate / world_size / 1e12 if seconds > 0 else float("nan")
    peak = device_peak_flops(device, precision)
    rec = {
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": None if grad_norm is None or math.isnan(grad_norm) else grad_norm,
        "step_time_s": seconds,
        "samples_per_s": rate,
        "tokens_per_s": rate * tokens_per_sample if tokens_per_sample > 1 else None,
        "tflops_per_device": tflops,
        "mfu": tflops * 1e12 / peak if peak else None,
    }
    rec.update(extra)
    return rec


class MetricsLogger:
    """Writes one JSON line per step (and TensorBoard scalars when it is installed); rank 0 only."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        """``resume_step > 0`` keeps the records of steps up to it (a resumed run) and drops
        later ones, which a crashed run may have logged after its last checkpoint."""
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        kept = []
        if resume_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        self.file = open(path, "w")
        for line in kept:
            self.file.write(line + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        # NaN/inf are not JSON: write them as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A rich progress bar with loss and throughput; silent when disabled or not a terminal log."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, unit: str = "tok/s",
                 log_every: int = 10):
        self.enabled = enabled
        self.unit = unit
        self.total = total
        self.log_every = log_every
        self._bar = None
        self._lines = False
        if not enabled:
            return
        if not sys.stdout.isatty():
            # Batch logs (CI, SLURM) get plain lines instead of a redrawn bar.
            self._lines = True
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)
        self._bar = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), refresh_per_second=4)
        self._task = self._bar.add_task("train", total=total, completed=start, loss="-", rate="-")
        self._bar.start()

    def update(self, step: int, loss: float, rate: float | None) -> None:
        rate_s = "-" if rate is None or math.isnan(rate) else f"{rate:,.0f} {self.unit}"
        if self._lines and (step % self.log_every == 0 or step == self.total):
            print(f"step {step}/{self.total}  loss {loss:.4f}  {rate_s}", flush=True)
        if self._bar is None:
            return
        self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", rate=rate_s)

    def print(self, *args) -> None:
        if self._bar is not None:
            self._bar.console.print(*args)
        else:
            print(*args, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
