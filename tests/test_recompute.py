"""Activation recomputation: what each mode keeps for backward (saved-tensor hooks, ladder 0),
and bit-identical fp32 losses with and without it at one process, dp2 ZeRO-3 and pp2 1f1b
(ladder 3, one spawn)."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dist_utils import spawn
from gigatrain.models.gpt import Block
from gigatrain.parallel.recompute import RecomputePolicy, apply_recompute, saved_activation_bytes
from test_train import tiny

B, T, D, H = 4, 24, 32, 2   # T != D, so a [.., T, T] shape is an attention term
MODES = ("none", "selective", "full")


class _Blocks(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(D, H, causal=True, dropout=dropout)])


def _saved_shapes(module, x) -> list[tuple]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return shapes


@pytest.mark.rung0
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_what_each_mode_keeps_per_block(dropout):
    x = torch.randn(B, T, D, requires_grad=True)
    # The math kernel materialises the T x T scores, as Korthikanti et al.'s formula assumes.
    with sdpa_kernel(SDPBackend.MATH):
        got = {m: saved_activation_bytes(apply_recompute(_Blocks(dropout), RecomputePolicy(m)).blocks[0], x)
               for m in MODES}
        shapes = {m: _saved_shapes(apply_recompute(_Blocks(dropout), RecomputePolicy(m)).blocks[0], x)
                  for m in ("none", "selective")}
    # full: the block keeps its input and nothing else.
    assert got["full"] == {"inputs": B * T * D * 4, "other": 0, "total": B * T * D * 4}
    # selective: every T x T term (scores/probabilities, the dropout mask and its output) is gone,
    # and only those: fp32 probabilities, plus mask and dropped probabilities with dropout.
    square = [s for s in shapes["none"] if s[-2:] == (T, T)]
    assert square and not [s for s in shapes["selective"] if s[-2:] == (T, T)]
    per_term = B * H * T * T * 4
    assert got["none"]["other"] - got["selective"]["other"] == per_term * (3 if dropout else 1)
    assert got["none"]["other"] > got["selective"]["other"] > 0


@pytest.mark.rung0
def test_modes_refuse_models_without_what_they_need():
    with pytest.raises(ValueError, match="model.blocks"):
        apply_recompute(nn.Sequential(nn.Linear(2, 2)), RecomputePolicy("full"))
    with pytest.raises(ValueError, match="attention_core"):
        apply_recompute(nn.Sequential(nn.Linear(2, 2)), RecomputePolicy("selective"))
    with pytest.raises(ValueError):
        RecomputePolicy("some")
    m = apply_recompute(_Blocks(0.0), RecomputePolicy("full"))
    fwd = m.blocks[0].forward
    assert apply_recompute(m, RecomputePolicy("full")).blocks[0].forward is fwd   # idempotent
    # Names and structure unchanged: checkpoints and ZeRO-3 units see the same model.
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in _Blocks(0.0).named_parameters()]


def _runs(tmp, tag, *extra):
    from gigatrain.trainer import train
    return {m: train(tiny(tmp, "train.optimizer=adamw", "model.dropout=0.1", f"train.recompute={m}",
                          f"out={tmp}/{tag}-{m}", *extra), quiet=True).losses for m in MODES}


def _two_ranks(rank, world, tmp):
    return {"zero3": _runs(tmp, "z3", "parallel.zero=3"),
            "pp2": _runs(tmp, "pp", "parallel.pp=2", "parallel.pp_schedule=1f1b", "train.micro_batch=2"),
            # zero bubble: with whole blocks recomputed, W runs from the stage output (runtime.py)
            "pp2 zb": _runs(tmp, "zb", "parallel.pp=2", "parallel.pp_schedule=zb", "train.micro_batch=2")}


@pytest.mark.rung3
def test_losses_bit_identical_one_process_zero3_and_pipeline(tmp_path):
    from gigatrain.data import prepare_dataset
    prepare_dataset(tiny(tmp_path).data, 32)
    one = _runs(tmp_path, "one")
    assert len(one["none"]) == 10 and one["none"][-1] < one["none"][0]
    assert one["selective"] == one["none"] and one["full"] == one["none"]
    for r in spawn(_two_ranks, 2, str(tmp_path), timeout_s=240):
        for layout, losses in r.items():
            assert len(losses["none"]) == 10, layout
            # Dropout is on: the recomputation replays the first pass's random masks.
            assert losses["selective"] == losses["none"], layout
            assert losses["full"] == losses["none"], layout
