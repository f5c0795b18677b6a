"""1-bit Adam: sign packing (ladder 0); the compressed all-reduce, the bytes per step before and
after the warm-up, and ranks staying identical (ladder 3, one spawn)."""
import pytest
import torch

from dist_utils import engine_for, spawn
from gigatrain.optim.onebit import OneBitAdam, pack_signs, unpack_signs

WARMUP = 3


@pytest.mark.rung0
def test_signs_pack_eight_to_a_byte():
    x = torch.randn(64)
    x[5] = 0.0
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == 8
    assert torch.equal(unpack_signs(packed), torch.where(x >= 0, 1.0, -1.0))


@pytest.mark.rung0
def test_one_process_is_adamw_then_frozen_variance():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    b.data.copy_(a.data)
    ours = OneBitAdam([a], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1, warmup=WARMUP)
    ref = torch.optim.AdamW([b], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1)
    for step in range(WARMUP + 2):
        g = torch.randn(10)
        a.grad, b.grad = g.clone(), g.clone()
        v_before = ours.state[a]["exp_avg_sq"].clone() if ours.state else None
        ours.step()
        ref.step()
        if step < WARMUP:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        else:       # the variance no longer moves
            assert torch.equal(ours.state[a]["exp_avg_sq"], v_before)
    assert not ours.local_gradients       # no group to compress over


def _gpt():
    from types import SimpleNamespace

    from gigatrain.models import build_model
    torch.manual_seed(0)
    return build_model(SimpleNamespace(name="gpt", n_layer=2, n_head=2, d_model=32, seq_len=16), vocab_size=64)


def _two_ranks(rank, world):
    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.optim.onebit import CompressedAllReduce

    mesh = Mesh(ParallelDims(dp=world, pp=1, tp=1), torch.device("cpu"))
    out = {}
    # The compressed average with error feedback: the same on every rank, and over many calls
    # its running sum follows the true one (the errors are carried, not lost).
    # A persistent signal plus noise, as momenta are from step to step.
    g = torch.Generator().manual_seed(rank)
    base = torch.randn(1001, generator=g)
    xs = [base + 0.3 * torch.randn(1001, generator=g) for _ in range(40)]
    car = CompressedAllReduce(mesh.dp, 1001, torch.device("cpu"))
    got = torch.stack([car(x) for x in xs])
    true = torch.stack(xs).clone()
    mesh.dp.all_reduce(true)
    true /= world
    out["avg"] = got
    out["drift"] = [float((got[:k].sum(0) - true[:k].sum(0)).norm() / true[:k].sum(0).norm()) for k in (1, 10, 40)]

    model = _gpt()
    engine = engine_for(model, mesh, lambda groups: OneBitAdam(groups, lr=3e-3, warmup=WARMUP, weight_decay=0.1),
                        grad_clip=1.0)
    # One fixed batch per rank, so that the loss has something to learn.
    seq = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(100 + rank))
    sent, losses = [], []
    for step in range(WARMUP + 4):
        before = mesh.stats.total_sent("dp")
        losses.append(engine.train_step([(seq[:, :-1], seq[:, 1:])], lr=3e-3).loss)
        sent.append(mesh.stats.total_sent("dp") - before)
    out["sent"], out["losses"] = sent, losses
    out["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out["ops"] = sorted(op for (grp, op) in mesh.stats.sent if grp == "dp")
    engine.close()
    return out


@pytest.mark.rung3
def test_compressed_allreduce_bytes_and_identical_ranks():
    r0, r1 = spawn(_two_ranks, 2, timeout_s=120)
    assert torch.equal(r0["avg"], r1["avg"])
    # One call is coarse (signs), but the error is fed back, not lost: the relative error of the
    # running sum shrinks like 1/calls (without feedback it would stay at the first call's).
    one, ten, forty = r0["drift"]
    assert one > 0.3 and ten < one / 3 and forty < ten / 2, r0["drift"]
    # Warm-up steps all-reduce fp32 gradients; compressed steps send >= 90% fewer bytes.
    warm, comp = r0["sent"][:WARMUP], r0["sent"][WARMUP:]
    assert min(warm) > 0 and max(comp) <= 0.1 * min(warm), r0["sent"]
    assert "all_to_all" in r0["ops"]
    # Every rank took the same steps from the same averaged momentum.
    assert torch.equal(r0["params"], r1["params"])
    assert r0["losses"][-1] < r0["losses"][0]


STEPS = 10


def _batch(step, rank):
    seq = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1000 * step + rank))
    return [(seq[:, :-1], seq[:, 1:])]


def _run(mesh, zero, steps, *, start=0, load=None, save_at=None, save_dirs=()):
    """Train ``steps`` steps at ZeRO stage ``zero`` from ``start`` (loading ``load`` first);
    save into ``save_dirs`` (one per checkpoint format) after ``save_at`` steps."""
    model = _gpt()
    engine = engine_for(model, mesh, lambda groups: OneBitAdam(groups, lr=3e-3, warmup=WARMUP, weight_decay=0.1),
                        zero=zero, grad_clip=1.0)
    if load is not None:
        assert engine.load(load) == start
    losses, sent, handed = [], [], []
    for step in range(start, start + steps):
        before = mesh.stats.total_sent("dp")
        losses.append(engine.train_step(_batch(step, mesh.dp.rank), lr=3e-3).loss)
        sent.append(mesh.stats.total_sent("dp") - before)
        handed.append(getattr(engine.strategy, "handed_over", None))
        if step == start:
            states = [t for st in engine.optimizer.state.values() for k, t in st.items() if k != "step"]
            state_numel = sum(t.numel() for t in states)
        if step + 1 == save_at:
            for d, sharded in save_dirs:
                engine.save(d, sharded=sharded)
    params = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    engine.close()
    return {"losses": losses, "sent": sent, "handed": handed, "params": params, "state_numel": state_numel}


def _zero1_vs_zero0(rank, world, root):
    from gigatrain.distributed.mesh import Mesh, ParallelDims

    mesh = Mesh(ParallelDims(dp=world, pp=1, tp=1), torch.device("cpu"))
    out = {"z0": _run(mesh, 0, STEPS), "z1": _run(mesh, 1, STEPS)}
    # Saved inside the warm-up (ZeRO-1 shards) and resumed: the hand-over happens after the resume.
    # Saved after the hand-over (data parallel's whole state), resumed into a fresh ZeRO-1 strategy,
    # which hands over at the load.
    early, late = WARMUP - 1, WARMUP + 2
    dirs = {k: [(f"{root}/{k}_sharded", True), (f"{root}/{k}_whole", False)] for k in ("early", "late")}
    _run(mesh, 1, early, save_at=early, save_dirs=dirs["early"])
    _run(mesh, 1, late, save_at=late, save_dirs=dirs["late"])
    for k, at in (("early", early), ("late", late)):
        for d, sharded in dirs[k]:
            out[f"{k}_{'sharded' if sharded else 'whole'}"] = _run(
                mesh, 1, STEPS - at, start=at, load=f"{d}/step_{at:06d}")
    return out


@pytest.mark.rung3
def test_zero1_takes_the_steps_of_data_parallel(tmp_path):
    """ZeRO-1 with 1-bit Adam: the warm-up over shards, then the compressed steps of zero=0; the
    same losses as zero=0 in both phases, >= 90% fewer bytes after the warm-up, and a checkpoint
    from either phase resumes into the uninterrupted run."""
    from dist_utils import assert_curves_close

    r0, r1 = spawn(_zero1_vs_zero0, 2, str(tmp_path), timeout_s=240)
    z0, z1 = r0["z0"], r0["z1"]
    assert_curves_close(z1["losses"], z0["losses"], rtol=1e-5)
    assert torch.allclose(z1["params"], z0["params"], rtol=1e-4, atol=1e-6)
    assert torch.equal(r0["z1"]["params"], r1["z1"]["params"])
    # During the warm-up each rank holds the Adam moments of its own shard only.
    assert z1["state_numel"] <= 0.55 * z0["state_numel"], (z1["state_numel"], z0["state_numel"])
    # Handed over at the end of the last warm-up step.
    assert z1["handed"] == [False] * (WARMUP - 1) + [True] * (STEPS - WARMUP + 1), z1["handed"]
    warm, comp = z1["sent"][:WARMUP], z1["sent"][WARMUP:]
    assert min(warm) > 0 and max(comp) <= 0.1 * min(warm), z1["sent"]
    assert max(comp) <= 1.01 * max(z0["sent"][WARMUP:]), (z1["sent"], z0["sent"])
    # Resumed inside the warm-up: the same continuation, across the hand-over.
    for fmt in ("sharded", "whole"):
        early = r0[f"early_{fmt}"]
        assert_curves_close(early["losses"], z1["losses"][WARMUP - 1:], rtol=1e-6, what=f"loss after {fmt} resume")
        assert torch.equal(early["params"], z1["params"])
        # Resumed after the hand-over: handed over at the load; the error-feedback buffers (each
        # rank's own, not part of a layout-independent checkpoint) restart at zero, so the
        # continuation is close rather than equal.
        late = r0[f"late_{fmt}"]
        assert all(late["handed"]), late["handed"]
        assert_curves_close(late["losses"], z1["losses"][WARMUP + 2:], rtol=1e-2, what=f"loss after {fmt} resume")
