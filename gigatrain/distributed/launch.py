"""Process start-up: who am I, where is the rendezvous, which device, and a clean teardown.

Ranks come from the environment that the launcher set: torchrun (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), SLURM's ``srun`` (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``), or nothing (one process).
``gigatrain train --nproc N`` starts N local workers through torch's own elastic launcher, which
sets the torchrun variables, so every path ends in the same ``read_env``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun" | "slurm" | "single"

    @property
    def is_distributed_launch(self) -> bool:
        return self.source != "single"


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM compressed host list, e.g. ``"gpu[01-03,07],login1"``.

    Zero padding is kept (``gpu[08-10]`` -> gpu08, gpu09, gpu10). ``scontrol show hostnames`` does
    the same, but it is not installed inside every container, so we parse it ourselves.
    """
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", part)
        if not m:
            hosts.append(part)
            continue
        prefix, body, suffix = m.groups()
        for item in body.split(","):
            r = _RANGE.match(item)
            if r:
                lo, hi = r.groups()
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size and rendezvous address from torchrun's or SLURM's variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    # Only tasks started by srun have a step id; a batch script or salloc shell inside the
    # allocation also has SLURM_PROCID/NTASKS but is not one of the job's ranks.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and (
            "SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = int(env["SLURM_NTASKS"])
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        master = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
        # A port derived from the job id lets two jobs share a node without colliding.
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        # SLURM_TASKS_PER_NODE looks like "4(x2),3": take this node's count when it is uniform.
        first = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
        local_world = int(first.group()) if first else 1
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world,
            master_addr=master,
            master_port=port,
            source="slurm",
        )
    return DistEnv()


def pick_device(env: DistEnv) -> torch.device:
    """One GPU per process (``cuda:local_rank``) when CUDA exists, else the CPU."""
    if torch.cuda.is_available():
        idx = env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def pick_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def distributed(env: DistEnv, backend: str = "auto", timeout_s: float = 600.0,
                device: torch.device | None = None) -> Iterator[torch.device]:
    """Initialise the default process group and always tear it down, also on errors.

    Yields the device this process should use. With one process a local store is used, so no
    port is opened. ``timeout_s`` bounds every collective: a peer that died or diverged makes
    the others fail with a timeout instead of hanging forever.
    """
    device = device or pick_device(env)
    backend = pick_backend(backend, device)
    timeout = datetime.timedelta(seconds=timeout_s)
    created = False
    if not dist.is_initialized():
        if env.world_size == 1 and not env.is_distributed_launch:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                    timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        created = True
    ok = False
    try:
        yield device
        ok = True
    finally:
        if created and dist.is_initialized():
            quiesce(ok)
            dist.destroy_process_group()


def quiesce(all_ranks_alive: bool) -> None:
    """Let in-flight gloo work finish before the process group goes away.

    Reference cycles (optimizer, hooks) can keep finished gloo work objects alive until
    interpreter shutdown, and a gloo thread releasing one then aborts the process. Collecting
    them, and a last barrier when every rank got here normally, avoids that.
    """
    import gc
    import time

    gc.collect()
    if all_ranks_alive and dist.get_world_size() > 1:
        dist.barrier()
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, argv: Sequence[str], extra_env: Mapping[str, str] | None = None,
                 max_restarts: int = 0) -> int:
    """Start ``nproc`` workers on this machine through torch's elastic launcher.

    Each worker runs ``python -m gigatrain <argv>`` with the torchrun variables set, which is the
    code path a cluster uses. Returns 0 on success and the first failing worker's exit code
    otherwise (the launcher tears down the other workers).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for key, value in (extra_env or {}).items():
        os.environ[key] = value
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"gigatrain-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "gigatrain", *argv)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c), 1)
    return 0
