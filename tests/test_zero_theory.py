"""ZeRO memory: the formula (ladder 0) and the bytes strategies really hold (ladder 1, fake group)."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from gigatrain.parallel.zero.memory import measure_model_state_bytes, model_state_bytes


def test_formula_matches_the_zero_paper():
    # ZeRO paper, Figure 1: 7.5B parameters, 64 data-parallel ranks, mixed precision + Adam.
    P, N = 7.5e9, 64
    got = [model_state_bytes(P, N, s)["device"] / 1e9 for s in (0, 1, 2, 3)]
    assert got == pytest.approx([120.0, 31.4, 16.6, 1.88], rel=3e-3)
    assert model_state_bytes(P, N, 1) == {"device": 2 * P + 2 * P + 12 * P / N, "host": 0.0}
    assert model_state_bytes(P, N, 2)["device"] == 2 * P + 14 * P / N


def test_formula_variants():
    P, N = 1000.0, 4
    # fp32 parameters are their own master: Adam K = 8.
    assert model_state_bytes(P, N, 0, param_bytes=4)["device"] == 16 * P
    assert model_state_bytes(P, N, 1, param_bytes=4)["device"] == 8 * P + 8 * P / N
    assert model_state_bytes(P, N, 2, param_bytes=4)["device"] == 4 * P + 12 * P / N
    assert model_state_bytes(P, N, 3, param_bytes=4)["device"] == 16 * P / N
    # SGD: momentum (4 bytes) or nothing.
    assert model_state_bytes(P, N, 1, adam=False)["device"] == 4 * P + 8 * P / N
    assert model_state_bytes(P, N, 2, param_bytes=4, adam=False, momentum=False)["device"] == 4 * P + 4 * P / N
    # Offload: the device keeps only the low-precision parts.
    assert model_state_bytes(P, N, 1, "cpu") == {"device": 4 * P, "host": 14 * P / N}
    assert model_state_bytes(P, N, 2, "cpu") == {"device": 2 * P, "host": 14 * P / N}
    assert model_state_bytes(P, N, 2, "cpu", param_bytes=4, adam=False) == {"device": 4 * P, "host": 12 * P / N}
    # One rank: every stage is plain data parallel.
    for s in (1, 2, 3):
        assert model_state_bytes(P, 1, s)["device"] == model_state_bytes(P, 1, 0)["device"]
    with pytest.raises(ValueError):
        model_state_bytes(P, N, 0, "cpu")
    with pytest.raises(ValueError):
        model_state_bytes(P, N, 4)


@pytest.fixture
def fake_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def init(world):
        dist.init_process_group("fake", store=FakeStore(), rank=world - 1, world_size=world)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def _engine(world, stage, offload, precision, opt="adamw"):
    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from dist_utils import engine_for
    from gigatrain.models import build_model
    from gigatrain.optim import build_optimizer

    dev = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(SimpleNamespace(name="gpt", n_layer=2, n_head=4, d_model=128, seq_len=8), vocab_size=512)
    tcfg = SimpleNamespace(optimizer=opt, lr=1e-3, weight_decay=0.1, momentum=0.9, betas=(0.9, 0.95))
    mesh = Mesh(ParallelDims(dp=world), dev)
    eng = engine_for(model, mesh, lambda groups: build_optimizer(tcfg, groups, dev), precision=precision,
                     zero=stage, bucket_mb=0.25, offload=offload)
    x, y = model.example_batch(1)
    eng.train_step([(x[:, :4], y[:, :4])], 1e-3)   # one real step on a tiny input
    return eng


@pytest.mark.parametrize("world", [4, 8])
def test_measured_bytes_match_formula(fake_group, world):
    """bf16 parameters + Adam, stages 1 and 2, offload none and cpu, after one step."""
    fake_group(world)
    for stage in (1, 2):
        for offload in ("none", "cpu"):
            eng = _engine(world, stage, offload, "bf16")
            P = sum(p.numel() for p in eng.model.parameters())
            st = eng.strategy
            got = measure_model_state_bytes(st, eng.optimizer, eng.model, host=st.host_tensors())
            want = model_state_bytes(P, world, stage, offload)
            for where in ("device", "host"):
                assert got[where] == pytest.approx(want[where], rel=0.02), (stage, offload, where, got, want)
            if offload == "cpu":
                # Nothing fp32 is left on the "device" side: only the bf16 parameters (and grads).
                assert got["device"] == pytest.approx((2 if stage == 2 else 4) * P, rel=0.02)
            st.close()


def test_measured_bytes_fp32_and_stage0(fake_group):
    world = 4
    fake_group(world)
    for stage in (0, 1, 2):
        eng = _engine(world, stage, "none", "fp32")
        P = sum(p.numel() for p in eng.model.parameters())
        got = measure_model_state_bytes(eng.strategy, eng.optimizer, eng.model)
        want = model_state_bytes(P, world, stage, param_bytes=4)
        assert got["device"] == pytest.approx(want["device"], rel=0.02), (stage, got, want)
        assert got["host"] == 0


def test_measure_counts_each_storage_once():
    a = torch.zeros(100)
    views = [a[:10], a[50:], a.view(10, 10)]
    assert measure_model_state_bytes(a, views) == {"device": 400, "host": 0}
    assert measure_model_state_bytes(views, host=[a]) == {"device": 0, "host": 400}
    assert measure_model_state_bytes(torch.empty(10, device="meta")) == {"device": 0, "host": 0}
