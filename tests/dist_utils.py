"""Test-side helpers for process groups and curves.

- ``spawn`` (ladder 3: real gloo processes), ``one_process`` (the one-process oracle inside the
  test process), ``fake_process_group`` (ladder 1);
- ``assert_curves_close``: compare two loss curves step by step, lengths first;
- ``engine_for``: an engine over a mesh from a few keyword choices (the plan spelled out).
"""
import contextlib
import math

import torch

from gigatrain.distributed.launch import DistEnv, distributed
from gigatrain.distributed.spawn import spawn


def one_process():
    """A world of one gloo process in this process, torn down on exit (a context manager)."""
    return distributed(DistEnv(), backend="gloo", device=torch.device("cpu"))


@contextlib.contextmanager
def fake_process_group(world: int, rank: int = 0):
    """A fake default process group of ``world`` ranks seen from ``rank`` (no communication)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def assert_curves_close(got, want, rtol: float, what: str = "loss", atol: float = 0.0) -> None:
    """Every step of ``got`` within ``rtol`` (relative) of ``want``. The curves must have the
    same, non-zero length: a run that produced no steps, or fewer, fails instead of passing an
    empty comparison."""
    got, want = list(got), list(want)
    assert len(want) > 0, f"{what}: the reference curve is empty"
    assert len(got) == len(want), f"{what}: {len(got)} steps, the reference has {len(want)}"
    for step, (a, b) in enumerate(zip(got, want)):
        assert math.isfinite(a) and math.isfinite(b), f"{what} at step {step}: {a} vs {b}"
        err = abs(a - b)
        assert err <= atol + rtol * abs(b), f"{what} at step {step}: {a} vs {b} (relative {err / max(abs(b), 1e-30):.2e} > {rtol:g})"


def engine_for(model, mesh, optimizer_factory, *, zero: int = 0, offload: str = "none", offload_dir=None,
               precision: str = "fp32", grad_clip=None, bucket_mb: float = 25.0, loss_fn=None, hooks=()):
    """``gigatrain.api.parallelize`` with the plan built from keywords (data parallel / ZeRO)."""
    from gigatrain.api import parallelize
    from gigatrain.parallel.policies import OffloadPolicy, ParallelPlan, ZeroPolicy

    plan = ParallelPlan(dims=mesh.dims, zero=ZeroPolicy(zero, bucket_mb), offload=OffloadPolicy(offload or "none", offload_dir),
                        precision=precision, grad_clip=grad_clip)
    return parallelize(model, mesh, optimizer_factory, plan, loss_fn=loss_fn, hooks=hooks)


__all__ = ["assert_curves_close", "engine_for", "fake_process_group", "one_process", "spawn"]
