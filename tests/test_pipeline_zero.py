"""Pipelines with ZeRO-2 and ZeRO-3 (and CPU offload) over dp against one process (ladder 3).

One spawn of 4 gloo ranks (pp 2 x dp 2) trains a GPT with a tied embedding under 1F1B and the
zero-bubble schedule (two chunks per rank, so a rank's backward passes alternate between its
chunks); loss and gradient-norm curves, the final weights, evaluation and predicted logits must
equal one plain PyTorch process's (fp32, SGD, relative 1e-5 on the losses).
"""
import functools

import pytest
import torch

from dist_utils import spawn
from test_tensor_parallel import _check_layout, _train

pytestmark = pytest.mark.rung3

LAYOUTS = {
    "zero2-1f1b": {"zero": 2},
    "zero2-zb-v2": {"zero": 2, "schedule": "zb", "virtual": 2},
    "zero2-cpu-offload-1f1b": {"zero": 2, "offload": "cpu"},
    "zero3-1f1b": {"zero": 3},
    "zero3-zb-v2": {"zero": 3, "schedule": "zb", "virtual": 2},
    "zero3-cpu-offload-zb": {"zero": 3, "offload": "cpu", "schedule": "zb"},
}


def _ranks(rank, world):
    out = {name: _train("gpt", "sgd", (2, 2, 1), **kw) for name, kw in LAYOUTS.items()}
    out["reduce_scatters"] = _reduce_scatters_per_step()
    return out


def _reduce_scatters_per_step():
    """dp reduce-scatters of one ZeRO-2 1F1B step with 2 micro-batches: each chunk's buckets
    leave once per micro-batch, the tied embedding's once after the schedule."""
    from test_tensor_parallel import _engine, _micro_batches

    eng, mesh = _engine("gpt", "sgd", (2, 2, 1), zero=2)
    with eng:
        eng.train_step(_micro_batches("gpt", 0, mesh, 2), 0.1)
        mesh.stats.reset()
        eng.train_step(_micro_batches("gpt", 1, mesh, 2), 0.1)
        buckets = eng.strategy.buckets.buckets
        late = sum(1 for b in buckets if any(id(p) in eng.strategy.late for p in b.params))
        calls = mesh.stats.calls.get(("dp", "reduce_scatter"), 0)
        return {"calls": calls, "buckets": len(buckets), "late": late}


@functools.lru_cache(maxsize=None)
def results():
    return spawn(_ranks, 4, timeout_s=240)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pp2_dp2_zero_equals_one_process(name):
    _check_layout(results(), name, "gpt", "sgd")


def test_zero2_reduces_each_micro_batch_as_its_pass_ends():
    for r in results():
        rs = r["reduce_scatters"]
        assert rs["late"] == 1     # the tied embedding, on the first and on the last stage
        assert rs["calls"] == 2 * (rs["buckets"] - rs["late"]) + rs["late"], rs


def test_stage2_and_3_refuse_a_pipeline_without_its_gradient_passes(fake_group):
    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.parallel.strategy import build_grad_strategy
    from gigatrain.precision import PrecisionPolicy

    fake_group(4)
    mesh = Mesh(ParallelDims(2, 2, 1), torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    prec = PrecisionPolicy.from_name("fp32", torch.device("cpu"), zero=2)
    for zero in (2, 3):
        with pytest.raises(ValueError, match="PipelineGrads"):
            build_grad_strategy(zero, model, mesh, lambda g: torch.optim.SGD(g, lr=0.1), precision=prec)
