"""The planner (rung 0: no process group): formulas, schedules, search, JSON, CLI."""
import json
import time

import pytest
import torch

from gigatrain.cli import main
from gigatrain.config import check_supported, load_config, resolve_for_world
from gigatrain.models import build_model
from gigatrain.parallel.pipeline.schedules import build_schedule
from gigatrain.parallel.pipeline.simulate import Costs, simulate
from gigatrain.parallel.zero.memory import model_state_bytes
from gigatrain.planner import pipeline as pl
from gigatrain.planner.cost import block_flops, collective_time, narayanan_flops, step_time
from gigatrain.planner.memory import (Job, Layout, ModelSpec, block_activation_bytes, korthikanti_activation_bytes,
                                      memory_breakdown, rank_params)
from gigatrain.planner.plan import job_from_config, plan_for, predicted_peak_bytes, split_overrides
from gigatrain.planner.presets import PRESETS, get_device
from gigatrain.planner.search import PlanError, search

GPT_1T = ModelSpec("gpt", 128, 25600, 160, 2048, 51200, stem_extra=2048 * 25600)
SMALL = ModelSpec("gpt", 8, 256, 8, 128, 512, stem_extra=128 * 256)


# -- formulas -------------------------------------------------------------------------------
def test_narayanan_flops_hand_values():
    # B=2, s=4, l=1, h=8, V=16: 96*2*4*64 = 49152; (1 + 4/48 + 16/128) = 1.208333...
    assert narayanan_flops(2, 4, 1, 8, 16, True) == pytest.approx(59392.0)
    # 72*2*4*64 = 36864; (1 + 4/48 + 16/96) = 1.25
    assert narayanan_flops(2, 4, 1, 8, 16, False) == pytest.approx(46080.0)
    # Without recomputation it is 3x the forward matmuls plus the logits, 6 B s h V.
    fwd = sum(block_flops(4, 2, 8).values())
    assert narayanan_flops(2, 4, 1, 8, 16, False) == pytest.approx(3 * fwd + 6 * 2 * 4 * 8 * 16)


def test_korthikanti_hand_values():
    s, b, h, a = 2048, 1, 12288, 96
    sbh = s * b * h
    # 5 a s / (h t) = 10 at t = 8
    assert korthikanti_activation_bytes(s, b, h, a, 8) == pytest.approx(23 * sbh)
    assert korthikanti_activation_bytes(s, b, h, a, 8, sp=True) == pytest.approx(sbh * (34 + 80) / 8)
    assert korthikanti_activation_bytes(s, b, h, a, 8, recompute="selective") == pytest.approx(13 * sbh)
    assert korthikanti_activation_bytes(s, b, h, a, 8, True, "selective") == pytest.approx(34 * sbh / 8)
    assert korthikanti_activation_bytes(s, b, h, a, 8, recompute="full") == pytest.approx(2 * sbh)
    assert korthikanti_activation_bytes(s, b, h, a, 1) == pytest.approx(sbh * (34 + 5 * a * s / h))


@pytest.mark.parametrize("t", [1, 2, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("rc", ["none", "selective", "full"])
def test_block_activations_paper_mode_is_korthikanti(t, sp, rc):
    spec = ModelSpec("gpt", 4, 1024, 16, 512, 1024)
    got = block_activation_bytes(spec, 2, t, sp, rc, elem_bytes=2, paper=True)
    assert got == pytest.approx(korthikanti_activation_bytes(512, 2, 1024, 16, t, sp, rc))


def test_block_activations_of_our_block_hand_value():
    spec = ModelSpec("gpt", 1, 64, 4, 16, 64)
    # per token, fp32: replicated 4 h e + 16 (LayerNorm stats) = 1040; split 12 h e + 4 a = 3088
    assert block_activation_bytes(spec, 2, elem_bytes=4) == 32 * (1040 + 3088)
    # selective drops the log-sum-exp; full keeps the block input only
    assert block_activation_bytes(spec, 2, recompute="selective", elem_bytes=4) == 32 * (1040 + 12 * 64 * 4)
    assert block_activation_bytes(spec, 2, recompute="full", elem_bytes=4) == 32 * 64 * 4


def test_collective_time_hand_value():
    dev = PRESETS["a100-80g"]  # 300 GB/s NVLink at 80%, 5 us per ring step
    t = collective_time("all_reduce", 1e9, 8, dev, inter=False)
    assert t == pytest.approx(14 * 5e-6 + 2 * 7 / 8 * 1e9 / 240e9)
    assert collective_time("all_gather", 1e9, 8, dev, False) == pytest.approx(7 * 5e-6 + 7 / 8 * 1e9 / 240e9)
    assert collective_time("all_reduce", 1e9, 8, dev, inter=True) > 5 * t
    assert collective_time("all_reduce", 1e9, 1, dev, False) == 0.0


def test_param_count_matches_the_gpt():
    cfg = load_config(None, ["model.vocab_size=300", "model.n_layer=3", "model.d_model=64", "model.n_head=4"])
    spec = ModelSpec.from_config(cfg.model, cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert spec.vocab == model.padded_vocab_size == 320
    assert spec.total_params() == sum(p.numel() for p in model.parameters())
    # With a pipeline the last stage holds its own copy of the tied embedding.
    job = Job(spec, 8, param_bytes=4)
    lay = Layout(dp=1, pp=3, tp=1)
    assert sum(rank_params(job, lay, r) for r in range(3)) == spec.total_params() + 320 * 64


@pytest.mark.parametrize("zero,offload", [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "cpu")])
def test_memory_states_are_model_state_bytes(zero, offload):
    dev = PRESETS["a100-80g"]
    job = Job(SMALL, 64, param_bytes=2)
    lay = Layout(dp=4, pp=1, tp=1, zero=zero, offload=offload, micro_batch=4)
    mem = memory_breakdown(job, lay, dev)
    want = model_state_bytes(SMALL.total_params(), 4, zero, offload, 2, True)
    assert mem.states == pytest.approx(want["device"])
    assert mem.host == pytest.approx(want["host"])
    assert mem.activations == pytest.approx(SMALL.n_layer * block_activation_bytes(SMALL, 4, elem_bytes=2)
                                            + 8 * 4 * 128 + 4 * 4 * 128 * 512 + 2 * 4 * 128 * 256 * 2)
    assert mem.peak == pytest.approx(mem.tensors * (1 + dev.alloc_margin) + dev.runtime_bytes)


def test_memory_orders():
    dev = PRESETS["a100-80g"]
    job = Job(SMALL, 64)
    base = Layout(dp=1, pp=4, tp=1, micro_batch=2)
    from dataclasses import replace
    one = memory_breakdown(job, base, dev)
    gp = memory_breakdown(job, replace(base, schedule="gpipe"), dev)
    assert gp.activations > 3 * one.activations        # 32 micro-batches in flight instead of 4
    full = memory_breakdown(job, replace(base, recompute="full"), dev)
    assert full.activations < one.activations / 5


class _LiveSaved:
    """Peak bytes autograd holds for backward (each storage once, parameters left out), including
    what ``torch.utils.checkpoint`` stores while it recomputes (through its own hooks)."""

    def __init__(self, params):
        self.params, self.refs, self.live, self.peak = params, {}, 0, 0

    def count(self, t):
        import weakref
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if key in self.params or nbytes == 0:
            return t
        if key not in self.refs:
            self.refs[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key, nbytes)
        return t

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes


@pytest.mark.parametrize("rc", ["none", "selective", "full"])
def test_memory_activations_measured_with_recomputation(rc, monkeypatch):
    """One process (dp1): the planner's activations against the bytes a GPT's step keeps for
    backward, recomputed ones included (the 4-rank grid is benchmarks/bench_planner.py --memory)."""
    from types import SimpleNamespace
    from torch.utils import checkpoint as ckpt

    from gigatrain.parallel.recompute import RecomputePolicy, apply_recompute
    L, h, a, s, V, b = 2, 64, 4, 32, 128, 4
    torch.manual_seed(0)
    model = build_model(SimpleNamespace(name="gpt", dropout=0.0, n_layer=L, d_model=h, n_head=a, seq_len=s),
                        vocab_size=V)
    apply_recompute(model, RecomputePolicy(rc))
    live = _LiveSaved({p.untyped_storage().data_ptr() for p in model.parameters()})
    init = ckpt._recomputation_hook.__init__

    def counting_init(hook, *args):
        init(hook, *args)
        pack = hook.pack_hook
        # counted before the call: storing the last tensor ends the recomputation by raising
        hook.pack_hook = lambda x: pack(live.count(x.detach() if x.requires_grad else x))
    monkeypatch.setattr(ckpt._recomputation_hook, "__init__", counting_init)
    x, y = model.example_batch(b, torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: live.count(t.detach()), lambda t: t):
        model.loss(model(x), y).backward()
    spec = ModelSpec("gpt", L, h, a, s, V, stem_extra=s * h)
    pred = memory_breakdown(Job(spec, b, param_bytes=4), Layout(1, 1, 1, micro_batch=b, recompute=rc),
                            get_device("cpu"))
    assert pred.activations == pytest.approx(live.peak, rel=0.01)


# -- schedules ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,pp,M,V", [("1f1b", 4, 8, 1), ("1f1b", 6, 3, 1), ("zb", 4, 8, 1), ("zb", 3, 7, 1),
                                         ("interleaved", 4, 8, 2), ("zb", 4, 8, 2), ("gpipe", 4, 6, 1)])
def test_live_profile_against_the_simulator(kind, pp, M, V):
    walked = pl.walk_profile(kind, pp, M, V)
    assert pl.live_profile(kind, pp, M, V) == walked
    # beyond 2 pp micro-batches the peak no longer grows
    if kind != "gpipe":
        assert pl.walk_profile(kind, pp, 4 * pp, V) == pl.walk_profile(kind, pp, 2 * pp, V)


@pytest.mark.parametrize("kind,pp,M,V,b,w,comm", [
    ("1f1b", 4, 8, 1, 2, 0, 0), ("interleaved", 4, 8, 2, 2, 0, 0), ("zb", 4, 8, 1, 1, 1, 0),
    ("gpipe", 3, 5, 1, 3, 0, 0), ("zb", 4, 8, 2, 1, 1, 0), ("1f1b", 4, 8, 1, 2, 0, 0.2),
    ("interleaved", 4, 8, 2, 2, 0, 0.2), ("zb", 4, 12, 1, 1, 0.5, 0.1)])
def test_makespan_against_the_simulator(kind, pp, M, V, b, w, comm):
    sim = simulate(build_schedule(kind, pp, M, V), Costs(f=1, b=b, w=w, comm=comm)).makespan
    ours = pl.makespan_units(kind, pp, M, V, b, w, comm)
    # exact with free hand-offs; the simulator also makes each batch of messages wait for the
    # previous one, which costs it up to a few percent more
    assert ours == pytest.approx(sim, rel=1e-9 if comm == 0 else 0.03)
    assert pl.makespan_lower_bound(kind, pp, M, V, b, w, comm) <= ours + 1e-9


@pytest.mark.parametrize("kind,V", [("1f1b", 1), ("gpipe", 1), ("interleaved", 2), ("interleaved", 4)])
@pytest.mark.parametrize("pp,M", [(2, 4), (4, 8), (4, 16), (8, 24)])
def test_free_makespan_is_megatrons_formula(kind, V, pp, M):
    assert pl.free_makespan_units(kind, pp, M, V, 2.0) == pytest.approx(pl._replay(kind, pp, M, V, 2.0, 0.0, 0.0))


@pytest.mark.parametrize("kind,V", [("1f1b", 1), ("interleaved", 2), ("zb", 1), ("zb", 2), ("gpipe", 1)])
def test_makespan_extrapolation_is_exact(kind, V):
    b, w = (1.0, 1.0) if kind == "zb" else (2.0, 0.0)
    assert pl.makespan_units(kind, 4, 40, V, b, w, 0.1) == pytest.approx(pl._replay(kind, 4, 40, V, b, w, 0.1))


# -- search ---------------------------------------------------------------------------------
def test_search_honours_fixed_choices():
    dev = PRESETS["h100-80g"]
    job = Job(SMALL, 64)
    fixed = {"tp": 2, "pp": 2, "zero": 1, "micro_batch": 2, "recompute": "selective", "schedule": "interleaved"}
    res = search(job, dev, 16, fixed)
    assert res.candidates
    for c in res.candidates:
        lay = c.layout
        assert (lay.tp, lay.pp, lay.dp, lay.zero, lay.micro_batch, lay.recompute, lay.schedule) == \
            (2, 2, 4, 1, 2, "selective", "interleaved")
        assert lay.virtual >= 2
    free = search(job, dev, 16)
    assert free.best.step_s <= res.best.step_s  # fixing can only lose
    shapes = {(c.layout.dp, c.layout.pp, c.layout.tp) for c in free.candidates}
    assert len(shapes) > 3 and all(d * p * t == 16 for d, p, t in shapes)


def test_search_refuses_impossible_fixed_layouts():
    job = Job(SMALL, 64)
    with pytest.raises(PlanError, match="does not divide model.n_head"):
        search(job, PRESETS["a100-80g"], 6, {"tp": 3})
    with pytest.raises(PlanError, match="not the 8 GPUs"):
        search(job, PRESETS["a100-80g"], 8, {"tp": 2, "pp": 2, "dp": 4})
    with pytest.raises(PlanError) as e:
        search(Job(GPT_1T, 64), PRESETS["a100-40g"], 8)
    assert e.value.no_fit


def test_search_1t_on_3072_gpus_is_fast():
    job = Job(GPT_1T, 3072)
    for f in (pl._replay, pl._order, pl.live_profile):
        f.cache_clear()
    c0, t0 = time.process_time(), time.perf_counter()
    res = search(job, PRESETS["a100-80g"], 3072)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    print(f"1T GPT on 3072 A100-80GB: {cpu:.2f} s CPU ({wall:.2f} s wall), {len(res.candidates)} predicted, "
          f"{res.pruned} pruned; best {res.best.layout.describe()} {res.best.tflops_per_gpu:.0f} TFLOP/s")
    assert cpu < 30
    best = res.best.layout
    assert best.tp == 8 and best.pp > 1 and res.best.fits
    assert 100 < res.best.tflops_per_gpu < 312


def test_json_schema_and_order(tmp_path):
    out = tmp_path / "plan.json"
    code = main(["plan", "model.n_layer=8", "model.d_model=256", "model.n_head=8", "train.global_batch=64",
                 "--gpus", "8", "--gpu", "a100-80g", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert isinstance(data["search_s"], float)
    keys = {"dp", "pp", "tp", "sequence_parallel", "zero", "offload", "micro_batch", "schedule", "virtual",
            "recompute", "step_s", "tflops_per_gpu", "peak_mem_bytes", "fits"}
    assert data["candidates"] and all(keys <= set(c) for c in data["candidates"])
    steps = [c["step_s"] for c in data["candidates"]]
    assert steps == sorted(steps)
    assert all(c["dp"] * c["pp"] * c["tp"] == 8 for c in data["candidates"])


# -- config and CLI -------------------------------------------------------------------------
def test_split_overrides_takes_planner_only_keys():
    to_cfg, fixed = split_overrides(["train.recompute=full", "parallel.sequence_parallel=true", "parallel.tp=2",
                                     "train.lr=0.1", "parallel.dp=null"])
    assert fixed == {"recompute": "full", "sp": True, "tp": 2}
    assert "train.lr=0.1" in to_cfg and "parallel.tp=2" in to_cfg
    with pytest.raises(PlanError, match="train.recompute=some"):
        split_overrides(["train.recompute=some"])


def test_cli_plan_writes_a_ready_config(tmp_path, capsys):
    save, chart = tmp_path / "best.yaml", tmp_path / "plan.png"
    code = main(["plan", "--gpus", "2", "--gpu", "cpu", "--top", "3", "--save", str(save), "--chart", str(chart),
                 "train.global_batch=16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "best:" in out and "run it: gigatrain train" in out
    assert chart.stat().st_size > 1000
    cfg = load_config(str(save), [])
    resolved = resolve_for_world(cfg, 2)
    assert resolved.world_size == 2


def test_cli_exit_codes(capsys):
    assert main(["plan", "--gpus", "2", "--gpu", "tpu-v9"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert main(["plan", "--gpus", "4", "parallel.tp=2", "parallel.pp=2", "parallel.dp=2"]) == 2
    assert "not the 4 GPUs" in capsys.readouterr().err
    big = ["model.n_layer=128", "model.d_model=25600", "model.n_head=160", "model.seq_len=2048",
           "model.vocab_size=51200", "train.global_batch=64", "train.micro_batch=1"]
    assert main(["plan", *big, "--gpus", "8", "--gpu", "h100-80g"]) == 1
    assert "fits" in capsys.readouterr().err


def test_plan_for_and_predicted_peak_bytes():
    cfg = load_config(None, ["train.global_batch=16"])
    ov = plan_for(cfg, 2, "cpu")
    overrides = [f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}" for k, v in ov.items()]
    chosen = resolve_for_world(load_config(None, ["train.global_batch=16"] + overrides), 2)
    check_supported(chosen)
    peak = predicted_peak_bytes(chosen, "cpu")
    job = job_from_config(chosen, get_device("cpu"))
    assert 0 < peak < get_device("cpu").mem_bytes
    assert peak >= job.model.total_params() * 4


def test_step_time_parts_add_up():
    dev = PRESETS["h100-80g"]
    job = Job(SMALL, 64)
    for lay in (Layout(dp=4, pp=1, tp=2, micro_batch=4), Layout(dp=2, pp=4, tp=1, micro_batch=2, schedule="zb")):
        st = step_time(job, lay, dev)
        assert st.total == pytest.approx(st.compute + st.bubble + st.p2p + st.dp_comm + st.optimizer)
        assert 0 <= st.bubble_fraction < 1 and 0 <= st.comm_share < 1


# -- calibrated devices and the engine's tensor-parallel traffic -------------------------------
def test_calibrated_collective_fit_replaces_the_intra_node_link(tmp_path):
    from dataclasses import replace

    from gigatrain.planner.calibrate import matmul_envelope

    dev = replace(PRESETS["cpu"], collective_fits=(("reduce_scatter", 1e-3, 1e8),))
    assert collective_time("reduce_scatter", 1e6, 4, dev, False) == pytest.approx(3 * 1e-3 + 0.75 * 1e6 / 1e8)
    assert collective_time("all_gather", 1e6, 4, dev, False) == pytest.approx(3 * 0.7e-3 + 0.75 * 1e6 / 0.47e9)
    assert collective_time("reduce_scatter", 1e6, 4, dev, True) == pytest.approx(3 * 0.7e-3 + 0.75 * 1e6 / 0.47e9)
    path = tmp_path / "dev.json"
    path.write_text(dev.to_json())
    assert get_device(str(path)) == dev
    assert matmul_envelope([(8.0, 30.0), (1.0, 10.0), (64.0, 20.0)]) == [(1.0, 10.0), (8.0, 30.0), (64.0, 30.0)]


def test_sequence_parallel_traffic_is_what_the_engine_sends():
    from gigatrain.planner.cost import block_times

    dev, job = PRESETS["cpu"], Job(SMALL, 64, param_bytes=4)
    lay = Layout(dp=1, pp=1, tp=4, micro_batch=2)
    nbytes, h = 2 * 128 * 256 * 4, 256
    plain, sp = block_times(job, lay, dev), block_times(job, Layout(dp=1, pp=1, tp=4, sp=True, micro_batch=2), dev)
    ar, ag, rs = (collective_time(k, nbytes, 4, dev, False) for k in ("all_reduce", "all_gather", "reduce_scatter"))
    assert plain.tp_comm == pytest.approx(4 * ar)
    # forward: 2 gathers + 2 reduce-scatters; backward: the same, 2 gathers of the inputs the
    # column-parallel layers did not keep, and 6 small all-reduces of sequence-shard gradients
    assert sp.tp_comm == pytest.approx(4 * (ag + rs) + 2 * ag + 6 * collective_time("all_reduce", h * 4, 4, dev, False))


# -- fixed costs per block, micro-batch and pipeline action ----------------------------------------
def test_fit_fixed_recovers_action_fixed_and_slope():
    from gigatrain.planner.calibrate import fit_fixed

    # t = action + blocks * (fixed + slope * predicted) on the grid calibrate measures
    pts = [(k, v, 2e-4 + k * (3e-3 + 1.3 * v)) for k in (1, 2) for v in (0.004, 0.008, 0.016, 0.032)]
    assert fit_fixed(pts) == pytest.approx((2e-4, 3e-3, 1.3), rel=1e-6)
    # no fixed cost at all: nothing invented, and a would-be negative term is dropped, not kept
    pts = [(k, v, k * 1.1 * v) for k in (1, 2) for v in (0.004, 0.008, 0.016, 0.032)]
    action, fixed, slope = fit_fixed(pts)
    assert action == pytest.approx(0.0, abs=1e-9) and fixed == pytest.approx(0.0, abs=1e-9)
    assert slope == pytest.approx(1.1)


def test_calibrate_fixed_fits_against_the_cost_model():
    from dataclasses import replace

    from gigatrain.planner.calibrate import calibrate_fixed
    from gigatrain.planner.cost import block_times

    dev = replace(PRESETS["cpu"], block_fixed_f=0.0, block_fixed_b=0.0, action_overhead=0.0)
    job = Job(ModelSpec("gpt", 1, 256, 8, 128, 256), 8, param_bytes=4)
    rows = []
    for k in (1, 2):
        for b in (1, 2, 4, 8):
            bt = block_times(job, Layout(1, 1, 1, micro_batch=b), dev)
            # synthetic timings: 1 ms forward and 2 ms backward per block, 0.1 ms per call
            rows.append((k, b, 1e-4 + k * (1e-3 + bt.f), 2e-4 + k * (3e-3 + bt.f + bt.b + bt.w)))
    fitted = calibrate_fixed(dev, rows)
    assert fitted.block_fixed_f == pytest.approx(1e-3, rel=1e-4)
    assert fitted.block_fixed_b == pytest.approx(2e-3, rel=1e-4)
    assert fitted.action_overhead == pytest.approx(1e-4, rel=1e-3)
    # ranks sharing the cores: every fixed cost scales with the time each rank takes
    doubled = calibrate_fixed(dev, rows, scale=2.0)
    assert doubled.block_fixed_f == pytest.approx(2e-3, rel=1e-4)


def test_small_micro_batches_pay_the_fixed_cost_more_often():
    from dataclasses import replace

    base = replace(PRESETS["cpu"], block_fixed_f=0.0, block_fixed_b=0.0, action_overhead=0.0)
    ff, fb, act = 1e-3, 2e-3, 5e-4
    dev = replace(base, block_fixed_f=ff, block_fixed_b=fb, action_overhead=act)
    job = Job(SMALL, 16, param_bytes=4)
    L = SMALL.n_layer
    for mb in (1, 4):
        lay = Layout(dp=1, pp=1, tp=1, micro_batch=mb)
        M = 16 // mb
        extra = step_time(job, lay, dev).compute - step_time(job, lay, base).compute
        # every block and micro-batch once forward, once backward; the embedding and head one
        # block's worth; a forward and a backward call per micro-batch
        assert extra == pytest.approx(M * ((L + 1) * (ff + fb) + 2 * act))
    # full recomputation repeats the forward's fixed cost
    rc = Layout(dp=1, pp=1, tp=1, micro_batch=4, recompute="full")
    extra_rc = step_time(job, rc, dev).compute - step_time(job, rc, base).compute
    assert extra_rc == pytest.approx(4 * ((L + 1) * (ff + fb) + L * ff + 2 * act))
    # a pipeline pays the per-action overhead once per compute action: zero bubble splits W off
    for kind, actions in (("1f1b", 2), ("zb", 3)):
        lay = Layout(dp=1, pp=2, tp=1, micro_batch=2, schedule=kind)
        extra = step_time(job, lay, dev).compute - step_time(job, lay, base).compute
        assert extra == pytest.approx(8 * (L // 2 * (ff + fb) + actions * act) + 8 * 3 * (ff + fb) / 4)
    # the ranking follows: micro-batch 1 costs more than 4 by the fixed costs of 12 more passes
    t1 = step_time(job, Layout(1, 1, 1, micro_batch=1), dev).total - step_time(job, Layout(1, 1, 1, micro_batch=1), base).total
    t4 = step_time(job, Layout(1, 1, 1, micro_batch=4), dev).total - step_time(job, Layout(1, 1, 1, micro_batch=4), base).total
    assert t1 == pytest.approx(4 * t4)


def test_old_device_files_load_with_default_fixed_costs(tmp_path):
    import dataclasses

    from gigatrain.planner.presets import Device

    d = json.loads(PRESETS["h100-80g"].to_json())
    for k in ("block_fixed_f", "block_fixed_b", "action_overhead"):
        d.pop(k)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    dev = get_device(str(path))
    defaults = {f.name: f.default for f in dataclasses.fields(Device)}
    assert dev.block_fixed_f == defaults["block_fixed_f"] and dev.action_overhead == defaults["action_overhead"]
    assert 0 < dev.block_fixed_f < 1e-4  # launch-level on a GPU: tens of microseconds per block


@pytest.mark.parametrize("kind,pp,M,V", [("1f1b", 2, 1, 1), ("1f1b", 4, 8, 1), ("gpipe", 4, 2, 1), ("zb", 4, 8, 1),
                                         ("zb", 2, 3, 1), ("interleaved", 2, 4, 2)])
def test_ranks_sharing_cores_lend_the_bubble(kind, pp, M, V):
    b, w = (1.0, 1.0) if kind == "zb" else (2.0, 0.0)
    alone = pl._replay(kind, pp, M, V, b, w, 0.1)
    assert pl._replay_shared(kind, pp, M, V, b, w, 0.1, 1.0) == pytest.approx(alone)
    busy = M * V * (1.0 + b + w)
    for share in (0.5, 0.25):
        shared = pl._replay_shared(kind, pp, M, V, b, w, 0.1, share)
        # the cores do every rank's work, and no rank runs faster than a whole core
        assert max(busy, share * pl._replay(kind, pp, M, V, b, w, 0.1 / share)) - 1e-9 <= shared <= alone + 1e-9
        assert pl.makespan_lower_bound(kind, pp, M, V, b, w, 0.1, share) <= \
            pl.makespan_units(kind, pp, M, V, b, w, 0.1, share) + 1e-9
    # one micro-batch through two stages: one rank works at a time, at a whole core's speed
    if (kind, pp, M) == ("1f1b", 2, 1):
        assert pl._replay_shared(kind, pp, M, V, b, w, 0.0, 0.5) == pytest.approx(busy)
