"""The default text job through the CLI, as a user runs it, in every layout (ladder 3).

Only the number of steps is cut: the end-of-run sample, evaluation and the final checkpoint stay
on. Code that runs on one rank alone hangs a sharded model (ZeRO-3 shards, pipeline stages), and
tests that switch the sample off hide it, so every layout runs here with its defaults.
"""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.rung3

LAYOUTS = {
    "dp2-zero0": [],
    "dp2-zero1": ["parallel.zero=1"],
    "dp2-zero2": ["parallel.zero=2"],
    "dp2-zero3": ["parallel.zero=3"],
    "dp2-zero3-cpu-offload": ["parallel.zero=3", "parallel.offload=cpu"],
    "pp2-1f1b": ["parallel.pp=2"],
    "dp2-tp2": ["parallel.tp=2"],
    "dp2-tp2-sp-zero1": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero=1"],
    "dp2-pp2-zero2-cpu-offload": ["parallel.pp=2", "parallel.zero=2", "parallel.offload=cpu"],
    "dp2-pp2-zero3-zb": ["parallel.pp=2", "parallel.zero=3", "parallel.pp_schedule=zb"],
}
NPROC = {"dp2-tp2": 4, "dp2-tp2-sp-zero1": 4, "dp2-pp2-zero2-cpu-offload": 4, "dp2-pp2-zero3-zb": 4}  # others: 2


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_default_job_finishes_with_sample_and_eval(name, tmp_path):
    out = tmp_path / "run"
    # A hang must fail the test quickly instead of waiting for the 600 s default.
    cmd = [sys.executable, "-m", "gigatrain", "train", "--nproc", str(NPROC.get(name, 2)), "--out", str(out),
           "train.steps=4", "train.sample_tokens=40", "parallel.timeout_s=90",
           "parallel.hang_timeout_s=45",
           *LAYOUTS[name]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    assert "--- sample ---" in r.stdout
    sample = r.stdout.split("--- sample ---", 1)[1].split("--------------", 1)[0].strip("\n")
    assert len(sample) >= 40, sample
    # The default job evaluates every 200 steps and at the end: here at step 4 only.
    assert "step 4: val loss" in r.stdout and "step 2: val loss" not in r.stdout
    assert (out / "checkpoints" / "step_000004" / "meta.json").is_file()
    assert "peak memory per rank (largest over ranks): host " in r.stdout
    _check_flops_per_device(out, NPROC.get(name, 2))


def _check_flops_per_device(out, world):
    """TFLOP/s per device count the whole model's FLOPs over all devices, whatever the split
    (a tensor-parallel rank holds a slice of the model, a ZeRO-3 rank placeholders)."""
    import json

    from gigatrain.config import load_config
    from gigatrain.data import open_dataset
    from gigatrain.models import build_model

    cfg = load_config(str(out / "config.yaml"), [])
    vocab = getattr(open_dataset(cfg.data, cfg.model.seq_len), "vocab_size", None)
    want = build_model(cfg.model, vocab_size=vocab).train_flops_per_sample()
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    got = rec["tflops_per_device"] * 1e12 * world / rec["samples_per_s"]
    assert abs(got - want) <= 1e-6 * want, (got, want)
