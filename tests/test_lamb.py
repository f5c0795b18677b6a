"""LAMB: the update against a direct transcription of You et al.'s Algorithm 2 (ladder 0), and
every data-parallel layout (ZeRO 0-3, CPU offload) against one process (ladder 3, one spawn)."""
import math

import pytest
import torch

from dist_utils import assert_curves_close, spawn
from gigatrain.optim.lamb import Lamb
from test_train import tiny


def _paper_step(x, g, m, v, t, lr, b1, b2, eps, wd):
    """One step of Algorithm 2 for one layer, element by element as the paper writes it."""
    x, g, m, v = x.tolist(), g.tolist(), m.tolist(), v.tolist()
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    mh = [mi / (1 - b1 ** t) for mi in m]
    vh = [vi / (1 - b2 ** t) for vi in v]
    r = [a / (math.sqrt(b) + eps) for a, b in zip(mh, vh)]
    u = [ri + wd * xi for ri, xi in zip(r, x)]
    xn, un = math.sqrt(sum(a * a for a in x)), math.sqrt(sum(a * a for a in u))
    trust = xn / un if xn > 0 and un > 0 else 1.0
    x = [xi - lr * trust * ui for xi, ui in zip(x, u)]
    return torch.tensor(x), torch.tensor(m), torch.tensor(v)


@pytest.mark.rung0
def test_lamb_matches_the_papers_update():
    torch.manual_seed(0)
    shapes = [(6, 4), (5,), (3, 3)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    with torch.no_grad():
        params[2].zero_()       # ||x|| = 0: the trust ratio falls back to 1
    hyper = dict(lr=0.02, b1=0.9, b2=0.99, eps=1e-6)
    wds = [0.1, 0.0, 0.1]
    opt = Lamb([{"params": [p], "weight_decay": wd} for p, wd in zip(params, wds)], lr=hyper["lr"],
               betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"])
    ref = [(p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for t in range(1, 6):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = [_paper_step(x.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), t, wd=wd, **hyper)
               for (x, m, v), g, wd in zip(ref, grads, wds)]
        for p, (x, m, v) in zip(params, ref):
            assert torch.allclose(p.detach().reshape(-1).double(), x.double(), rtol=1e-6, atol=1e-7)
    # A flat tensor holding the same two parameters, with spans, takes the same steps.
    a, b = torch.randn(6), torch.randn(4)
    whole = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
    flat = torch.nn.Parameter(torch.cat([a, b]))
    o1 = Lamb([{"params": whole, "weight_decay": 0.1}], lr=0.05)
    o2 = Lamb([{"params": [flat], "weight_decay": 0.1, "spans": [[(0, 6, 0), (6, 10, 1)]], "shard_keys": 2}],
              lr=0.05)
    for _ in range(3):
        ga, gb = torch.randn(6), torch.randn(4)
        whole[0].grad, whole[1].grad, flat.grad = ga, gb, torch.cat([ga, gb])
        o1.step()
        o2.step()
    assert torch.allclose(torch.cat([whole[0], whole[1]]), flat, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        Lamb([torch.nn.Parameter(torch.zeros(2))], lr=-1.0)


LAYOUTS = [("0", "none"), ("1", "none"), ("2", "none"), ("3", "none"), ("1", "cpu"), ("2", "cpu"), ("3", "cpu")]


def _lamb(tmp, tag, *extra):
    from gigatrain.trainer import train
    # Small buckets: parameters are cut between the two ranks' shards and between buckets.
    return train(tiny(tmp, "train.optimizer=lamb", "train.lr=0.02", "parallel.bucket_mb=0.004",
                      f"out={tmp}/{tag}", *extra), quiet=True).losses


def _two_ranks(rank, world, tmp):
    return {f"zero{z}-{o}": _lamb(tmp, f"z{z}{o}", f"parallel.zero={z}", f"parallel.offload={o}")
            for z, o in LAYOUTS}


@pytest.mark.rung3
def test_lamb_every_zero_stage_and_offload_equals_one_process(tmp_path):
    from gigatrain.data import prepare_dataset
    prepare_dataset(tiny(tmp_path).data, 32)
    one = _lamb(tmp_path, "one")
    assert one[-1] < one[0] - 0.1
    for r in spawn(_two_ranks, 2, str(tmp_path), timeout_s=240):
        assert sorted(r) == sorted(f"zero{z}-{o}" for z, o in LAYOUTS)
        for key, losses in r.items():
            assert_curves_close(losses, one, rtol=1e-5, what=key)
    # The weights too (more sensitive than the loss to a trust ratio taken from a partial norm).
    from gigatrain.checkpoint import load_checkpoint
    ref = load_checkpoint(tmp_path / "one" / "checkpoints" / "step_000010").params
    for z, o in LAYOUTS:
        got = load_checkpoint(tmp_path / f"z{z}{o}" / "checkpoints" / "step_000010").params
        for name, w in ref.items():
            assert float((got[name] - w).norm()) <= 1e-5 * float(w.norm()), (z, o, name)
