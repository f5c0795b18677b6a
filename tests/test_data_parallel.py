"""Our bucketed data parallel against torch DDP and one process (ladder 3, one spawn)."""
import torch
import torch.nn as nn

from dist_utils import spawn
import pytest

pytestmark = pytest.mark.rung3


def _toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _data(step, n=16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def _check_dp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.parallel.data_parallel import DataParallel

    mesh = Mesh(ParallelDims(dp=world), torch.device("cpu"))
    out = {}
    # Three set-ups, same global batch of 16 per step: ours with 2 micro-batches per rank and tiny
    # buckets (several all-reduces, accumulation without sync), DDP with no_sync, and one process.
    ours = _toy(seed=rank)          # different init per rank: broadcast must fix it
    dp = DataParallel(ours, mesh.dp, bucket_mb=0.002)
    out["n_buckets"] = len(dp.buckets.buckets)
    ddp_model = _toy()
    ddp = DDP(ddp_model)
    ref = _toy()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, ddp_model, ref)]
    local = 16 // world
    mesh.stats.reset()
    for step in range(3):
        x, y = _data(step)
        xs, ys = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        halves = [(xs[: local // 2], ys[: local // 2]), (xs[local // 2:], ys[local // 2:])]
        for i, (a, b) in enumerate(halves):
            dp.set_sync(i == 1)
            (nn.functional.mse_loss(ours(a), b) / 2).backward()
            dp.after_backward()
        with ddp.no_sync():
            (nn.functional.mse_loss(ddp(halves[0][0]), halves[0][1]) / 2).backward()
        (nn.functional.mse_loss(ddp(halves[1][0]), halves[1][1]) / 2).backward()
        nn.functional.mse_loss(ref(x), y).backward()
        if step == 0:
            out["grad_vs_ddp"] = max((p.grad - q.grad).abs().max().item()
                                     for p, q in zip(ours.parameters(), ddp_model.parameters()))
            out["grad_vs_ref"] = max((p.grad - q.grad).abs().max().item()
                                     for p, q in zip(ours.parameters(), ref.parameters()))
            out["bytes_step0"] = mesh.stats.total_sent("dp")
        for o in opts:
            o.step()
        dp.zero_grad()
        opts[1].zero_grad()
        opts[2].zero_grad()
    out["param_vs_ref"] = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), ref.parameters()))
    out["grads_are_views"] = all(
        b.buffer.data_ptr() <= p.grad.data_ptr()
        and p.grad.data_ptr() + p.grad.numel() * p.grad.element_size()
        <= b.buffer.data_ptr() + b.buffer.numel() * b.buffer.element_size()
        for b in dp.buckets.buckets for p in b.params)
    out["numel"] = sum(p.numel() for p in ours.parameters())
    return out


def test_data_parallel_matches_ddp_and_one_process():
    for world in (2,):
        res = spawn(_check_dp, world)
        for r in res:
            assert r["n_buckets"] > 2
            assert r["grad_vs_ddp"] < 1e-6
            assert r["grad_vs_ref"] < 1e-6
            assert r["param_vs_ref"] < 1e-5
            assert r["grads_are_views"]
            # All-reduce volume: 2 (N-1)/N x P x 4 bytes, sent once per step (not per micro-step).
            assert r["bytes_step0"] == round(2 * (world - 1) / world * r["numel"] * 4) or \
                abs(r["bytes_step0"] - 2 * (world - 1) / world * r["numel"] * 4) <= r["n_buckets"]
