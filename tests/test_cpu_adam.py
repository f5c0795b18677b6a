"""CPU AdamW kernel for offload, against torch.optim.AdamW as the oracle.

The C++ kernel mirrors torch's fused CPU AdamW operation by operation, so against
``AdamW(fused=True)`` we require bit-identical results (on lengths that are a multiple of 16:
torch rounds the last ``numel % 16`` elements through a scalar tail with a different operation
order); against the default ``AdamW`` (for-loop), agreement to fp32 rounding.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from gigatrain.optim import cpu_adam
from gigatrain.optim.cpu_adam import CPUAdam, CPUAdamW, adamw_step_

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpp():
    if cpu_adam.backend() != "cpp":
        pytest.skip(f"C++ kernel not in use: {cpu_adam.build_info()['reason']}")


def make_problem(n, steps, seed=0, spread=True):
    """Params and gradients spanning many magnitudes (tiny gradients exercise eps)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    grads = []
    for _ in range(steps):
        g = torch.randn(n, generator=gen)
        if spread:
            g = g * 10.0 ** torch.randint(-7, 2, (n,), generator=gen).float()
        grads.append(g)
    return p, grads


def torch_reference(p0, grads, *, lr, betas, eps, weight_decay, maximize=False, **kw):
    param = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, **kw)
    for g in grads:
        param.grad = g.float().clone()
        opt.step()
    st = opt.state[param]
    return param.detach(), st["exp_avg"], st["exp_avg_sq"]


def ours(p0, grads, *, lr, betas, eps, weight_decay, **kw):
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step, g in enumerate(grads, 1):
        adamw_step_(p, g, m, v, step, lr, betas[0], betas[1], eps, weight_decay, **kw)
    return p, m, v


def assert_same(a, b):
    for x, y, name in zip(a, b, ("param", "exp_avg", "exp_avg_sq")):
        assert torch.equal(x, y), f"{name}: {(x != y).sum().item()} of {x.numel()} elements differ"


HYPER = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    dict(lr=3e-3, betas=(0.3, 0.95), eps=1e-6, weight_decay=0.0),  # beta1 < .5: the other lerp form
]


@pytest.mark.parametrize("hyper", HYPER)
def test_bit_identical_to_torch_fused(cpp, hyper):
    p0, grads = make_problem(4096 + 1024, steps=5)
    assert_same(ours(p0, grads, **hyper), torch_reference(p0, grads, fused=True, **hyper))


@pytest.mark.parametrize("hyper", HYPER)
def test_matches_default_torch_adamw(cpp, hyper):
    p0, grads = make_problem(3001, steps=6)  # odd length: masked tail in the kernel
    got, want = ours(p0, grads, **hyper), torch_reference(p0, grads, **hyper)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads_and_output(cpp, dtype):
    hyper = HYPER[0]
    p0, grads = make_problem(2048, steps=4, spread=False)
    grads = [g.to(dtype) for g in grads]
    want = torch_reference(p0, grads, fused=True, **hyper)  # oracle upcasts the grads first
    p, m, v = p0.clone(), torch.zeros(2048), torch.zeros(2048)
    out = torch.empty(2048, dtype=dtype)
    for step, g in enumerate(grads, 1):
        adamw_step_(p, g, m, v, step, hyper["lr"], *hyper["betas"], hyper["eps"], hyper["weight_decay"], out_lowp=out)
        assert torch.equal(out, p.to(dtype)), "out_lowp must be the fp32 result rounded to nearest even"
    assert_same((p, m, v), want)


def test_grad_scale_clip_and_maximize(cpp):
    hyper = HYPER[0]
    p0, grads = make_problem(2048, steps=3)
    scale, clip = 1024.0 * 3, 0.37  # not a power of two: the division must really be exact
    scaled = [(g * scale).to(torch.bfloat16) for g in grads]
    oracle_grads = [g.float() / scale * clip for g in scaled]
    want = torch_reference(p0, oracle_grads, fused=True, maximize=True, **hyper)
    got = ours(p0, scaled, grad_scale=torch.tensor(scale), clip_coef=clip, maximize=True, **hyper)
    assert_same(got, want)


def test_chunks_from_threads_equal_whole_update(cpp):
    hyper = HYPER[0]
    n = 100_003
    p0, grads = make_problem(n, steps=2)
    whole = ours(p0, grads, **hyper)
    bounds = [0, 7, 40_000, 40_016, 77_777, n]  # uneven, unaligned chunks
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    for step, g in enumerate(grads, 1):

        def update(a, b, k):
            # Even chunks pass whole-length buffers with a range, odd ones pass per-chunk buffers.
            if k % 2 == 0:
                adamw_step_(p, g, m, v, step, hyper["lr"], *hyper["betas"], hyper["eps"],
                            hyper["weight_decay"], out_lowp=out, start=a, end=b, num_threads=1)  # fmt: skip
            else:
                bucket_out = torch.empty(b - a, dtype=torch.bfloat16)
                adamw_step_(p, g[a:b].clone(), m, v, step, hyper["lr"], *hyper["betas"], hyper["eps"],
                            hyper["weight_decay"], out_lowp=bucket_out, start=a, end=b, num_threads=1)  # fmt: skip
                out[a:b] = bucket_out

        threads = [threading.Thread(target=update, args=(a, b, k)) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert_same((p, m, v), whole)
    assert torch.equal(out, p.to(torch.bfloat16))


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_simd_paths_agree(cpp, monkeypatch, isa):
    if isa == "avx2" and cpu_adam.build_info()["isa"] == "scalar":
        pytest.skip("no AVX2 on this machine")
    hyper = HYPER[0]
    p0, grads = make_problem(1024 + 9, steps=3)
    grads = [g if i % 2 else g.to(torch.bfloat16) for i, g in enumerate(grads)]
    best = ours(p0, grads, **hyper)
    monkeypatch.setattr(cpu_adam, "_isa_cap", {"avx2": 1, "scalar": 0}[isa])
    assert_same(ours(p0, grads, **hyper), best)
    for dtype in (torch.bfloat16, torch.float16):  # scalar conversions, incl. subnormal/overflow fp16
        x = torch.tensor([1.0, -2.5, 65504.0, 65520.0, 1e-6, 3e-8, -7e-9, 1e30, 1.00390625, 1.01171875])
        p = x.clone()
        out = torch.empty_like(p, dtype=dtype)
        zeros = torch.zeros_like(p)
        adamw_step_(p, zeros, zeros.clone(), zeros.clone(), 1, 0.0, out_lowp=out)  # lr 0: p unchanged
        assert torch.equal(p, x) and torch.equal(out, x.to(dtype))


def test_non_finite_values_like_torch(cpp):
    hyper = HYPER[0]
    p0, grads = make_problem(64, steps=2, spread=False)
    grads[0][3], grads[0][17], grads[1][40] = float("inf"), float("nan"), float("-inf")
    got, want = ours(p0, grads, **hyper), torch_reference(p0, grads, fused=True, **hyper)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_torch_fallback_paths(monkeypatch):
    hyper = HYPER[0]
    p0, grads = make_problem(3000, steps=4)
    # Fused-op fallback: torch's own fused kernel, so bit-identical to AdamW(fused=True) apart
    # from how that kernel treats its own tail; compare with the default AdamW to fp32 rounding.
    got = ours(p0, grads, backend="torch", **hyper)
    for x, y in zip(got, torch_reference(p0, grads, **hyper)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)
    # Plain-ops fallback (for torch builds without the fused op): same ops as the for-loop AdamW.
    p, m, v = p0.clone(), torch.zeros(3000), torch.zeros(3000)
    for step, g in enumerate(grads, 1):
        cpu_adam._torch_step(p, g, m, v, None, float(step), hyper["lr"], *hyper["betas"], hyper["eps"],
                             hyper["weight_decay"], 1.0, 1.0, ops=True)  # fmt: skip
    assert_same((p, m, v), torch_reference(p0, grads, foreach=False, **hyper))
    # Low-precision grads, scale and bf16 output through the fallback, in several blocks.
    monkeypatch.setattr(cpu_adam, "_TORCH_BLOCK", 1000)
    g16 = [(g * 8).to(torch.bfloat16) for g in grads]
    want = torch_reference(p0, [g.float() / 8 for g in g16], **hyper)
    p, m, v = p0.clone(), torch.zeros(3000), torch.zeros(3000)
    out = torch.empty(3000, dtype=torch.bfloat16)
    for step, g in enumerate(g16, 1):
        adamw_step_(p, g, m, v, step, hyper["lr"], *hyper["betas"], hyper["eps"], hyper["weight_decay"],
                    grad_scale=8.0, out_lowp=out, backend="torch")  # fmt: skip
    for x, y in zip((p, m, v), want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)
    assert torch.equal(out, p.to(torch.bfloat16))


def test_optimizer_matches_adamw_and_checkpoints_interchange():
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.GELU(), torch.nn.Linear(32, 5))

    def train(net, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = torch.randn(16, 13, generator=gen), torch.randn(16, 5, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()

    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    a, b = model(), model()
    opt_a, opt_b = CPUAdamW(a.parameters(), **kw), torch.optim.AdamW(b.parameters(), **kw)
    train(a, opt_a, 5, seed=1)
    train(b, opt_b, 5, seed=1)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    # Our state dict drives torch's AdamW and the other way round (copied: loading a state dict
    # keeps its tensors, which the original optimizer goes on updating).
    sd = copy.deepcopy(opt_a.state_dict())
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt_a.param_groups[0].keys() == opt_b.param_groups[0].keys()
    assert sd["state"][0]["step"].dtype == opt_b.state_dict()["state"][0]["step"].dtype
    c = model()
    c.load_state_dict(a.state_dict())
    opt_c = torch.optim.AdamW(c.parameters(), **kw)
    opt_c.load_state_dict(sd)
    d = model()
    d.load_state_dict(b.state_dict())
    opt_d = CPUAdamW(d.parameters(), **kw)
    opt_d.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    train(a, opt_a, 3, seed=2)
    train(c, opt_c, 3, seed=2)
    train(b, opt_b, 3, seed=2)
    train(d, opt_d, 3, seed=2)
    for x, y in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    for x, y in zip(b.parameters(), d.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_cpuadam_front_end_and_validation():
    p0, grads = make_problem(256, steps=2)
    opt = CPUAdam(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    p, m, v = p0.clone(), torch.zeros(256), torch.zeros(256)
    for step, g in enumerate(grads, 1):
        opt.step_(p, g, m, v, step)
    assert_same((p, m, v), ours(p0, grads, **HYPER[0]))
    assert CPUAdam.backend() in ("cpp", "torch")
    with pytest.raises(ValueError, match="fp32"):
        adamw_step_(p.double(), g, m, v, 1, 1e-3)
    with pytest.raises(ValueError, match="elements"):
        adamw_step_(p, g[:10], m, v, 1, 1e-3)
    with pytest.raises(ValueError, match="range"):
        adamw_step_(p, g, m, v, 1, 1e-3, start=10, end=300)
    with pytest.raises(ValueError, match="amsgrad"):
        CPUAdamW([torch.nn.Parameter(p)], amsgrad=True)


_CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from gigatrain.optim import cpu_adam
        import torch
        info = cpu_adam.build_info()
        p, g, m, v = torch.ones(100), torch.full((100,), 0.5), torch.zeros(100), torch.zeros(100)
        cpu_adam.adamw_step_(p, g, m, v, 1, 0.1)
    print(json.dumps(dict(info=info, p=p[0].item(), warnings=[str(w.message) for w in caught])))
    """
)


def _spawn(env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    env.pop("GIGATRAIN_CPU_ADAM_BACKEND", None)
    cmd = [sys.executable, "-c", _CHILD]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.rung3
def test_build_is_shared_by_concurrent_processes(tmp_path):
    # Two processes start at once on an empty cache: both must get the kernel, built once.
    cache = tmp_path / "ext"
    procs = [_spawn({"GIGATRAIN_EXT_DIR": str(cache)}) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["info"]["backend"] == "cpp", r
        assert r["p"] == pytest.approx(1.0 - 0.1, abs=1e-6)  # first step moves by lr
        assert not r["warnings"], r["warnings"]
    assert results[0]["info"]["library"] == results[1]["info"]["library"]
    assert len(list(cache.glob("*.so"))) == 1


def test_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_adam, "_loaded", None)  # forget this process's kernel (restored after)
    monkeypatch.setattr(cpu_adam, "_isa_cap", cpu_adam._isa_cap)
    monkeypatch.setenv("GIGATRAIN_EXT_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")  # a "compiler" that always fails
    monkeypatch.delenv("GIGATRAIN_CPU_ADAM_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="C[+][+] kernel unavailable") as caught:
        assert cpu_adam.backend() == "torch"
        p, g, m, v = torch.ones(100), torch.full((100,), 0.5), torch.zeros(100), torch.zeros(100)
        adamw_step_(p, g, m, v, 1, 0.1)
        adamw_step_(p, g, m, v, 2, 0.1)
    messages = [str(w.message) for w in caught if "kernel unavailable" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert cpu_adam.build_info()["reason"].startswith("RuntimeError: compile failed")
    assert p[0].item() == pytest.approx(1.0 - 0.1 - 0.1, abs=1e-5)
    with pytest.raises(RuntimeError, match="unavailable"):
        adamw_step_(p, g, m, v, 3, 0.1, backend="cpp")
