"""ZeRO stage 3 and NVMe offload.

Ladder 0: the NVMe optimizer against torch's AdamW/SGD, its disk-space check and clean-up, unit
detection. Ladder 3 (one spawn per world size, every configuration batched): stage 3 with offload
none / cpu / nvme on 2 and 4 gloo ranks against one process (fp32: SGD within 1e-5 and AdamW
within 1e-4 per step over 10 steps, with gradient accumulation and clipping), bytes sent per step
(3P(N-1)/N), model-state bytes with bf16 + AdamW measured by ``memory.measure_model_state_bytes``
(16P/N; with offload=cpu 2P/N on the device and 14P/N on the host, as ``memory.model_state_bytes``
says), at most two blocks gathered at once, the fp16 overflow skip, and a checkpoint saved by
stage 3 on 2 ranks loaded by stage 0 on 1 rank and by stage 3 (offload none / cpu / nvme) and
stage 2 on 4 ranks, all training on with the same losses.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from dist_utils import assert_curves_close, one_process, spawn

STEPS = 10
GLOBAL_BATCH = 8
LR = 1e-2
# (optimizer, micro-batches per rank, clip): each feature appears with both optimizers.
CASES = [("sgd", 1, None), ("adamw", 1, 0.3), ("adamw", 2, None), ("sgd", 2, 0.3)]
OFFLOADS = ("none", "cpu", "nvme")
CKPT_STEPS = 3          # steps before the checkpoint; as many again after it


# -- shared helpers (module level: spawned processes import them) --------------------------------
def _gpt(n_layer: int = 2, seed: int = 0):
    from gigatrain.models import build_model
    torch.manual_seed(seed)
    return build_model(SimpleNamespace(name="gpt", n_layer=n_layer, n_head=2, d_model=32, seq_len=16),
                       vocab_size=64)


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    seq = torch.randint(0, 64, (GLOBAL_BATCH, 17), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _micro(step: int, rank: int, world: int, accum: int):
    """This rank's micro-batches of the global batch of ``step``."""
    x, y = _batch(step)
    b = GLOBAL_BATCH // world
    x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
    m = b // accum
    return [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m]) for i in range(accum)]


def _engine(model, mesh, opt: str, *, zero: int, clip=None, offload="none", offload_dir=None,
            precision="fp32"):
    from dist_utils import engine_for
    from gigatrain.optim import build_optimizer

    dev = torch.device("cpu")
    tcfg = SimpleNamespace(optimizer=opt, lr=LR, weight_decay=0.1, betas=(0.9, 0.95), momentum=0.9)
    return engine_for(model, mesh, lambda groups: build_optimizer(tcfg, groups, dev), precision=precision,
                      zero=zero, grad_clip=clip, offload=offload, offload_dir=offload_dir)


class _Box:
    """An output type stage 3 cannot look into (not a tensor, tuple, list or dict)."""

    def __init__(self, t):
        self.t = t


class _OpaqueBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return _Box(torch.tanh(self.lin(x.t if isinstance(x, _Box) else x)))


class _Opaque(nn.Module):
    """Blocks and model return ``_Box``es: units must then stay gathered until their backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(_OpaqueBlock() for _ in range(3))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return _Box(self.out(h.t))


def _opaque_run(mesh, rank, world, zero):
    from dist_utils import engine_for

    eng = engine_for(_Opaque(), mesh, lambda g: torch.optim.SGD([{"params": x["params"]} for x in g], lr=0.1),
                     zero=zero, loss_fn=lambda out, y: nn.functional.mse_loss(out.t, y))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    b = 8 // world
    return [eng.train_step([(x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b])], lr=0.1).loss
            for _ in range(3)]


def _mesh(world: int):
    from gigatrain.distributed.mesh import Mesh, ParallelDims
    return Mesh(ParallelDims(dp=world), torch.device("cpu"))


def _train(eng, mesh, rank, world, accum, steps):
    out = []
    for s in steps:
        r = eng.train_step(_micro(s, rank, world, accum), lr=LR)
        out.append((r.loss, r.grad_norm))
    return out



def _release_groups() -> None:
    """Collect reference cycles (torch's optimizer constructor leaves one holding its caller's
    frames) so the process groups they keep alive are destroyed with the group, not during
    interpreter shutdown: a gloo worker thread that then drops a collective issued inside
    backward (its thread-local state holds a Python object) aborts the process."""
    gc.collect()


# -- workers --------------------------------------------------------------------------------------
def _oracle_runs() -> dict:
    mesh = _mesh(1)
    out = {}
    for opt, accum, clip in CASES:
        eng = _engine(_gpt(), mesh, opt, zero=0, clip=clip)
        out[(opt, accum, clip)] = _train(eng, mesh, 0, 1, accum, range(STEPS))
    eng = _engine(_gpt(), mesh, "adamw", zero=0)
    out["ckpt"] = _train(eng, mesh, 0, 1, 1, range(2 * CKPT_STEPS))
    out["opaque"] = _opaque_run(mesh, 0, 1, 0)
    return out


def _resume_stage0(ckpt_dir: str) -> list:
    from gigatrain.checkpoint import load_checkpoint
    mesh = _mesh(1)
    eng = _engine(_gpt(seed=5), mesh, "adamw", zero=0)
    ck = load_checkpoint(ckpt_dir)
    eng.load_full_state(ck.params, ck.optim)
    return _train(eng, mesh, 0, 1, 1, range(CKPT_STEPS, 2 * CKPT_STEPS))


def _worker(rank: int, world: int, offload_root: str, ckpt_root: str, ckpt_in: str | None) -> dict:
    from gigatrain.checkpoint import save_checkpoint
    from gigatrain.parallel.zero.memory import measure_model_state_bytes
    from gigatrain.parallel.zero.stage3 import Stage3Strategy

    torch.manual_seed(1234 + rank)      # different per rank: stage 3 must start from rank 0's weights
    mesh = _mesh(world)
    out: dict = {"runs": {}}
    for offload in OFFLOADS:
        for opt, accum, clip in CASES:
            eng = _engine(_gpt(seed=rank), mesh, opt, zero=3, clip=clip, offload=offload,
                          offload_dir=offload_root)
            out["runs"][(offload, opt, accum, clip)] = _train(eng, mesh, rank, world, accum, range(STEPS))
            if offload == "nvme":
                opt_dir = eng.optimizer.folder
                eng.strategy.close()
                out.setdefault("nvme_dirs_removed", []).append(not os.path.exists(opt_dir))

    out["opaque"] = _opaque_run(mesh, rank, world, 3)

    # Bytes sent per step, and the number of blocks gathered at once (4 blocks).
    eng = _engine(_gpt(n_layer=4), mesh, "adamw", zero=3)
    st: Stage3Strategy = eng.strategy
    gathered = []
    orig = st._ensure_full

    def spy(u):
        orig(u)
        gathered.append(sum(b.state != "free" for b in st.blocks))
    st._ensure_full = spy
    _train(eng, mesh, rank, world, 1, range(1))
    mesh.stats.reset()
    _train(eng, mesh, rank, world, 1, range(1, 2))
    out["comm"] = dict(mesh.stats.sent)
    out["comm_numel"] = sum(p.numel() for p in eng.model.parameters())
    out["max_blocks_gathered"] = max(gathered)
    out["released_after_step"] = all(u.full.untyped_storage().nbytes() == 0 for u in st.units)

    # Model-state bytes with bf16 parameters/gradients and fp32 master + AdamW moments, measured
    # by walking what the strategy, optimizer and model hold; offload=cpu splits device / host.
    out["mem"] = {}
    for offload in ("none", "cpu"):
        eng = _engine(_gpt(), mesh, "adamw", zero=3, precision="bf16", offload=offload)
        _train(eng, mesh, rank, world, 1, range(1))
        out["mem"][offload] = measure_model_state_bytes(eng.strategy, eng.optimizer, eng.model,
                                                        host=eng.strategy.host_tensors())
    out["mem_numel"] = sum(p.numel() for p in eng.model.parameters())

    # fp16: an overflow on one rank skips the step on every rank and leaves the weights alone.
    from gigatrain.trainer import InjectOverflow
    eng = _engine(_gpt(), mesh, "adamw", zero=3, precision="fp16")
    before, _ = eng.full_state()
    eng.hooks = [InjectOverflow(1)] if rank == world - 1 else []
    r = eng.train_step(_micro(0, rank, world, 1), lr=LR)
    after, _ = eng.full_state()
    out["fp16_skipped"] = r.skipped
    out["fp16_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    r = eng.train_step(_micro(1, rank, world, 1), lr=LR)
    out["fp16_next_ok"] = (not r.skipped) and r.loss == r.loss

    # Checkpoints: written here (2 ranks) or read from ckpt_in (4 ranks).
    if ckpt_in is None:
        eng = _engine(_gpt(seed=rank), mesh, "adamw", zero=3)
        _train(eng, mesh, rank, world, 1, range(CKPT_STEPS))
        params, optim = eng.full_state()
        path = save_checkpoint(ckpt_root, CKPT_STEPS, rank=rank, world_comm=mesh.world, params=params,
                               optim=optim, meta={}, device=torch.device("cpu"))
        out["ckpt_path"] = str(path)
        out["ckpt_keys"] = sorted(params)
        out["ckpt_optim_keys"] = sorted(next(iter(optim.values())))
        out["ckpt_continue"] = _train(eng, mesh, rank, world, 1, range(CKPT_STEPS, 2 * CKPT_STEPS))
    else:
        from gigatrain.checkpoint import load_checkpoint
        ck = load_checkpoint(ckpt_in, rank=rank)
        out["resumed"] = {}
        for zero, offload in ((3, "none"), (3, "cpu"), (3, "nvme"), (2, "none")):
            eng = _engine(_gpt(seed=7), mesh, "adamw", zero=zero, offload=offload, offload_dir=offload_root)
            eng.load_full_state(ck.params, ck.optim)
            out["resumed"][(zero, offload)] = _train(eng, mesh, rank, world, 1,
                                                     range(CKPT_STEPS, 2 * CKPT_STEPS))
            if offload == "nvme":
                eng.strategy.close()
    _release_groups()
    return out


# -- the distributed runs, shared by the tests below --------------------------------------------
@pytest.fixture(scope="module")
def runs():
    tmp = tempfile.mkdtemp(prefix="gt-zero3-")
    try:
        with one_process():
            oracle = _oracle_runs()
        ckpt_root = os.path.join(tmp, "ckpt")
        res2 = spawn(_worker, 2, os.path.join(tmp, "off2"), ckpt_root, None, timeout_s=120)
        with one_process():
            stage0 = _resume_stage0(res2[0]["ckpt_path"])
        res4 = spawn(_worker, 4, os.path.join(tmp, "off4"), ckpt_root, res2[0]["ckpt_path"], timeout_s=120)
        yield {"oracle": oracle, 2: res2, 4: res4, "stage0": stage0}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.rung3
@pytest.mark.parametrize("world", [2, 4])
def test_stage3_matches_one_process(runs, world):
    oracle = runs["oracle"]
    for opt, accum, clip in CASES:
        ref = oracle[(opt, accum, clip)]
        tol = 1e-5 if opt == "sgd" else 1e-4
        if clip is not None:   # the clip must actually act in these runs
            assert any(norm > clip for _, norm in ref)
        for offload in OFFLOADS:
            for rank_res in runs[world]:
                got = rank_res["runs"][(offload, opt, accum, clip)]
                case = f"world {world}, offload {offload}, {opt}, accum {accum}, clip {clip}"
                assert_curves_close([lo for lo, _ in got], [lo for lo, _ in ref], rtol=tol, what=f"loss ({case})")
                assert_curves_close([n for _, n in got], [n for _, n in ref], rtol=10 * tol, what=f"norm ({case})")
    assert all(all(r["nvme_dirs_removed"]) for r in runs[world])
    for r in runs[world]:
        assert_curves_close(r["opaque"], oracle["opaque"], rtol=1e-5, what="outputs stage 3 cannot hook")


@pytest.mark.rung3
@pytest.mark.parametrize("world", [2, 4])
def test_stage3_communication_volume(runs, world):
    for r in runs[world]:
        numel = r["comm_numel"]
        expected = 3 * numel * (world - 1) / world * 4   # fp32 bytes
        gathered = sum(v for (g, op), v in r["comm"].items() if op == "all_gather")
        scattered = sum(v for (g, op), v in r["comm"].items() if op == "reduce_scatter")
        total = sum(r["comm"].values())
        assert abs(total - expected) / expected < 0.01, (total, expected, r["comm"])
        assert abs(gathered - 2 * scattered) / gathered < 0.01


@pytest.mark.rung3
@pytest.mark.parametrize("world", [2, 4])
def test_stage3_memory(runs, world):
    from gigatrain.parallel.zero.memory import model_state_bytes

    for r in runs[world]:
        P = r["mem_numel"]
        none = r["mem"]["none"]
        assert abs(none["device"] - 16 * P / world) / (16 * P / world) < 0.02, (none, 16 * P / world)
        assert none["host"] == 0
        for offload, got in r["mem"].items():
            want = model_state_bytes(P, world, 3, offload, param_bytes=2)
            for where in ("device", "host"):
                assert abs(got[where] - want[where]) <= 0.02 * want[where] + 64, (offload, where, got, want)
        assert r["max_blocks_gathered"] <= 2      # the current block + the prefetched one
        assert r["released_after_step"]


@pytest.mark.rung3
@pytest.mark.parametrize("world", [2, 4])
def test_stage3_fp16_overflow_skips_everywhere(runs, world):
    for r in runs[world]:
        assert r["fp16_skipped"] and r["fp16_unchanged"] and r["fp16_next_ok"]


@pytest.mark.rung3
def test_stage3_checkpoint_loads_in_other_layouts(runs):
    res2 = runs[2]
    names = [n for n, _ in _gpt().named_parameters()]
    assert res2[0]["ckpt_keys"] == sorted(names)
    assert res2[0]["ckpt_optim_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    ref = res2[0]["ckpt_continue"]
    # The checkpointed run itself matches one process, before and after the checkpoint.
    losses = [lo for lo, _ in ref]
    assert_curves_close(losses, [lo for lo, _ in runs["oracle"]["ckpt"][CKPT_STEPS:]], rtol=1e-4)
    assert_curves_close([lo for lo, _ in runs["stage0"]], losses, rtol=1e-4, what="stage 0 on 1 rank")
    resumed = runs[4][0]["resumed"]
    assert set(resumed) == {(3, "none"), (3, "cpu"), (3, "nvme"), (2, "none")}
    for layout, losses in resumed.items():
        assert_curves_close([lo for lo, _ in losses], [lo for lo, _ in ref], rtol=1e-4, what=str(layout))


# -- ladder 0 -------------------------------------------------------------------------------------
def _torch_reference(kind, p0, grads, groups):
    """Run torch's optimizer on the two halves of ``p0`` (decay / no-decay) for each gradient."""
    a = nn.Parameter(p0[:groups].clone())
    b = nn.Parameter(p0[groups:].clone())
    g = [{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]
    opt = (torch.optim.AdamW(g, lr=0.01, betas=(0.9, 0.95), foreach=True) if kind == "adamw"
           else torch.optim.SGD(g, lr=0.01, momentum=0.9))
    for gr in grads:
        a.grad, b.grad = gr[:groups].clone(), gr[groups:].clone()
        opt.step()
    return torch.cat([a.detach(), b.detach()]), opt


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_nvme_optimizer_matches_torch(tmp_path, kind):
    from gigatrain.parallel.zero.nvme import NVMeOptimizer, OptimizerSpec

    n, split = 10_000, 6_001
    p0 = torch.randn(n)
    grads = [torch.randn(n) for _ in range(3)]
    ref, ref_opt = _torch_reference(kind, p0, grads, split)

    def factory(groups):
        gs = [{"params": g["params"], "weight_decay": 0.1 if g["decay"] else 0.0} for g in groups]
        if kind == "adamw":
            return torch.optim.AdamW(gs, lr=0.01, betas=(0.9, 0.95), foreach=True)
        return torch.optim.SGD(gs, lr=0.01, momentum=0.9)

    spec = OptimizerSpec.from_factory(factory)
    # Tiny chunks: many chunks, one crossing the decay / no-decay boundary, a short last one.
    opt = NVMeOptimizer(n, spec, tmp_path, segments=[(0, split, 0), (split, n, 1)], chunk_mb=0.005,
                        io_workers=2)
    assert opt.chunk * 3 < n
    opt.write("master", p0)
    out = torch.empty(n, dtype=torch.bfloat16)
    for gr in grads:
        opt.step(gr * 2, out, grad_coef=0.5)
    assert torch.allclose(opt.read("master"), ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(out, ref.to(torch.bfloat16))
    key = "exp_avg_sq" if kind == "adamw" else "momentum_buffer"
    ref_state = torch.cat([ref_opt.state[q][key] for g in ref_opt.param_groups for q in g["params"]])
    assert torch.allclose(opt.read(key), ref_state, rtol=1e-6, atol=1e-9)
    folder = opt.folder
    # The state files, plus the owner record that lets a later run sweep the folder if we die.
    assert sorted(f.name for f in folder.iterdir()) == sorted([f"{k}.f32" for k in opt.keys] + ["owner.json"])
    opt.close()
    assert not folder.exists() and opt.closed


def test_nvme_checks_free_space(tmp_path, monkeypatch):
    import gigatrain.parallel.zero.nvme as nvme

    spec = nvme.OptimizerSpec("adamw", (nvme.GroupHyper(lr=1e-3),))
    assert nvme.required_bytes(1000, spec) == 12_000
    real = shutil.disk_usage
    monkeypatch.setattr(nvme.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=5_000))
    with pytest.raises(ValueError, match=r"needs 11\.7 KiB.*only 4\.9 KiB is free.*offload_dir"):
        nvme.NVMeOptimizer(1000, spec, tmp_path / "off")
    assert not any((tmp_path / "off").iterdir())          # nothing written
    with pytest.raises(ValueError, match="offload_dir"):
        nvme.NVMeOptimizer(10, spec, None)
    with pytest.raises(ValueError, match="AdamW, Adam and SGD"):
        nvme.OptimizerSpec.from_factory(lambda g: torch.optim.Adagrad([{"params": x["params"]} for x in g]))


def test_default_units():
    from gigatrain.parallel.zero.stage3 import default_units

    gpt = _gpt(n_layer=3)
    assert default_units(gpt) == list(gpt.blocks)

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.h = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = Inner()
            self.lm_head = nn.Linear(4, 10)

    m = Outer()
    assert default_units(m) == list(m.transformer.h)
    seq = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    assert default_units(seq) == [seq[0], seq[2]]
