"""End-to-end training through `gigatrain train`'s code path (ladder 3).

The oracle is one process: two data-parallel processes must give the same loss at every step,
resuming from a checkpoint must give the same losses as not stopping, and an fp16 overflow on one
rank must skip exactly that step on every rank.
"""
import math

import pytest

from dist_utils import assert_curves_close, spawn
from gigatrain.config import load_config

pytestmark = pytest.mark.rung3


def tiny(tmp, *extra):
    return load_config(None, [
        "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
        "data.name=pystdlib", "data.max_chars=200000", f"data.cache_dir={tmp}/cache",
        "train.steps=10", "train.global_batch=8", "train.micro_batch=4", "train.warmup_steps=2",
        "train.sample_tokens=0", "precision=fp32", "nproc=null", f"out={tmp}/run", *extra])


def _two_rank_cases(rank, world, tmp):
    from gigatrain.trainer import train
    out = {}
    out["sgd"] = train(tiny(tmp, "train.optimizer=sgd", "train.lr=0.5", f"out={tmp}/sgd2"), quiet=True).losses
    out["adamw"] = train(tiny(tmp, f"out={tmp}/adamw2"), quiet=True).losses
    # ZeRO through the config, as a user runs it (stages are tested in depth in test_zero*.py).
    for zero, offload in ((1, "none"), (2, "cpu"), (3, "cpu"), (3, "nvme")):
        out[f"zero{zero}-{offload}"] = train(tiny(tmp, "train.optimizer=sgd", "train.lr=0.5", f"parallel.zero={zero}",
                                                  f"parallel.offload={offload}", f"out={tmp}/z{zero}{offload}"),
                                             quiet=True).losses
    # Exact resume: stop after 5 (checkpoint at 5), then continue with resume=auto.
    first = train(tiny(tmp, "train.stop_after=5", "checkpoint.every=5", f"out={tmp}/resume"), quiet=True)
    second = train(tiny(tmp, "resume=auto", f"out={tmp}/resume"), quiet=True)
    out["resumed"] = first.losses + second.losses
    out["resume_start"] = second.start_step
    fp16 = train(tiny(tmp, "precision=fp16", "debug.inject_overflow_step=3", "debug.inject_overflow_rank=1",
                      f"out={tmp}/fp16"), quiet=True)
    out["fp16_skipped"] = fp16.skipped_steps
    out["fp16_losses"] = fp16.losses
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    from gigatrain.data import prepare_dataset
    cfg = tiny(tmp)
    prepare_dataset(cfg.data, cfg.model.seq_len)
    from gigatrain.trainer import train
    one = {
        "sgd": train(tiny(tmp, "train.optimizer=sgd", "train.lr=0.5", f"out={tmp}/sgd1"), quiet=True).losses,
        "adamw": train(tiny(tmp, f"out={tmp}/adamw1"), quiet=True).losses,
    }
    two = spawn(_two_rank_cases, 2, str(tmp), timeout_s=120)
    return tmp, one, two


def test_loss_parity_sgd(runs):
    _, one, two = runs
    assert len(one["sgd"]) == 10
    assert one["sgd"][-1] < one["sgd"][0]          # it learns
    for r in two:
        assert_curves_close(r["sgd"], one["sgd"], rtol=1e-5)


def test_zero_stages_through_the_config(runs):
    _, one, two = runs
    for r in two:
        for key in ("zero1-none", "zero2-cpu", "zero3-cpu", "zero3-nvme"):
            assert_curves_close(r[key], one["sgd"], rtol=1e-5, what=key)


def test_loss_parity_adamw(runs):
    _, one, two = runs
    for r in two:
        assert_curves_close(r["adamw"], one["adamw"], rtol=1e-4)


def test_exact_resume(runs):
    _, _, two = runs
    for r in two:
        assert r["resume_start"] == 5
        assert r["resumed"] == r["adamw"]         # bit-identical to the uninterrupted run


def test_fp16_overflow_skips_exactly_that_step_on_all_ranks(runs):
    _, _, two = runs
    for r in two:
        assert r["fp16_skipped"] == [3]
        assert len(r["fp16_losses"]) == 10 and all(math.isfinite(x) for x in r["fp16_losses"])
    assert two[0]["fp16_losses"] == two[1]["fp16_losses"]


def test_run_outputs(runs):
    import json
    tmp, _, _ = runs
    lines = (tmp / "adamw2" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10
    rec = json.loads(lines[-1])
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem_bytes",
                "peak_host_bytes"):
        assert key in rec
    assert rec["mfu"] is None and rec["tokens_per_s"] > 0 and rec["step"] == 10
    # CPU: no device memory; the host peak is the largest resident set over both ranks.
    assert rec["peak_mem_bytes"] is None and 50 * 2**20 < rec["peak_host_bytes"] < 64 * 2**30
    assert load_config(str(tmp / "adamw2" / "config.yaml"), []).parallel.dp == 2
