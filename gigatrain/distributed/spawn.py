"""Run a function on N local gloo processes and collect each rank's return value.

Used by the tests (ladder 3) and the benchmarks: one call starts the processes once, so a test
can batch many checks into one spawn.
"""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from .launch import free_port, quiesce


def _worker(rank, world, port, fn, args, outdir, timeout_s):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    result = None
    ok = False
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world, *args))
        ok = True
    except BaseException as e:  # report, then fail the spawn
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise
    finally:
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            quiesce(ok)
            dist.destroy_process_group()


def spawn(fn, world_size: int, *args, timeout_s: float = 60.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the list of results.

    ``fn`` must be importable (a module-level function). Collectives time out after ``timeout_s``
    so a bug fails the test instead of hanging it.
    """
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_worker, args=(world_size, free_port(), fn, args, d, timeout_s),
                     nprocs=world_size, join=True)
        finally:
            msgs = []
            for r in range(world_size):
                p = os.path.join(d, f"rank{r}.pkl")
                if os.path.exists(p):
                    with open(p, "rb") as f:
                        status, val = pickle.load(f)
                    if status == "error":
                        msgs.append(f"rank {r}: {val}")
            if msgs:
                raise AssertionError("\n".join(msgs))
        out = []
        for r in range(world_size):
            with open(os.path.join(d, f"rank{r}.pkl"), "rb") as f:
                out.append(pickle.load(f)[1])
        return out
