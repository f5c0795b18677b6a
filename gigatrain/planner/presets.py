"""Devices the planner can plan for: public figures of common GPUs, this machine's CPU, or a
JSON file written by ``gigatrain plan --calibrate``.

Every rate is per device (one rank) and per direction. Link bandwidths are the vendor's peak;
``link_eff`` turns them into what a collective achieves (NCCL reaches ~80% of NVLink and of
InfiniBand line rate on large messages), so a calibrated file, which stores measured rates,
sets ``link_eff`` to 1.
"""
from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import asdict, dataclass, replace

__all__ = ["Device", "PRESETS", "get_device", "device_names"]

GiB = 2**30


@dataclass(frozen=True)
class Device:
    """What the cost and memory models need to know about one device and its links.

    - ``flops``: dense matmul peak in the compute dtype (FLOP/s); ``dtype`` is that dtype
      ("bf16" or "fp32"), used when the config says ``precision: auto``.
    - matmul rate: ``matmul_table`` (pairs of FLOPs per call and achieved FLOP/s, measured;
      interpolated in log FLOPs) or else ``flops * matmul_eff * F / (F + matmul_half)``: large
      GEMMs reach ``matmul_eff`` of peak, a call of ``matmul_half`` FLOPs half of that.
    - ``mem_bytes`` device memory; ``mem_bw`` its bandwidth (elementwise ops, optimizer).
    - links per rank: inside a node (``intra_bw``, ``intra_alpha`` latency per step) and
      between nodes (``inter_bw``, ``inter_alpha``); ``link_eff`` of the bandwidth is reached.
    - host side per rank: ``host_mem_bytes``, ``pcie_bw`` (host<->device copies),
      ``cpu_adam_rate`` (parameters/s the CPU optimizer updates), ``nvme_bw``.
    - ``runtime_bytes``: memory the runtime takes before any tensor (CUDA context, cuBLAS
      workspace, or the interpreter and torch on a CPU); ``alloc_margin``: fraction added to the
      tensors' peak for allocator fragmentation when deciding what fits.
    - ``gpus_per_node``: the default node size.
    - ``comm_overlap``: whether communication can run beside compute (GPUs: copy engines and
      NCCL kernels); on a CPU gloo reduces and copies on the cores the compute uses.
    - ``collective_fits``: measured ``(op, alpha, bw)`` per collective inside a node (from
      ``--calibrate``), used instead of the intra-node link for that op: backends implement the
      collectives differently (gloo's reduce-scatter costs about an all-reduce, not half of one).
    - ``core_share``: the fraction of a core each rank's rates assume (1 for a device of its
      own; ``cores / ranks`` when ``--calibrate`` runs more ranks than a CPU has cores): ranks
      that wait lend their cores to the others, which then run up to ``1 / core_share`` faster.
    - fixed costs, seconds that do not scale with the work: ``block_fixed_f`` and
      ``block_fixed_b`` per transformer block and micro-batch in forward and in backward
      (operator dispatch and kernel launches, the time a block takes beyond its FLOPs and bytes),
      and ``action_overhead`` per call of a chunk (one pipeline compute action, or one forward
      or backward of a micro-batch without a pipeline: the module call, autograd's entry,
      posting its messages). ``--calibrate`` measures them on a real block (``calibrate.fit_fixed``);
      the GPU presets carry the launch-level defaults below.
    """

    name: str
    flops: float
    dtype: str
    mem_bytes: float
    mem_bw: float
    intra_bw: float
    inter_bw: float
    intra_alpha: float = 5e-6
    inter_alpha: float = 15e-6
    link_eff: float = 0.8
    matmul_eff: float = 0.8
    matmul_half: float = 1e9
    matmul_table: tuple = ()
    host_mem_bytes: float = 128 * GiB
    pcie_bw: float = 20e9
    cpu_adam_rate: float = 0.6e9
    nvme_bw: float = 3e9
    runtime_bytes: float = 1.5 * GiB
    alloc_margin: float = 0.08
    gpus_per_node: int = 8
    comm_overlap: bool = True
    collective_fits: tuple = ()
    # Defaults, the GPU presets' (not measured): a block runs ~20 operators forward and ~40
    # backward, about a microsecond of launch each that the work already queued does not hide;
    # a chunk's call costs about as much again in Python and autograd.
    core_share: float = 1.0
    block_fixed_f: float = 20e-6
    block_fixed_b: float = 40e-6
    action_overhead: float = 20e-6
    source: str = ""

    def matmul_rate(self, flops: float) -> float:
        """Achieved FLOP/s of one matmul call of ``flops`` FLOPs (see the class docstring)."""
        if self.matmul_table:
            xs = [math.log(f) for f, _ in self.matmul_table]
            ys = [r for _, r in self.matmul_table]
            x = math.log(max(flops, 1.0))
            if x <= xs[0]:
                return ys[0]
            if x >= xs[-1]:
                return ys[-1]
            i = bisect.bisect_right(xs, x)
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
        return self.flops * self.matmul_eff * flops / (flops + self.matmul_half)

    def to_json(self) -> str:
        d = asdict(self)
        d["matmul_table"] = [list(x) for x in self.matmul_table]
        d["collective_fits"] = [list(x) for x in self.collective_fits]
        return json.dumps(d, indent=2)

    def collective_fit(self, op: str):
        """``(alpha, bw)`` measured for ``op`` inside a node, or None."""
        for name, alpha, bw in self.collective_fits:
            if name == op:
                return alpha, bw
        return None


# Public figures (vendor datasheets): dense bf16 tensor-core peak, HBM size and bandwidth,
# NVLink bandwidth per GPU per direction (half the quoted bidirectional total), one InfiniBand
# NIC per GPU in DGX/HGX nodes (A100: HDR 200 Gb/s, H100/H200: NDR 400 Gb/s), host memory of a
# DGX node divided by its 8 GPUs. matmul_eff: large bf16 GEMMs reach ~85% of peak on A100 and
# 805/989 = 81% on H100 (measured, docs/benchmarks.md reference points).
PRESETS: dict[str, Device] = {
    "a100-40g": Device("a100-40g", flops=312e12, dtype="bf16", mem_bytes=40e9, mem_bw=1.555e12,
                       intra_bw=300e9, inter_bw=25e9, matmul_eff=0.85, matmul_half=0.4e9,
                       host_mem_bytes=128 * GiB, pcie_bw=24e9, cpu_adam_rate=0.5e9,
                       source="NVIDIA A100 SXM4 40GB datasheet; DGX A100 (8x HDR 200 Gb/s)"),
    "a100-80g": Device("a100-80g", flops=312e12, dtype="bf16", mem_bytes=80e9, mem_bw=2.039e12,
                       intra_bw=300e9, inter_bw=25e9, matmul_eff=0.85, matmul_half=0.4e9,
                       host_mem_bytes=256 * GiB, pcie_bw=24e9, cpu_adam_rate=0.5e9,
                       source="NVIDIA A100 SXM4 80GB datasheet; DGX A100 (8x HDR 200 Gb/s)"),
    "h100-80g": Device("h100-80g", flops=989e12, dtype="bf16", mem_bytes=80e9, mem_bw=3.35e12,
                       intra_bw=450e9, inter_bw=50e9, matmul_eff=0.81, matmul_half=1.5e9,
                       host_mem_bytes=256 * GiB, pcie_bw=55e9, cpu_adam_rate=0.65e9,
                       source="NVIDIA H100 SXM5 datasheet; DGX H100 (8x NDR 400 Gb/s)"),
    "h200": Device("h200", flops=989e12, dtype="bf16", mem_bytes=141e9, mem_bw=4.8e12,
                   intra_bw=450e9, inter_bw=50e9, matmul_eff=0.81, matmul_half=1.5e9,
                   host_mem_bytes=256 * GiB, pcie_bw=55e9, cpu_adam_rate=0.65e9,
                   source="NVIDIA H200 SXM datasheet; HGX H200 (8x NDR 400 Gb/s)"),
    # This project's 2-core CI/dev VM, one process per core with one thread each, fp32 (bf16
    # matmul is ~160x slower there); gloo over loopback. Rates measured with
    # `gigatrain plan --calibrate` (docs/benchmarks.md, Planner; the matmul table as its
    # monotone envelope, see ``calibrate.matmul_envelope``); memory is the VM's 23 GiB shared by
    # the two ranks. gloo's reductions and copies take the cores the compute uses: no overlap.
    # Fixed costs of one thread on a core (2026-12-01 calibration, its 4-rank figures halved):
    # 0.25 ms per block forward, 0.87 ms backward, 0.07 ms per call.
    "cpu": Device("cpu", flops=160e9, dtype="fp32", mem_bytes=11.7 * GiB, mem_bw=13e9,
                  intra_bw=0.47e9, inter_bw=0.47e9, intra_alpha=0.7e-3, inter_alpha=0.7e-3, link_eff=1.0,
                  matmul_table=((5.2e5, 40e9), (4.2e6, 48e9), (3.4e7, 52e9), (2.7e8, 52e9), (2.1e9, 52e9)),
                  host_mem_bytes=11.7 * GiB, pcie_bw=13e9, cpu_adam_rate=0.15e9, nvme_bw=0.5e9,
                  runtime_bytes=0.45 * GiB, alloc_margin=0.0, gpus_per_node=2, comm_overlap=False,
                  block_fixed_f=0.25e-3, block_fixed_b=0.87e-3, action_overhead=0.07e-3,
                  source="2-core Xeon VM (AVX-512), 1 thread per rank, measured"),
}


def device_names() -> list[str]:
    return sorted(PRESETS)


def get_device(name_or_path: str | os.PathLike) -> Device:
    """A preset by name (``a100-40g``, ``a100-80g``, ``h100-80g``, ``h200``, ``cpu``) or a JSON
    file written by ``gigatrain plan --calibrate``. Raises ``ValueError`` with the list of
    presets for an unknown name, or naming the missing/bad key of a file."""
    text = os.fspath(name_or_path)
    if text.lower() in PRESETS:
        return PRESETS[text.lower()]
    if text.endswith(".json") or os.path.sep in text:
        if not os.path.isfile(text):
            raise ValueError(f"--gpu {text}: no such file (write one with `gigatrain plan --calibrate --out {text}`)")
        try:
            with open(text) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--gpu {text}: not a readable device JSON file ({e})") from None
        return device_from_dict(data, source=text)
    raise ValueError(f"--gpu {text}: unknown device; choose one of {', '.join(device_names())}, or give a "
                     "JSON file written by `gigatrain plan --calibrate`")


def device_from_dict(data: dict, source: str = "") -> Device:
    """Build a ``Device`` from a dict with ``Device``'s field names (unknown keys refused)."""
    names = set(Device.__dataclass_fields__)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"device file {source}: unknown keys {unknown}; expected some of {sorted(names)}")
    missing = [k for k in ("name", "flops", "dtype", "mem_bytes", "mem_bw", "intra_bw", "inter_bw") if k not in data]
    if missing:
        raise ValueError(f"device file {source}: missing keys {missing}")
    d = dict(data)
    d["matmul_table"] = tuple(tuple(float(v) for v in x) for x in d.get("matmul_table", ()))
    if d["matmul_table"] and any(len(x) != 2 for x in d["matmul_table"]):
        raise ValueError(f"device file {source}: matmul_table must be a list of [flops, rate] pairs")
    d["matmul_table"] = tuple(sorted(d["matmul_table"]))
    fits = d.get("collective_fits", ())
    if any(len(x) != 3 for x in fits):
        raise ValueError(f"device file {source}: collective_fits must be a list of [op, alpha, bw] triples")
    d["collective_fits"] = tuple((str(op), float(a), float(b)) for op, a, b in fits)
    return Device(**d)


def with_node_size(dev: Device, gpus_per_node: int) -> Device:
    return replace(dev, gpus_per_node=gpus_per_node)
