"""ZeRO stage 3 on a model from outside the project: a tiny HuggingFace ``GPT2LMHeadModel``
(built from a config, nothing downloaded) trained on 2 gloo ranks matches one process.

The model knows nothing of gigatrain's protocol (no ``stem``/``blocks``/``head``): stage 3 finds
its units itself (the GPT2Blocks in ``transformer.h``), and the LM head tied to the token
embedding lands in the root unit.
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from dist_utils import assert_curves_close, one_process, spawn

try:
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    transformers = None

pytestmark = [pytest.mark.rung3, pytest.mark.skipif(transformers is None, reason="transformers is not installed "
                                "(pip install transformers, with torch pinned)")]

STEPS = 6
BATCH = 8
LR = 0.2


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _loss(out, y):
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _batch(step, rank, world):
    g = torch.Generator().manual_seed(50 + step % 2)   # two batches, seen again and again
    seq = torch.randint(0, 64, (BATCH, 17), generator=g)
    b = BATCH // world
    return [(seq[rank * b:(rank + 1) * b, :-1], seq[rank * b:(rank + 1) * b, 1:])]


def _run(rank, world, zero):
    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from dist_utils import engine_for

    dev = torch.device("cpu")
    mesh = Mesh(ParallelDims(dp=world), dev)
    model = _model()
    tied = model.lm_head.weight is model.transformer.wte.weight

    def factory(groups):
        return torch.optim.SGD([{"params": g["params"], "weight_decay": 0.01 if g["decay"] else 0.0}
                                for g in groups], lr=LR, momentum=0.9)

    eng = engine_for(model, mesh, factory, zero=zero, loss_fn=_loss, grad_clip=1.0)
    losses = [eng.train_step(_batch(s, rank, world), lr=LR).loss for s in range(STEPS)]
    info = {"tied": tied, "losses": losses}
    if zero == 3:
        st = eng.strategy
        info["n_blocks"] = len(st.blocks)
        info["root"] = st.root.names
    gc.collect()   # free the groups held by reference cycles now (see test_zero3._release_groups)
    return info



def test_hf_gpt2_stage3_matches_one_process():
    with one_process():
        ref = _run(0, 1, 0)
    res = spawn(_run, 2, 3)
    for r in res:
        assert r["tied"] and r["n_blocks"] == 2
        assert "transformer.wte.weight" in r["root"] and "transformer.ln_f.weight" in r["root"]
        assert_curves_close(r["losses"], ref["losses"], rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]      # it does train
