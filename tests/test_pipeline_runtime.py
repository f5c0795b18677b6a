"""Pipeline runtime against one-process training (ladder 3: real gloo processes, one spawn per
world size), plus in-process checks of stage building and the split backward."""
import os

import pytest
import torch

from dist_utils import spawn

STEPS = 10
LR = 0.05


def _gpt(seed=0, n_layer=8):
    from gigatrain.models.gpt import GPT

    torch.manual_seed(seed)
    return GPT(vocab_size=32, seq_len=8, n_layer=n_layer, n_head=2, d_model=16, vocab_multiple=32)


def _batch(step, n, model):
    g = torch.Generator().manual_seed(1000 + step)
    return model.example_batch(n, generator=g)


def _reference(M, mb_size, dp=1):
    """One process, same micro-batches (dp replicas' micro-batches one after the other)."""
    from gigatrain.parallel.pipeline.runtime import split_microbatches

    model = _gpt()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        mbs = split_microbatches(_batch(step, M * mb_size * dp, model), M * dp)
        total = 0.0
        for x, y in mbs:
            loss = model.loss(model(x), y) / len(mbs)
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(kind, V, M, mb_size, pp_group, dp_group=None, dp_rank=0, dp=1, record=False, transport="auto"):
    import torch.distributed as dist

    from gigatrain.parallel.pipeline.partition import uniform
    from gigatrain.parallel.pipeline.runtime import PipelineRuntime, split_microbatches
    from gigatrain.parallel.pipeline.schedules import build_schedule

    pp = dist.get_world_size(pp_group)
    model = _gpt(seed=dist.get_rank() + 1)  # wrong init on purpose: the tied copies must be synced
    ref = _gpt()
    with torch.no_grad():  # all non-tied parameters start from the reference; tied ones only on rank 0
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if "wte" not in name or dist.get_rank(pp_group) == 0:
                p.copy_(q)
    sched = build_schedule(kind, pp, M, V)
    rt = PipelineRuntime(model, uniform(len(model.blocks), pp * V), sched, pp_group=pp_group,
                         virtual=V, record=record, transport=transport)
    opt = torch.optim.SGD(rt.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        full = _batch(step, M * mb_size * dp, model)
        mine = split_microbatches(full, dp)[dp_rank]
        loss = rt.step(split_microbatches(mine, M))
        if dp_group is not None:
            for p in rt.parameters():
                dist.all_reduce(p.grad, group=dp_group)
                p.grad.div_(dp)
            t = torch.tensor([loss])
            dist.all_reduce(t, group=dp_group)
            loss = t.item() / dp
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    local = {id(p) for p in rt.parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in local}
    return losses, params, rt


def _compare(losses, params, ref_losses, ref_params):
    if len(losses) != len(ref_losses) or not losses:   # a short run must not compare as equal
        return float("inf"), float("inf")
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    param_err = max(((params[n] - ref_params[n]).abs().max() / ref_params[n].abs().max().clamp_min(1e-12)).item()
                    for n in params)
    return loss_err, param_err


CASES_PP2 = [("naive", 1, 4), ("gpipe", 1, 4), ("1f1b", 1, 4), ("1f1b", 1, 3), ("interleaved", 2, 4),
             ("zb", 1, 4), ("zb", 1, 3), ("zb", 2, 4)]
CASES_PP4 = [("naive", 1, 4), ("gpipe", 1, 4), ("1f1b", 1, 6), ("interleaved", 2, 4), ("zb", 1, 6),
             ("zb", 2, 4)]


def _world2(rank, world, outdir):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    out = {}
    refs = {}
    kept = {}
    for kind, V, M in CASES_PP2:
        if M not in refs:
            refs[M] = _reference(M, 2)
        losses, params, rt = _train(kind, V, M, 2, group, record=(kind == "zb" and V == 1 and M == 4))
        out[(kind, V, M)] = _compare(losses, params, *refs[M])
        kept[(kind, V, M)] = (losses, params)
        if rt.record:
            recs = [None] * world
            dist.all_gather_object(recs, rt.records)
            if rank == 0:
                torch.save([r for part in recs for r in part], os.path.join(outdir, "records.pt"))
    # Forward-only (evaluation, sampling): the output of the whole model on every rank, for
    # contexts of changing length, with one and two chunks per rank.
    from gigatrain.parallel.pipeline.partition import uniform
    from gigatrain.parallel.pipeline.runtime import PipelineRuntime
    from gigatrain.parallel.pipeline.schedules import build_schedule
    for V in (1, 2):
        model, ref = _gpt(), _gpt()
        rt = PipelineRuntime(model, uniform(8, 2 * V), build_schedule("1f1b" if V == 1 else "interleaved", 2, 2, V),
                             pp_group=group, virtual=V)
        for T in (1, 5, 8):
            x = _batch(T, 3, ref)[0][:, :T]
            got = rt.forward_only(x, post=lambda y: y[:, -1])
            out[("forward_only", V, T)] = bool(torch.equal(got, ref(x)[:, -1].detach()))
    # The transport changes nothing either: gloo's messages give the same bits as shared memory
    # (which these CPU ranks of one host use by default).
    la, pa, rt = _train("1f1b", 1, 4, 2, group, transport="backend")
    lb, pb = kept[("1f1b", 1, 4)]
    out[("bitwise", "transport")] = (not rt.shared_memory and la == lb
                                     and all(torch.equal(pa[n], pb[n]) for n in pa))
    out[("bitwise", "shared memory used")] = _train("1f1b", 1, 1, 2, group)[2].shared_memory
    # The split backward changes nothing numerically: zb trains bit-identically to its unsplit twin.
    for split, full in ((("zb", 1, 4), ("1f1b", 1, 4)), (("zb", 2, 4), ("interleaved", 2, 4))):
        (la, pa), (lb, pb) = kept[split], kept[full]
        out[("bitwise",) + split] = la == lb and all(torch.equal(pa[n], pb[n]) for n in pa)
    return out


def _world4(rank, world):
    import torch.distributed as dist

    out = {}
    pp4 = dist.new_group([0, 1, 2, 3])
    refs = {}
    for kind, V, M in CASES_PP4:
        if M not in refs:
            refs[M] = _reference(M, 1)
        losses, params, _ = _train(kind, V, M, 1, pp4)
        out[("pp4",) + (kind, V, M)] = _compare(losses, params, *refs[M])
    # dp=2 x pp=2: pp groups {0,1}, {2,3}; dp groups {0,2}, {1,3}. Every rank creates every group.
    pp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pp_g, dp_g = pp_groups[rank // 2], dp_groups[rank % 2]
    ref = _reference(4, 1, dp=2)
    for kind, V in (("1f1b", 1), ("zb", 2)):
        losses, params, _ = _train(kind, V, 4, 1, pp_g, dp_group=dp_g, dp_rank=rank // 2, dp=2)
        out[("dp2xpp2", kind, V, 4)] = _compare(losses, params, *ref)
    return out


def _check(results, tol=1e-5):
    for case, (loss_err, param_err) in results.items():
        assert loss_err < tol, f"{case}: loss differs from one process by {loss_err:.2e}"
        assert param_err < tol, f"{case}: parameters differ from one process by {param_err:.2e}"


@pytest.mark.rung3
def test_pipeline_matches_one_process_pp2_and_timeline(tmp_path):
    from gigatrain.parallel.pipeline.timeline import measured_bubble, plot_timeline

    results = spawn(_world2, 2, str(tmp_path))
    for r in results:
        bitwise = {k: r.pop(k) for k in list(r) if k[0] == "bitwise"}
        fwd = {k: r.pop(k) for k in list(r) if k[0] == "forward_only"}
        assert len(fwd) == 6 and all(fwd.values()), fwd
        assert set(r) == set(CASES_PP2)
        _check(r)
        assert len(bitwise) == 4 and all(bitwise.values()), bitwise
    records = torch.load(tmp_path / "records.pt", weights_only=False)
    kinds = {(rec.rank, rec.action.kind) for rec in records}
    assert {(0, "F"), (0, "B"), (0, "W"), (1, "F"), (1, "B"), (1, "W")} <= kinds
    assert 0.0 <= measured_bubble(records) < 1.0
    png = tmp_path / "zb_pp2.png"
    plot_timeline(records, png, "measured zb, pp=2, M=4 (gloo CPU)")
    assert png.stat().st_size > 5000


@pytest.mark.rung3
def test_pipeline_matches_one_process_pp4_and_dp2xpp2():
    results = spawn(_world4, 4)
    for r in results:
        _check(r)
    assert len(results[0]) == len(CASES_PP4) + 2


# ---- in-process checks ------------------------------------------------------------------------
def test_stage_modules_compose_to_the_model():
    from gigatrain.parallel.pipeline.partition import uniform
    from gigatrain.parallel.pipeline.runtime import build_stage_modules, tied_parameters

    model = _gpt()
    x, _ = _batch(0, 2, model)
    part = uniform(8, 4)
    stages = {}
    for rank in range(2):
        for c in build_stage_modules(model, part, rank, pp=2, virtual=2):
            stages[c.stage] = c
    h = x
    for s in range(4):
        h = stages[s](h)
    assert torch.equal(h, model(x))
    assert stages[0].stem is model.stem and stages[3].head is model.head
    assert [len(stages[s].blocks) for s in range(4)] == [2, 2, 2, 2]
    assert tied_parameters(model) == [model.stem.wte.weight]
    with pytest.raises(ValueError):
        build_stage_modules(model, part, 0, pp=2, virtual=1)


def test_split_backward_equals_full_backward():
    """B (input gradient + module-output gradients) then W (each module to its own weights):
    bit-identical input gradients and accumulated .grad to one full backward, over two
    micro-batches, for a first stage (stem + blocks: no input gradient, so B is empty and W one
    whole backward), a last stage (blocks + head: W module by module), and the whole model in one
    stage (tied embedding inside: falls back to a full-graph W)."""
    from gigatrain.parallel.pipeline.partition import uniform
    from gigatrain.parallel.pipeline.runtime import SplitBackward, build_stage_modules

    model = _gpt()
    first, last = build_stage_modules(model, uniform(8, 2), 0, pp=2)[0], build_stage_modules(model, uniform(8, 2), 1, pp=2)[0]
    whole = build_stage_modules(model, uniform(8, 1), 0, pp=1)[0]
    toks = [_batch(i, 2, model) for i in range(2)]
    hidden = [torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    for stage, is_first, exact in ((first, True, True), (last, False, True), (whole, True, False)):
        params = list(stage.parameters())
        split = SplitBackward(stage)
        assert split.exact is exact

        def run(use_split):
            for p in params:
                p.grad = None
            gins = []
            for (idx, tgt), h in zip(toks, hidden):
                x = idx if is_first else h.clone().requires_grad_(True)
                if stage.head is None:
                    g = torch.ones(2, 8, 16)
                    y, rec = split.capture(stage, x)
                else:
                    g = None
                    out, rec = split.capture(stage, x)
                    y = model.loss(out, tgt) / 2
                if use_split:
                    gx, work = split.backward_input(y, g, x, rec)
                    assert work[0] == ("full" if is_first or not exact else "modules")
                    split.backward_weight(work)
                else:
                    torch.autograd.backward(y, grad_tensors=g)
                    gx = None if is_first else x.grad
                gins.append(gx)
            return gins, [p.grad.clone() for p in params]

        g_full, p_full = run(False)
        g_split, p_split = run(True)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g_full, g_split))
        assert all(torch.equal(a, b) for a, b in zip(p_full, p_split))
        split.close()


@pytest.mark.parametrize("kind,V", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb", 1), ("zb", 2)])
def test_single_process_pipeline_matches_plain_training(kind, V):
    """pp = 1 without a process group: stages hand tensors over in memory; the tied embedding
    lives in one stage-set, so the split backward takes its full-graph fallback."""
    from gigatrain.parallel.pipeline.partition import uniform
    from gigatrain.parallel.pipeline.runtime import PipelineRuntime, split_microbatches
    from gigatrain.parallel.pipeline.schedules import build_schedule

    ref_losses, ref_params = _reference(M=2, mb_size=2)
    model = _gpt()
    rt = PipelineRuntime(model, uniform(8, V), build_schedule(kind, 1, 2, V), pp_group=None, virtual=V)
    opt = torch.optim.SGD(rt.parameters(), lr=LR)
    for step in range(STEPS):
        loss = rt.step(split_microbatches(_batch(step, 4, model), 2))
        opt.step()
        opt.zero_grad()
        assert loss == pytest.approx(ref_losses[step], rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p, ref_params[n], rtol=0, atol=1e-7), n
    rt.close()
