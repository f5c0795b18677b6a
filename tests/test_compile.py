"""``train.compile``: each block compiled on its own; the same fp32 losses as eager within 1e-5
at one process and at dp2 with ZeRO-2, and compiled blocks under ZeRO-3 and a pipeline (ladder 3,
one spawn). The first compilation of the tiny block takes ~30 s of CPU; inductor's cache makes the
later ones (same shapes) take seconds."""
import pytest
import torch.nn as nn

from dist_utils import assert_curves_close, spawn
from gigatrain.parallel.compile import CompilePolicy, apply_compile
from test_train import tiny


@pytest.mark.rung0
def test_compile_policy_and_refusals():
    with pytest.raises(ValueError, match="model.blocks"):
        apply_compile(nn.Sequential(nn.Linear(2, 2)), CompilePolicy("default"))
    with pytest.raises(ValueError):
        CompilePolicy("fast")
    m = nn.Sequential(nn.Linear(2, 2))
    assert apply_compile(m, CompilePolicy("none")) is m and "forward" not in vars(m[0])


@pytest.mark.rung0
def test_no_compiler_is_refused_before_launch(monkeypatch, tmp_path, capsys):
    import shutil

    from gigatrain.cli import main
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code = main(["train", "train.compile=default", "nproc=1", "model.n_layer=1", "model.d_model=16",
                 "model.n_head=2", "train.steps=1", f"out={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "C++ compiler" in err and "train.compile=none" in err and "Traceback" not in err


def _run(tmp, tag, *extra):
    from gigatrain.trainer import train
    return train(tiny(tmp, "train.steps=6", f"out={tmp}/{tag}", *extra), quiet=True).losses


def _two_ranks(rank, world, tmp):
    return {"zero2": _run(tmp, "z2", "parallel.zero=2", "train.compile=default"),
            "zero3+full": _run(tmp, "z3", "parallel.zero=3", "train.compile=default", "train.recompute=full"),
            "pp2": _run(tmp, "pp", "parallel.pp=2", "train.compile=default")}


@pytest.mark.rung3
def test_compiled_blocks_match_eager(tmp_path):
    from gigatrain.data import prepare_dataset
    prepare_dataset(tiny(tmp_path).data, 32)
    eager = _run(tmp_path, "eager")
    compiled = _run(tmp_path, "compiled", "train.compile=default")
    assert eager[-1] < eager[0]
    assert_curves_close(compiled, eager, rtol=1e-5, what="compiled, one process")
    for r in spawn(_two_ranks, 2, str(tmp_path), timeout_s=300):
        for layout, losses in r.items():
            assert_curves_close(losses, eager, rtol=1e-5, what=f"compiled, {layout}")
