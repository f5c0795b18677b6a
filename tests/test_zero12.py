"""ZeRO stages 1 and 2 (offload none / cpu) against one process, on 2 and 4 gloo ranks (ladder 3).

One spawn per world size runs every configuration: losses per step, the full (unsharded) state
after training, loading a one-process state and training on, the fp16 overflow skip, bf16
parameters with fp32 masters, and the bytes sent per step.
"""
import math
import time
from types import SimpleNamespace

import torch
import torch.nn as nn

from dist_utils import assert_curves_close, spawn
import pytest

pytestmark = pytest.mark.rung3

GLOBAL_BATCH = 8
STEPS = 10
EXTRA = 2          # steps after loading a one-process state
CLIP = 0.3         # below every step's gradient norm: clipping acts on every step
LR = {"sgd": 0.5, "adamw": 1e-2}


def _model(seed=0):
    from gigatrain.models import build_model

    torch.manual_seed(seed)
    # No biases: the key projection's bias has an exactly-zero gradient in exact arithmetic, so
    # Adam turns its rounding noise into full-size steps and its values differ between any two
    # summation orders; the losses do not depend on it.
    return build_model(SimpleNamespace(name="gpt", n_layer=2, n_head=2, d_model=32, seq_len=16, bias=False),
                       vocab_size=64)


def _tcfg(opt):
    return SimpleNamespace(optimizer=opt, lr=LR[opt], weight_decay=0.1, momentum=0.9, betas=(0.9, 0.95))


def _batch(step):
    # Three batches in turn: the model learns them, so the losses move and any wrong update shows.
    return _model_for_data.example_batch(GLOBAL_BATCH, torch.Generator().manual_seed(step % 3))


_model_for_data = _model()


def _oracle(opt, clip):
    """One process, plain PyTorch, the whole global batch at once."""
    from gigatrain.parallel.data_parallel import optimizer_state_by_name, params_by_name
    from gigatrain.optim import build_optimizer, param_groups

    model = _model()
    init = params_by_name(model)
    optim = build_optimizer(_tcfg(opt), param_groups(model.named_parameters()), torch.device("cpu"))
    losses, norms, state = [], [], None
    for step in range(STEPS + EXTRA):
        if step == STEPS:
            state = (params_by_name(model), optimizer_state_by_name(model, optim))
        x, y = _batch(step)
        loss = model.loss(model(x), y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)))
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    moved = max(_rel(state[0][n], init[n]) for n in init)
    return {"losses": losses, "norms": norms, "state": state, "moved": moved}


def _micro_batches(step, rank, world, accum):
    x, y = _batch(step)
    local = GLOBAL_BATCH // world
    x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
    k = local // accum
    return [(x[i * k:(i + 1) * k], y[i * k:(i + 1) * k]) for i in range(accum)]


def _engine(mesh, stage, offload, opt, clip, precision="fp32", seed=0, bucket_mb=0.004):
    from dist_utils import engine_for
    from gigatrain.optim import build_optimizer

    dev = torch.device("cpu")
    return engine_for(_model(seed), mesh, lambda groups: build_optimizer(_tcfg(opt), groups, dev),
                      precision=precision, grad_clip=clip, zero=stage, bucket_mb=bucket_mb, offload=offload)


def _rel(a, b):
    """max |a - b| / max |b| over one tensor (0 when both are zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def _state_diff(got, ref):
    """Largest relative difference between two (params, optim) full states; inf if keys differ."""
    gp, go = got
    rp, ro = ref
    if set(gp) != set(rp) or set(go) != set(ro):
        return math.inf
    worst = max(_rel(gp[n], rp[n]) for n in rp)
    for n in ro:
        if set(go[n]) != set(ro[n]):
            return math.inf
        for k in ro[n]:
            if tuple(go[n][k].shape) != tuple(ro[n][k].shape):
                return math.inf
            worst = max(worst, _rel(go[n][k], ro[n][k]))
    return worst


def _cases():
    out = []
    for stage in (1, 2):
        for offload in ("none", "cpu"):
            for opt in ("sgd", "adamw"):
                out.append(dict(stage=stage, offload=offload, opt=opt, accum=1, clip=None, overlap=False))
                out.append(dict(stage=stage, offload=offload, opt=opt, accum=2, clip=CLIP, overlap=False))
        # The host update overlapping backward (no clipping, no loss scaling).
        out.append(dict(stage=stage, offload="cpu", opt="adamw", accum=2, clip=None, overlap=True))
    return out


LOAD_CASES = [(1, "none", "adamw"), (2, "cpu", "adamw"), (2, "none", "sgd"), (1, "cpu", "sgd")]


def _check_all(rank, world, refs):
    from gigatrain.distributed.mesh import Mesh, ParallelDims

    mesh = Mesh(ParallelDims(dp=world), torch.device("cpu"))
    out = {"cases": [], "load": [], "fp16": [], "bf16": {}, "comm": {}}

    # 1. Every configuration against one process: losses per step and the final full state.
    for case in _cases():
        eng = _engine(mesh, case["stage"], case["offload"], case["opt"], case["clip"], seed=rank)
        seen = _watch_backward(eng, mesh)
        losses, norms = [], []
        for step in range(STEPS):
            if case["overlap"]:
                eng.strategy.begin_step(LR[case["opt"]], overlap=True)
            r = eng.train_step(_micro_batches(step, rank, world, case["accum"]), LR[case["opt"]])
            losses.append(r.loss)
            norms.append(r.grad_norm)
        state = eng.full_state()
        ref = refs[(case["opt"], case["clip"])]
        out["cases"].append(dict(case, losses=losses, norms=norms,
                                 state_diff=_state_diff(state, ref["state"]),
                                 grads_kept=[p.grad is not None for p in eng.model.parameters()],
                                 during_backward=seen[-1]))
        eng.strategy.close()

    # 2. Load a one-process state (a checkpoint from another layout) and train on.
    for stage, offload, opt in LOAD_CASES:
        eng = _engine(mesh, stage, offload, opt, None, seed=100 + rank)
        params, optim = refs[(opt, None)]["state"]
        eng.load_full_state(params, optim)
        roundtrip = _state_diff(eng.full_state(), (params, optim))
        losses = [eng.train_step(_micro_batches(STEPS + i, rank, world, 1), LR[opt]).loss for i in range(EXTRA)]
        out["load"].append(dict(stage=stage, offload=offload, opt=opt, roundtrip=roundtrip, losses=losses))
        eng.strategy.close()

    # 3. fp16: an overflow on one rank's shard skips the step on every rank.
    from gigatrain.trainer import InjectOverflow
    for stage in (1, 2):
        for offload in ("none", "cpu"):
            eng = _engine(mesh, stage, offload, "sgd", CLIP, precision="fp16")
            eng.scaler.scale = 1024.0   # no natural overflow: only the injected one
            before = after = None
            res = []
            for step in range(3):
                if step == 1:
                    before = eng.full_state()[0]
                eng.hooks = [InjectOverflow(2)] if rank == world - 1 else []   # the second step
                r = eng.train_step(_micro_batches(step, rank, world, 1), LR["sgd"])
                if step == 1:
                    after = eng.full_state()[0]
                res.append((r.skipped, r.loss_scale, r.grad_norm))
            out["fp16"].append(dict(stage=stage, offload=offload, res=res,
                                    unchanged=all(torch.equal(before[n], after[n]) for n in before),
                                    dtype=str(next(eng.model.parameters()).dtype)))
            eng.strategy.close()

    # 4. bf16 parameters and gradients with fp32 masters (tiny: bf16 matmuls are slow on CPUs).
    for stage, offload in ((1, "none"), (2, "none"), (2, "cpu")):
        eng = _engine(mesh, stage, offload, "adamw", None, precision="bf16")
        losses = [eng.train_step(_micro_batches(s, rank, world, 1), LR["adamw"]).loss for s in range(3)]
        st = eng.strategy
        out["bf16"][(stage, offload)] = dict(
            losses=losses,
            param_dtypes=sorted({str(p.dtype) for p in eng.model.parameters()}),
            master_dtypes=sorted({str(p.dtype) for g in eng.optimizer.param_groups for p in g["params"]}),
            state_diff_to_model=max(_rel(v.bfloat16().float(), dict(eng.model.named_parameters())[n].detach().float())
                                    for n, v in eng.full_state()[0].items()))
        st.close()

    # 5. Bytes each rank sends in one step (accumulation 1; stage 2 also with accumulation 2).
    for stage, precision, accum in ((0, "fp32", 1), (1, "fp32", 1), (2, "fp32", 1), (2, "bf16", 1),
                                    (1, "fp32", 2), (2, "fp32", 2), (1, "bf16", 1)):
        eng = _engine(mesh, stage, "none", "sgd", None, precision=precision)
        numel = sum(p.numel() for p in eng.model.parameters() if p.requires_grad)
        mesh.stats.reset()
        eng.train_step(_micro_batches(0, rank, world, accum), LR["sgd"])
        elsize = 2 if precision == "bf16" else 4
        out["comm"][(stage, precision, accum)] = dict(
            sent=mesh.stats.total_sent("dp"), numel=numel, elsize=elsize,
            by_op={op: v for (g, op), v in mesh.stats.sent.items() if g == "dp"})

    # 6. Pipeline-style accumulation (sync off throughout, one reduce at the end; stage 1) and a
    #    parameter left out of the norm (a tied weight another pipeline stage counts).
    eng = _engine(mesh, 1, "none", "sgd", None, seed=rank)
    ref = _model()
    x, y = _batch(0)
    ref.loss(ref(x), y).backward()
    ref_sq = sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters())
    wte_sq = float(ref.stem.wte.weight.grad.double().pow(2).sum())
    eng.strategy.set_sync(False)
    for xb, yb in _micro_batches(0, rank, world, 2):
        (eng.model.loss(eng.model(xb), yb) / 2).backward()
    eng.strategy.reduce_accumulated()
    out["accumulated"] = (eng.strategy.grad_sq_norm() / ref_sq,
                          eng.strategy.grad_sq_norm(skip={"stem.wte.weight"}) / (ref_sq - wte_sq))

    # 7. A parameter that gets no gradient (stage 2 must zero its range, alone in a bucket or not),
    #    against our stage 0, which treats it the same way (zero gradient, weight decay applies).
    toy = {}
    for stage, offload in ((0, None), (1, "none"), (2, "none"), (2, "cpu")):
        from dist_utils import engine_for
        from gigatrain.optim import build_optimizer

        torch.manual_seed(rank)
        dev = torch.device("cpu")
        eng = engine_for(_Toy(), mesh, lambda groups: build_optimizer(_tcfg("sgd"), groups, dev),
                         zero=stage, bucket_mb=0.0005, offload=offload)
        g = torch.Generator().manual_seed(5)
        xs, ys = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 4, generator=g)
        local = 8 // world
        losses = [eng.train_step([(xs[s, rank * local:(rank + 1) * local], ys[s, rank * local:(rank + 1) * local])],
                                 0.1).loss for s in range(3)]
        toy[(stage, offload)] = (losses, eng.full_state())
    base_losses, base_state = toy[(0, None)]
    assert all(len(v[0]) == len(base_losses) == 3 for v in toy.values())
    out["unused"] = {k: (max(abs(a - b) for a, b in zip(v[0], base_losses)), _state_diff(v[1], base_state))
                     for k, v in toy.items()}
    _settle()
    return out


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.unused = nn.Linear(16, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))

    def loss(self, out, y):
        return nn.functional.mse_loss(out, y)


def _watch_backward(eng, mesh):
    """Record, when backward reaches the first block's output (the last block and the head are
    done, the first block and the embeddings not yet), how many reduce-scatters this micro-step
    has launched and how many bucket updates were handed to the offload worker."""
    seen = [(0, 0)]
    start = [0]

    def launched():
        return mesh.stats.calls.get(("dp", "reduce_scatter"), 0)

    def record(grad):
        ov = eng.strategy._overlap
        seen.append((launched() - start[0], ov.submitted if ov else 0))

    def hook(module, inputs, output):
        start[0] = launched()
        output.register_hook(record)

    eng.model.blocks[0].register_forward_hook(hook)
    return seen


def _settle():
    """Let gloo's threads drop their finished work objects before the process exits.

    They need the GIL to do so; one that still waits for it when the interpreter finalizes aborts
    the process (pytorch/pytorch#179291). A barrier and a short sleep release the GIL."""
    import torch.distributed as dist

    dist.barrier()
    time.sleep(0.1)


def _run_world(world):
    refs = {(opt, clip): _oracle(opt, clip) for opt in ("sgd", "adamw") for clip in (None, CLIP)}
    results = spawn(_check_all, world, refs, timeout_s=120)
    return refs, results


def _check_world(world):
    refs, results = _run_world(world)
    r0 = results[0]
    for case in r0["cases"]:
        ref = refs[(case["opt"], case["clip"])]
        tol = 1e-5 if case["opt"] == "sgd" else 1e-4
        name = {k: case[k] for k in ("stage", "offload", "opt", "accum", "clip", "overlap")}
        assert_curves_close(case["losses"], ref["losses"][:STEPS], rtol=tol, what=f"loss (world {world}, {name})")
        # The parameters moved: the comparisons would notice a missing or wrong update.
        assert ref["moved"] > 0.05
        assert_curves_close(case["norms"], ref["norms"][:STEPS], rtol=10 * tol, what=f"norm (world {world}, {name})")
        if case["clip"]:
            assert min(ref["norms"][:STEPS]) > CLIP   # clipping really was active
        # Adam turns rounding-level differences of near-zero gradient elements into lr-sized
        # steps, so its state is compared at 1e-3 of each tensor's scale (a wrong slice or shard
        # is off by O(1)); SGD's at the fp32 contract.
        assert case["state_diff"] < (1e-5 if case["opt"] == "sgd" else 1e-3), (world, name, case["state_diff"])
        if case["stage"] == 2:
            assert not any(case["grads_kept"]), "stage 2 keeps no param.grad"
        # Buckets are reduce-scattered while backward still runs (stage 2 on every micro-step,
        # stage 1 on the last one, which is the one recorded last), and with the overlapped host
        # update the worker already has buckets of the step.
        launched, submitted = case["during_backward"]
        assert launched > 0, name
        if case["overlap"]:
            assert submitted > 0, name
    for case in r0["load"]:
        ref = refs[(case["opt"], None)]["losses"][STEPS:]
        assert case["roundtrip"] < 1e-6, case
        assert_curves_close(case["losses"], ref, rtol=1e-5, what=f"loaded (world {world}, {case['stage']}, {case['offload']})")
    # Every rank reports the same numbers.
    for r in results[1:]:
        assert len(r["cases"]) == len(r0["cases"]) > 0
        for a, b in zip(r["cases"], r0["cases"]):
            assert a["losses"] == b["losses"] and a["state_diff"] == b["state_diff"]
    for r in results:
        for case in r["fp16"]:
            skipped = [s for s, _, _ in case["res"]]
            scales = [sc for _, sc, _ in case["res"]]
            assert skipped == [False, True, False], case
            assert scales[2] == scales[0] / 2, case   # lowered after the skipped step
            assert case["unchanged"], case
            assert case["dtype"] == "torch.float16"
            assert math.isfinite(case["res"][2][2])
    bf = r0["bf16"]
    ref = refs[("adamw", None)]["losses"][:3]
    for key, v in bf.items():
        assert v["param_dtypes"] == ["torch.bfloat16"] and v["master_dtypes"] == ["torch.float32"], key
        assert_curves_close(v["losses"], ref, rtol=2e-2, what=f"bf16 {key}")
        assert v["state_diff_to_model"] == 0.0   # the model holds the bf16 rounding of the masters
    for r in results:
        for key, (loss_diff, state_diff) in r["unused"].items():
            assert loss_diff < 1e-6 and state_diff < 1e-6, (key, loss_diff, state_diff)
        assert abs(r["accumulated"][0] - 1) < 1e-5 and abs(r["accumulated"][1] - 1) < 1e-5, r["accumulated"]
    # Stage 1 and stage 2 do the same arithmetic at accumulation 1: identical bf16 runs.
    assert bf[(1, "none")]["losses"] == bf[(2, "none")]["losses"]
    for r in results:
        for (stage, precision, accum), c in r["comm"].items():
            n, p, e = world, c["numel"], c["elsize"]
            # reduce-scatter + all-gather (stage 0: all-reduce), P(N-1)/N elements each; stage 2
            # reduce-scatters on every micro-step.
            scatters = accum if stage == 2 else 1
            theory = (scatters + 1) * p * (n - 1) / n * e
            assert abs(c["sent"] - theory) / theory < 0.01, (world, stage, precision, accum, c, theory)
            if stage:
                ops = c["by_op"]
                assert set(ops) >= {"reduce_scatter", "all_gather"}, ops
                assert abs(ops["all_gather"] - p * (n - 1) / n * e) / theory < 0.01


def test_zero12_two_ranks():
    _check_world(2)


def test_zero12_four_ranks():
    _check_world(4)


# -- no process group ------------------------------------------------------------------------------
def test_cpu_adam_output_may_overwrite_its_gradient():
    """The offload update writes the new bf16 parameters over the bf16 gradients it reads."""
    from gigatrain.optim.cpu_adam import adamw_step_

    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(1000, generator=g)
    grad = torch.randn(1000, generator=g).bfloat16()
    results = []
    for alias in (False, True):
        p, m, v = p0.clone(), torch.zeros(1000), torch.zeros(1000)
        gr = grad.clone()
        out = gr if alias else torch.empty(1000, dtype=torch.bfloat16)
        for step in (1, 2):
            if alias and step == 2:
                gr.copy_(grad)
            adamw_step_(p, gr if not alias else gr, m, v, step, 1e-2, weight_decay=0.1, clip_coef=0.5,
                        out_lowp=out)
        results.append((p, out.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[1][1], results[1][0].bfloat16())


def test_host_optimizer_matches_torch_per_bucket():
    """Bucket-by-bucket host updates equal torch's optimizer over the whole flat tensor."""
    from gigatrain.parallel.zero.offload import HostOptimizer

    for kind in ("adamw", "sgd"):
        g = torch.Generator().manual_seed(1)
        init = torch.randn(96, generator=g)
        grads = [torch.randn(96, generator=g) for _ in range(3)]
        ref = nn.Parameter(init.clone())
        make = (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))) \
            if kind == "adamw" else (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1))
        ref_opt = make([ref])
        flat = init.clone()
        params = [nn.Parameter(flat[0:40]), nn.Parameter(flat[40:96])]
        host = HostOptimizer(make(params), params, [0, 40], 96, pin=False)
        for gr in grads:
            ref.grad = gr * 0.5
            ref_opt.step()
            lowp = gr.clone()
            host.step_(params, [lowp[0:40], lowp[40:96]], [lowp[0:40], lowp[40:96]], 0.5)
            assert torch.equal(lowp, flat)       # the output buffer got the new values
        assert (flat - ref.detach()).abs().max() < 1e-6, kind
        # States live in the one preallocated buffer, as views.
        st = host.optimizer.state[params[1]]
        key = "exp_avg" if kind == "adamw" else "momentum_buffer"
        assert st[key].untyped_storage().data_ptr() == host.state_buffer.tensor.untyped_storage().data_ptr()
