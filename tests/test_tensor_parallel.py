"""Tensor (and sequence) parallelism and 3D layouts against one process (ladder 0 and 3).

Three spawns (2, 4 and 8 gloo ranks) run every layout: the loss and gradient-norm curves, the
whole final state, evaluation and the predicted next-token logits must equal those of one plain
PyTorch process training the same model on the same global batches. The same spawns count the
tp traffic of one step against the Megatron theory, measure the activations a block saves for
backward against Korthikanti et al.'s formula adapted to our block, and move a checkpoint
between layouts.
"""
import fnmatch
import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from dist_utils import assert_curves_close, one_process, spawn

GB = 8                     # global batch
STEPS = 10
SHORT = 4                  # steps for the extra pipeline schedules
CLIP = 0.3                 # below the gradient norms: clipping acts, so the global norm must be right
LR = {"sgd": 0.5, "adamw": 1e-2}
RTOL = {"sgd": 1e-5, "adamw": 1e-4}   # Adam's division by sqrt(v) amplifies rounding
# Gradient norms react more than losses: with AdamW, ZeRO-3 at dp=4 without tensor parallelism
# already drifts 1e-3 from one process by step 10 (another summation order, amplified).
NORM_RTOL = {"sgd": 1e-4, "adamw": 5e-3}
# Final weights, relative to each tensor's scale: Adam turns rounding-level differences of
# near-zero gradient elements into lr-sized steps; a wrong slice or shard is off by O(1).
STATE_RTOL = {"sgd": 3e-4, "adamw": 1e-2}
CKPT_AT, CKPT_MORE = 3, 3  # checkpoint after 3 steps, then 3 more


# ---------------------------------------------------------------- models and data

def _model(kind: str, seed: int = 0) -> nn.Module:
    from gigatrain.models import build_model

    torch.manual_seed(seed)
    if kind == "gpt":
        return build_model(SimpleNamespace(name="gpt", n_layer=4, n_head=4, d_model=32, seq_len=16), vocab_size=60)
    if kind == "gpt_nobias":  # Adam: the key bias has an exactly-zero gradient (rounding noise)
        return build_model(SimpleNamespace(name="gpt", n_layer=4, n_head=4, d_model=32, seq_len=16, bias=False),
                           vocab_size=60)
    if kind == "vit":
        return build_model(SimpleNamespace(name="vit", image_size=8, patch_size=4, n_layer=2, n_head=4, d_model=32))
    if kind == "coatnet":
        return build_model(SimpleNamespace(name="coatnet", image_size=16, n_head=4, coatnet_depths=[1, 1, 1, 1],
                                           coatnet_dims=[8, 16, 32, 32]))
    raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def _data_model(kind):
    return _model(kind)


def _batch(kind: str, step: int):
    # Three batches in turn: the model learns them, so the losses move and a wrong update shows.
    return _data_model(kind).example_batch(GB, torch.Generator().manual_seed(step % 3))


def _probe(kind: str):
    x, y = _data_model(kind).example_batch(GB, torch.Generator().manual_seed(99))
    return (x[:2, :5] if kind.startswith("gpt") else x[:2]), (x, y)


def _tcfg(opt):
    return SimpleNamespace(optimizer=opt, lr=LR[opt], weight_decay=0.1, momentum=0.9, betas=(0.9, 0.95))


def _oracle(kind: str, opt: str, steps: int = STEPS):
    """One plain PyTorch process, the whole global batch at once."""
    from gigatrain.optim import build_optimizer, param_groups

    model = _model(kind)
    optim = build_optimizer(_tcfg(opt), param_groups(model.named_parameters()), torch.device("cpu"))
    losses, norms = [], []
    for step in range(steps):
        x, y = _batch(kind, step)
        loss = model.loss(model(x), y)
        loss.backward()
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    ctx, (ex, ey) = _probe(kind)
    model.eval()
    with torch.no_grad():
        logits = model(ctx)
        logits = logits[:, -1] if logits.dim() == 3 else logits
        val = float(model.loss(model(ex), ey))
    from gigatrain.parallel.strategy import persistent_buffers

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params.update({n: b.detach().clone() for n, b in persistent_buffers(model).items()})
    return {"losses": losses, "norms": norms, "params": params, "logits": logits, "val": val}


_ORACLES: dict = {}


def oracle(kind, opt, steps=STEPS):
    key = (kind, opt, steps)
    if key not in _ORACLES:
        _ORACLES[key] = _oracle(kind, opt, steps)
    return _ORACLES[key]


# ---------------------------------------------------------------- one layout on the spawned ranks

def _engine(kind, opt, dims, *, sp=False, zero=0, offload="none", schedule="1f1b", virtual=1, micro=2,
            precision="fp32", recompute="none"):
    from gigatrain.api import parallelize
    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.optim import build_optimizer
    from gigatrain.parallel.pipeline.stages import PipelinePolicy
    from gigatrain.parallel.policies import OffloadPolicy, ParallelPlan, TensorParallelPolicy, ZeroPolicy
    from gigatrain.parallel.recompute import RecomputePolicy

    dp, pp, tp = dims
    mesh = Mesh(ParallelDims(dp, pp, tp), torch.device("cpu"))
    plan = ParallelPlan(dims=mesh.dims, tensor=TensorParallelPolicy(tp, sp),
                        pipeline=PipelinePolicy(schedule=schedule, microbatches=micro, virtual=virtual),
                        zero=ZeroPolicy(zero, bucket_mb=0.004), offload=OffloadPolicy(offload), precision=precision,
                        grad_clip=CLIP, recompute=RecomputePolicy(recompute))
    cpu = torch.device("cpu")
    return parallelize(_model(kind), mesh, lambda groups: build_optimizer(_tcfg(opt), groups, cpu), plan), mesh


def _micro_batches(kind, step, mesh, micro):
    x, y = _batch(kind, step)
    n = GB // mesh.dims.dp
    r = mesh.coords["dp"]
    x, y = x[r * n:(r + 1) * n], y[r * n:(r + 1) * n]
    k = n // micro
    return [(x[i * k:(i + 1) * k], y[i * k:(i + 1) * k]) for i in range(micro)]


def _train(kind, opt, dims, *, steps=STEPS, micro=2, save=None, load=None, **kw):
    """Train one layout; returns curves, the whole final state, evaluation and predicted logits."""
    eng, mesh = _engine(kind, opt, dims, micro=micro, **kw)
    start = eng.load(load) if load else 0
    losses, norms = [], []
    with eng:
        for step in range(start, start + steps):
            r = eng.train_step(_micro_batches(kind, step, mesh, micro), LR[opt])
            losses.append(r.loss)
            norms.append(r.grad_norm)
        if save:
            eng.save(save)
        ctx, (ex, ey) = _probe(kind)
        eng.model.eval()
        logits = eng.predict(ctx, post=lambda y: y[:, -1] if y.dim() == 3 else y)
        eng.model.train()
        n = GB // mesh.dims.dp
        r = mesh.coords["dp"]
        val, _ = eng.eval_step([(ex[r * n:(r + 1) * n], ey[r * n:(r + 1) * n])])
        params, _ = eng.full_state()
    return {"losses": losses, "norms": norms, "params": params, "logits": logits, "val": val,
            "coords": dict(mesh.coords)}


def _layouts(world):
    """(name, kind, optimizer, dims, options) of every layout checked at this world size."""
    if world == 2:
        return [("tp2", "gpt", "sgd", (1, 1, 2), {}),
                ("tp2-sp", "gpt", "sgd", (1, 1, 2), {"sp": True}),
                # Recomputation runs the sequence gathers again inside backward.
                ("tp2-sp-recompute", "gpt", "sgd", (1, 1, 2), {"sp": True, "recompute": "full", "steps": SHORT}),
                ("tp2-adamw", "gpt_nobias", "adamw", (1, 1, 2), {}),
                ("vit-tp2", "vit", "sgd", (1, 1, 2), {}),
                # BatchNorm sees the whole batch at once only without accumulation.
                ("coatnet-tp2", "coatnet", "sgd", (1, 1, 2), {"micro": 1})]
    if world == 4:
        # tp=4 on two cores waits on scheduling at every collective: one micro-batch per step
        # (accumulation under tensor and sequence parallelism is checked at tp=2 and dp2 x tp2).
        out = [("tp4", "gpt", "sgd", (1, 1, 4), {"micro": 1}),
               ("tp4-sp", "gpt", "sgd", (1, 1, 4), {"sp": True, "micro": 1}),
               ("dp2-tp2", "gpt", "sgd", (2, 1, 2), {}),
               ("pp2-tp2", "gpt", "sgd", (1, 2, 2), {}),
               ("pp2-tp2-sp", "gpt", "sgd", (1, 2, 2), {"sp": True})]
        out += [(f"dp2-tp2-zero{z}", "gpt", "sgd", (2, 1, 2), {"zero": z}) for z in (1, 2, 3)]
        out += [("dp2-tp2-zero3-sp-adamw", "gpt_nobias", "adamw", (2, 1, 2), {"zero": 3, "sp": True}),
                ("dp2-tp2-zero2-cpu-offload", "gpt", "sgd", (2, 1, 2), {"zero": 2, "offload": "cpu"})]
        out += [(f"pp2-tp2-{s}", "gpt", "sgd", (1, 2, 2), {"schedule": s, "steps": SHORT, "virtual": v})
                for s, v in (("naive", 1), ("gpipe", 1), ("interleaved", 2), ("zb", 1))]
        return out
    return [("dp2-pp2-tp2-zero1", "gpt", "sgd", (2, 2, 2), {"zero": 1})]


def _ranks(rank, world, ckpt_dir):
    out = {name: _train(kind, opt, dims, **kw) for name, kind, opt, dims, kw in _layouts(world)}
    if world == 2:
        out["bf16"] = _train("gpt", "sgd", (1, 1, 2), sp=True, zero=3, precision="bf16", steps=SHORT)
        out["comm"] = {sp: _comm_of_one_step(sp) for sp in (False, True)}
        out["memory"] = {sp: _block_activation_bytes(2, sp) for sp in (False, True)}
    if world == 4:
        out["memory"] = {sp: _block_activation_bytes(4, sp) for sp in (False, True)}
        # Checkpoint: saved at dp2 x tp2 with ZeRO-2, loaded at pp2 x tp2 (and at one process).
        first = _train("gpt_nobias", "adamw", (2, 1, 2), zero=2, steps=CKPT_AT, save=ckpt_dir)
        whole = _train("gpt_nobias", "adamw", (2, 1, 2), zero=2, steps=CKPT_AT + CKPT_MORE)
        path = f"{ckpt_dir}/step_{CKPT_AT:06d}"
        resumed = _train("gpt_nobias", "adamw", (1, 2, 2), steps=CKPT_MORE, load=path)
        out["ckpt"] = {"first": first["losses"], "whole": whole["losses"], "resumed": resumed["losses"],
                       "path": path}
    return out


@functools.lru_cache(maxsize=None)
def results(world: int):
    import tempfile

    d = tempfile.mkdtemp(prefix="gigatrain-tp-")
    return spawn(_ranks, world, d, timeout_s=180), d


def _check_layout(res, name, kind, opt, steps=STEPS):
    ref = oracle(kind, opt, steps)
    rtol = RTOL[opt]
    for r in res:
        assert_curves_close(r[name]["losses"], ref["losses"], rtol, f"{name} loss (rank coords {r[name]['coords']})")
        assert_curves_close(r[name]["norms"], ref["norms"], NORM_RTOL[opt], f"{name} gradient norm")
        got = r[name]["params"]
        assert got and set(got) <= set(ref["params"]), (name, sorted(set(got) - set(ref["params"])))
        for n, t in got.items():
            want = ref["params"][n]
            assert tuple(t.shape) == tuple(want.shape), (name, n)
            t, want = t.double(), want.double()
            # A floor for weights whose gradient is zero in exact arithmetic (a BatchNorm's bias
            # before another BatchNorm): both runs hold rounding noise there.
            err = (t - want).abs().max().item() / max(want.abs().max().item(), 1e-3)
            assert err < STATE_RTOL[opt], f"{name}: {n} differs from one process by {err:.2e}"
        assert math.isclose(r[name]["val"], ref["val"], rel_tol=rtol * 10), (name, r[name]["val"], ref["val"])
        torch.testing.assert_close(r[name]["logits"], ref["logits"], rtol=rtol * 100, atol=rtol * 10)
    assert set().union(*(r[name]["params"] for r in res)) == set(ref["params"]), name
    # Whole weights replicated over tp stay bitwise identical on every tp rank (no drift).
    by_pos = {}
    for r in res:
        c = r[name]["coords"]
        by_pos.setdefault((c["dp"], c["pp"]), []).append(r[name]["params"])
    for group in by_pos.values():
        for n in group[0]:
            assert all(torch.equal(g[n], group[0][n]) for g in group), f"{name}: {n} differs between tp ranks"


# ---------------------------------------------------------------- communication theory

def _comm_of_one_step(sp: bool, b: int = 4):
    """tp traffic of one training step (one micro-batch of ``b`` sequences) at tp=2."""
    eng, mesh = _engine("gpt", "sgd", (1, 1, 2), sp=sp)
    x, y = _batch("gpt", 0)
    with eng:
        eng.train_step([(x[:b], y[:b])], 0.1)  # first step: lazy set-up out of the way
        mesh.stats.reset()
        eng.train_step([(x[:b], y[:b])], 0.1)
    keys = [k for k in mesh.stats.calls if k[0] == "tp"]
    return {k[1]: (mesh.stats.calls[k], mesh.stats.payload[k], mesh.stats.sent.get(k, 0)) for k in keys}


def comm_theory(*, L, b, s, h, t, sp, fp=4):
    """Megatron's tp traffic of one step: {op: (calls, payload bytes, sent bytes)}.

    Without sequence parallelism every block all-reduces ``b*s*h`` twice in forward (after the
    two row-parallel layers) and twice in backward (before the two column-parallel ones); the
    embedding all-reduces its output once and the LM head its input gradient once. With sequence
    parallelism each of those all-reduces becomes a reduce-scatter plus an all-gather of the same
    bytes; backward also gathers the saved sequence shard of each column-parallel input again
    (Korthikanti et al.: stored sharded, re-gathered), and the LayerNorm weights and row-parallel
    biases, computed on sequence shards, all-reduce their gradients. The vocabulary-parallel loss
    all-reduces ``3*b*s`` values (the maximum, then the target logit and the sum of exponentials),
    never ``b*s*vocab``; the global gradient norm adds one float64.
    """
    act = b * s * h * fp
    ring = (t - 1) / t
    ar = {"calls": 0, "payload": 0, "sent": 0.0}

    def add_ar(n_bytes, calls=1):
        ar["calls"] += calls
        ar["payload"] += n_bytes * calls
        ar["sent"] += 2 * ring * n_bytes * calls

    add_ar(b * s * fp)                   # loss: maximum per token
    add_ar(2 * b * s * fp)               # loss: target logit and sum of exponentials
    add_ar(8)                            # gradient norm (float64)
    add_ar(act)                          # embedding output
    if not sp:
        add_ar(act, calls=4 * L + 1)     # 2 per block forward, 2 backward; the head's input gradient
        return {"all_reduce": (ar["calls"], ar["payload"], round(ar["sent"]))}
    add_ar(h * fp, calls=6 * L + 2)      # per block ln1, ln2 (weight, bias), two row biases; ln_f
    n_col, n_row = 2 * L + 1, 2 * L      # qkv, fc per block and the LM head; two projections per block
    ag_calls = 2 * n_col + n_row + 1     # forward + re-gather per column layer; row backward; embedding scatter
    rs_calls = n_row + n_col             # row forward; column input gradient
    return {"all_reduce": (ar["calls"], ar["payload"], round(ar["sent"])),
            "all_gather": (ag_calls, ag_calls * act // t, round(ag_calls * ring * act)),
            "reduce_scatter": (rs_calls, rs_calls * act, round(rs_calls * ring * act))}


# ---------------------------------------------------------------- activation memory

def _block_activation_bytes(tp: int, sp: bool, b: int = 4):
    """Bytes block 1 saves for backward (parameters excluded), tensors counted once per storage."""
    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.parallel.placement import Placements
    from gigatrain.parallel.policies import TensorParallelPolicy
    from gigatrain.parallel.tensor import apply_tensor_parallel

    model = _model("gpt")
    if tp > 1:
        mesh = Mesh(ParallelDims(1, 1, tp), torch.device("cpu"))
        apply_tensor_parallel(model, mesh.tp, TensorParallelPolicy(tp, sp), Placements.replicated_model(model))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, active = {}, [False]

    def pack(t):
        st = t.untyped_storage()
        if active[0] and st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    block = model.blocks[1]
    block.register_forward_pre_hook(lambda m, a: active.__setitem__(0, True))
    block.register_forward_hook(lambda m, a, o: active.__setitem__(0, False))
    x, _ = _batch("gpt", 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x[:b])
    return sum(seen.values())


def activation_formula(*, s, b, h, a, t, sp, fp=4):
    """Bytes one of our blocks saves for backward: Korthikanti et al., adapted.

    The paper counts, per layer at 16 bits, ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` bytes under
    tensor parallelism and all of it divided by t with sequence parallelism. In elements:
    unsplit, the inputs of the two LayerNorms and of the two column-parallel layers (4 sbh) plus
    two 1-byte dropout masks; split, q, k, v and the projection input (4 sbh), the GELU input
    and output (8 sbh) and the ``5*a*s^2*b`` bytes of softmax, its dropout mask and output.
    Our block runs with dropout 0 (no masks), and the fused attention kernel keeps ``a*s*b``
    log-sum-exp values instead of any s x s tensor; each LayerNorm also keeps a mean and a
    reciprocal deviation per token (4 sb). So, in ``fp`` bytes per element:
    ``4sbh + 4sb`` unsplit (divided by t with sequence parallelism) ``+ (12sbh + asb) / t``.
    """
    sbh = s * b * h
    whole = 4 * sbh + 4 * s * b
    return fp * ((whole / t if sp else whole) + (12 * sbh + a * s * b) / t)


# ---------------------------------------------------------------- tests: rung 3

@pytest.mark.rung3
@pytest.mark.parametrize("name", [lay[0] for lay in _layouts(2)])
def test_tp2_equals_one_process(name):
    res, _ = results(2)
    _, kind, opt, _, kw = next(lay for lay in _layouts(2) if lay[0] == name)
    _check_layout(res, name, kind, opt, kw.get("steps", STEPS))


@pytest.mark.rung3
@pytest.mark.parametrize("name", [lay[0] for lay in _layouts(4)])
def test_4_ranks_equal_one_process(name):
    res, _ = results(4)
    _, kind, opt, _, kw = next(lay for lay in _layouts(4) if lay[0] == name)
    _check_layout(res, name, kind, opt, kw.get("steps", STEPS))


@pytest.mark.rung3
@pytest.mark.parametrize("name", [lay[0] for lay in _layouts(8)])
def test_3d_8_ranks_equal_one_process(name):
    res, _ = results(8)
    _, kind, opt, _, kw = next(lay for lay in _layouts(8) if lay[0] == name)
    _check_layout(res, name, kind, opt)


@pytest.mark.rung3
def test_bf16_autocast_through_tensor_and_sequence_parallel_layers():
    # ZeRO-3 keeps bf16 weights with fp32 masters; the custom autograd functions see autocast's
    # dtypes in forward and return gradients in the dtypes of their inputs.
    ref = oracle("gpt", "sgd", SHORT)
    for r in results(2)[0]:
        assert_curves_close(r["bf16"]["losses"], ref["losses"], 1e-3, "bf16 tp2 + SP, ZeRO-3")
        assert r["bf16"]["logits"].shape == ref["logits"].shape


@pytest.mark.rung3
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tp_communication_per_step_equals_theory(sp):
    res, _ = results(2)
    m = _model("gpt")
    want = comm_theory(L=m.n_layer, b=4, s=m.seq_len, h=m.d_model, t=2, sp=sp)
    for r in res:
        assert r["comm"][sp] == want
    # The loss never sends the logits: its share of the traffic is 3 values per token.
    assert 3 * 4 * m.seq_len * 4 < m.padded_vocab_size * 4 * m.seq_len * 4 / 10


@pytest.mark.rung3
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_block_activation_memory_matches_formula(tp, sp):
    m = _model("gpt")
    want = activation_formula(s=m.seq_len, b=4, h=m.d_model, a=m.n_head, t=tp, sp=sp)
    if tp == 1:
        got = [_block_activation_bytes(1, sp)]
    else:
        got = [r["memory"][sp] for r in results(tp)[0]]
    for g in got:
        assert abs(g - want) <= 0.10 * want, f"tp={tp} sp={sp}: measured {g} bytes, formula {want:.0f}"
    if tp > 1 and sp:  # sequence parallelism divides every term by tp
        assert abs(got[0] - _block_activation_bytes(1, False) / tp) <= 0.10 * got[0]


@pytest.mark.rung3
def test_checkpoint_from_dp2_tp2_zero2_loads_at_pp2_tp2_and_one_process():
    res, _ = results(4)
    ck = res[0]["ckpt"]
    for r in res:
        assert_curves_close(r["ckpt"]["first"], r["ckpt"]["whole"][:CKPT_AT], RTOL["adamw"], "before the save")
        assert_curves_close(r["ckpt"]["resumed"], r["ckpt"]["whole"][CKPT_AT:], RTOL["adamw"], "pp2 x tp2 resumed")
    # One process loads the same files through the same engine API.
    with one_process():
        from gigatrain.api import parallelize
        from gigatrain.distributed.mesh import Mesh, ParallelDims
        from gigatrain.optim import build_optimizer
        from gigatrain.parallel.policies import ParallelPlan

        mesh = Mesh(ParallelDims(1), torch.device("cpu"))
        plan = ParallelPlan(dims=mesh.dims, precision="fp32", grad_clip=CLIP)
        eng = parallelize(_model("gpt_nobias"), mesh,
                          lambda g: build_optimizer(_tcfg("adamw"), g, torch.device("cpu")), plan)
        with eng:
            step = eng.load(ck["path"])
            losses = [eng.train_step(_micro_batches("gpt_nobias", s, mesh, 2), LR["adamw"]).loss
                      for s in range(step, step + CKPT_MORE)]
    assert_curves_close(losses, ck["whole"][CKPT_AT:], RTOL["adamw"], "one process resumed")


# ---------------------------------------------------------------- tests: rungs 0-1

def test_config_refuses_what_tp_cannot_split():
    from gigatrain.config import ConfigError, load_config

    def err(*ov):
        with pytest.raises(ConfigError) as info:
            load_config(None, list(ov))
        return str(info.value)

    assert "model.d_model (18)" in err("model.n_head=2", "model.d_model=18", "parallel.tp=4")
    assert "padded vocabulary" in err("parallel.tp=3", "model.n_head=3", "model.d_model=48")
    assert "model.seq_len (130)" in err("parallel.tp=4", "parallel.sequence_parallel=true", "model.seq_len=130")
    assert "implemented for model.name=gpt" in err("parallel.tp=2", "parallel.sequence_parallel=true",
                                                   "model.name=vit", "data.name=fashion_mnist")
    assert "coatnet_dims[3]" in err("parallel.tp=4", "model.name=coatnet", "data.name=fashion_mnist",
                                    "model.coatnet_dims=[8, 16, 32, 18]", "model.n_head=2")
    load_config(None, ["parallel.tp=4", "parallel.sequence_parallel=true"])


def test_placements_record_tp_shards(fake_group):
    from gigatrain.distributed.mesh import LayoutError, Mesh, ParallelDims
    from gigatrain.parallel.placement import Placements
    from gigatrain.parallel.policies import TensorParallelPolicy
    from gigatrain.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           apply_tensor_parallel)

    fake_group(2)
    mesh = Mesh(ParallelDims(1, 1, 2), torch.device("cpu"))
    model = _model("gpt")
    full = {n: tuple(p.shape) for n, p in model.named_parameters()}
    placements = Placements.replicated_model(model)
    apply_tensor_parallel(model, mesh.tp, TensorParallelPolicy(2, True), placements)
    assert isinstance(model.blocks[0].attn.qkv, ColumnParallelLinear)
    assert isinstance(model.blocks[0].mlp.proj, RowParallelLinear)
    assert isinstance(model.stem.wte, VocabParallelEmbedding)
    assert model.head.lm_head.weight is model.stem.wte.weight  # still tied
    split = {"stem.wte.weight": 0, "blocks.*.attn.qkv.*": 0, "blocks.*.attn.proj.weight": 1,
             "blocks.*.mlp.fc.*": 0, "blocks.*.mlp.proj.weight": 1}
    local = dict(model.named_parameters())
    n_split = 0
    for n, pl in placements.items():
        assert pl.shape == full[n]
        dims = [d for pattern, d in split.items() if fnmatch.fnmatchcase(n, pattern)]
        if dims:
            n_split += 1
            assert pl.shard == ("tp", dims[0]) and "tp" not in pl.replicated, n
            assert local[n].shape[dims[0]] * 2 == full[n][dims[0]], n
        else:
            assert pl.shard is None and "tp" in pl.replicated and tuple(local[n].shape) == full[n], n
    assert n_split == 1 + 6 * 4
    # Checkpoints: the gathered tensor is written by tp rank 0 only.
    gathered = placements.gathered()
    assert gathered.writes_here("stem.wte.weight", {"dp": 0, "pp": 0, "tp": 0})
    assert not gathered.writes_here("stem.wte.weight", {"dp": 0, "pp": 0, "tp": 1})
    with pytest.raises(LayoutError, match="sequence"):
        apply_tensor_parallel(_model("vit"), mesh.tp, TensorParallelPolicy(2, True),
                              Placements.replicated_model(_model("vit")))
    from gigatrain.models import GPT

    one_head = GPT(vocab_size=60, seq_len=16, n_layer=1, n_head=1, d_model=32)
    with pytest.raises(LayoutError, match="1 attention heads do not split"):
        apply_tensor_parallel(one_head, mesh.tp, TensorParallelPolicy(2), Placements.replicated_model(one_head))
