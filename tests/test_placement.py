"""Parameter placements and the bookkeeping that follows from them (ladder 0: no processes).

A GPT with a tied embedding / LM head is cut into pipeline stages the way ``apply_pipeline``
cuts it, for every pp rank of a dp x pp mesh; the placements alone must make the global
gradient norm count every parameter once and make every parameter written by exactly one rank.
"""
import pytest
import torch

from gigatrain.models.gpt import GPT
from gigatrain.parallel.pipeline.partition import uniform
from gigatrain.parallel.pipeline.runtime import build_stage_modules
from gigatrain.parallel.pipeline.stages import StagePart, stage_placements
from gigatrain.parallel.placement import Placement, Placements

pytestmark = pytest.mark.rung0


def _gpt():
    torch.manual_seed(0)
    model = GPT(vocab_size=32, seq_len=8, n_layer=4, n_head=2, d_model=16, vocab_multiple=32)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    return model


def _rank_views(model, dp, pp, virtual=1):
    """(coords, owned module, placements) of every rank of a dp x pp mesh."""
    whole = Placements.replicated_model(model)
    part = uniform(len(model.blocks), pp * virtual)
    views = []
    for d in range(dp):
        for r in range(pp):
            chunks = build_stage_modules(model, part, r, pp, virtual)
            params = {id(p): p for c in chunks for p in c.parameters()}.values()
            owned = StagePart(model, params, chunks)
            views.append(({"dp": d, "pp": r, "tp": 0}, owned, stage_placements(model, owned, whole, pp)))
    return views


@pytest.mark.parametrize("dp,pp,virtual", [(1, 2, 1), (2, 2, 1), (2, 4, 1), (1, 2, 2)])
def test_norm_counts_every_parameter_once(dp, pp, virtual):
    model = _gpt()
    assert model.stem.wte.weight is model.head.lm_head.weight
    full = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())   # unique parameters
    views = _rank_views(model, dp, pp, virtual)
    for d in range(dp):
        # The engine sums, over the pp ranks of one pipeline, what each counts (dp is the
        # strategy's business: every dp replica computes the same total).
        total, naive = 0.0, 0.0
        for coords, owned, pl in views:
            if coords["dp"] != d:
                continue
            skip = pl.not_counted_here(coords, axes=("pp", "tp"))
            for n, p in owned.named_parameters():
                sq = float(p.grad.double().pow(2).sum())
                naive += sq
                if n not in skip:
                    total += sq
        assert total == pytest.approx(full, rel=1e-12)
        # Without the placements' de-duplication the tied weight counts twice.
        assert naive > full * (1 + 1e-6)


def test_tied_weight_is_a_copy_on_first_and_last_stage():
    model = _gpt()
    views = _rank_views(model, 1, 3)
    tied = [pl["stem.wte.weight"] for _, _, pl in views if "stem.wte.weight" in pl]
    assert len(tied) == 2 and all(p.copies == (0, 2) for p in tied)
    middle = views[1][2]
    assert "stem.wte.weight" not in middle and len(middle) > 0


@pytest.mark.parametrize("dp,pp", [(1, 2), (2, 2), (3, 4)])
def test_every_parameter_is_written_by_exactly_one_rank(dp, pp):
    model = _gpt()
    writers = {}
    for coords, owned, pl in _rank_views(model, dp, pp):
        for n in pl:
            if pl.writes_here(n, coords):
                writers.setdefault(n, []).append(coords)
    assert set(writers) == {n for n, _ in model.named_parameters()}
    assert all(len(w) == 1 and w[0]["dp"] == 0 for w in writers.values()), writers


def test_placement_rules():
    p = Placement((4, 8), replicated=("dp", "tp"))
    assert p.canonical({"dp": 0, "pp": 3, "tp": 0})
    assert not p.canonical({"dp": 1, "pp": 0, "tp": 0})
    assert p.canonical({"dp": 1, "pp": 0, "tp": 0}, axes=("pp", "tp"))   # dp left out
    assert not p.canonical({"dp": 0, "pp": 0, "tp": 1}, axes=("pp", "tp"))
    shard = Placement((4, 8), replicated=("dp",), shard=("tp", 0))
    assert shard.canonical({"dp": 0, "pp": 0, "tp": 1})                  # every slice is written
    with pytest.raises(ValueError):
        Placement((4,), replicated=("tp",), shard=("tp", 0))
    with pytest.raises(ValueError):
        Placement((4,), replicated=("xp",))
