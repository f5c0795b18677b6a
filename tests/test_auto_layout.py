"""The planner before launch: ``parallel.auto=true`` picks the layout, every run prints its
predicted peak memory per rank, and a layout predicted not to fit is refused with the planner's
suggestion (rung 0 in-process; rung 3 through the CLI with real processes)."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from gigatrain.cli import main
from gigatrain.config import ConfigError, load_config, resolve_for_world
from gigatrain.planner import auto
from gigatrain.planner.auto import check_memory, choose_layout, given_keys, training_device
from gigatrain.planner.plan import plan_config, predicted_peak_bytes

ROOT = Path(__file__).resolve().parent.parent
# The default job (character GPT on the King James Bible), shrunk to run in seconds.
TINY = ["model.n_layer=2", "model.d_model=64", "model.seq_len=64", "train.steps=3", "train.sample_tokens=20",
        "parallel.timeout_s=60", "parallel.hang_timeout_s=30"]


def test_given_keys_from_file_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("parallel:\n  zero: 1\ntrain:\n  steps: 5\n")
    keys = given_keys(str(path), ["train.micro_batch=4", "parallel={pp: 2, tp: 1}"])
    assert keys == {"parallel.zero", "train.steps", "train.micro_batch", "parallel.pp", "parallel.tp"}
    # The built-in default job is not the user's choice: nothing of it is fixed.
    assert given_keys(None, ["parallel.auto=true"]) == {"parallel.auto"}


def test_training_device_on_cpu_counts_what_each_process_may_use():
    one, four = training_device(1), training_device(4)
    assert four.mem_bytes == pytest.approx(one.mem_bytes / 4, rel=0.05)  # MemAvailable moves a little
    assert four.runtime_bytes == 0 and four.gpus_per_node == 4
    assert training_device(4, same_on_every_rank=True).mem_bytes >= four.mem_bytes  # MemTotal


def test_choose_layout_is_the_planners_pick_and_keeps_given_keys():
    cfg = load_config(None, ["parallel.auto=true"])
    dev = training_device(4)
    free = choose_layout(cfg, 4, dev)
    best = plan_config(cfg, 4, dev, gpus_per_node=4, supported_only=True).best
    assert free.layout == best.layout
    assert not free.cfg.parallel.auto
    assert resolve_for_world(free.cfg, 4).world_size == 4
    kept = choose_layout(load_config(None, ["parallel.zero=1", "train.micro_batch=2"]), 4, dev,
                         {"parallel.zero", "train.micro_batch"})
    assert (kept.layout.zero, kept.layout.micro_batch) == (1, 2)
    assert (kept.cfg.parallel.zero, kept.cfg.train.micro_batch) == (1, 2)
    with pytest.raises(ConfigError, match="does not divide"):
        choose_layout(load_config(None, ["parallel.tp=3"]), 4, dev, {"parallel.tp"})


def test_the_default_job_is_never_refused():
    for n in (1, 2, 4):
        cfg = resolve_for_world(load_config(None, ["train.micro_batch=8"]), n)
        line = check_memory(cfg, n, training_device(n))
        assert line.startswith("predicted peak memory per rank") and f"{n} x cpu" in line


def test_a_layout_that_does_not_fit_is_refused_before_launch(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--nproc", "2", "--out", str(out), *TINY]
    cfg = resolve_for_world(load_config(None, [a for a in args if "=" in a]), 2)
    dev = training_device(2)
    need = predicted_peak_bytes(cfg, dev)
    # A device with 90% of what the configured layout needs: ZeRO or smaller micro-batches fit.
    small = replace(dev, mem_bytes=0.9 * need, host_mem_bytes=0.9 * need)
    monkeypatch.setattr(auto, "training_device", lambda *a, **k: small)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("gigatrain: error:") == 1 and "Traceback" not in err
    assert "dp2 pp1 tp1 zero0 mb16 is predicted to run out of memory" in err
    assert "The planner suggests" in err and "parallel.auto=true" in err
    assert not out.exists()  # refused before anything was created
    suggested = err.split("The planner suggests ")[1].split(" (")[0].split()
    alt = resolve_for_world(load_config(None, [a for a in args if "=" in a] + suggested), 2)
    assert check_memory(alt, 2, small).startswith("predicted")


def _train(args, timeout=150):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "gigatrain", "train", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=env)
    return r, r.stdout + r.stderr


@pytest.mark.rung3
@pytest.mark.parametrize("nproc,given", [(2, []), (4, ["train.micro_batch=4"])])
def test_auto_trains_the_default_job(nproc, given, tmp_path):
    out = tmp_path / "run"
    r, text = _train(["--nproc", str(nproc), "--out", str(out), "parallel.auto=true", *TINY, *given])
    assert r.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "--- sample ---" in r.stdout
    cfg = load_config(None, ["parallel.auto=true", *TINY, *given])
    pick = choose_layout(cfg, nproc, training_device(nproc), {g.split("=")[0] for g in given})
    assert f"parallel.auto chose {pick.layout.describe()}:" in r.stdout
    assert "predicted peak memory per rank" in r.stdout and f"for {pick.layout.describe()} on {nproc} x cpu" in r.stdout
    ran = yaml.safe_load((out / "config.yaml").read_text())
    p, t = ran["parallel"], ran["train"]
    assert (p["dp"], p["pp"], p["tp"], p["zero"], t["micro_batch"]) == \
        (pick.layout.dp, pick.layout.pp, pick.layout.tp, pick.layout.zero, pick.layout.micro_batch)
    if given:
        assert t["micro_batch"] == 4
    assert (out / "checkpoints" / "step_000003" / "meta.json").is_file()


@pytest.mark.rung3
def test_an_absurd_model_is_refused_before_launch(tmp_path):
    out = tmp_path / "run"
    r, text = _train(["--nproc", "2", "--out", str(out), "model.n_layer=96", "model.d_model=12288",
                      "model.n_head=96"], timeout=60)
    assert r.returncode == 2, text[-3000:]
    assert r.stderr.count("gigatrain: error:") == 1 and "Traceback" not in text
    assert "predicted to run out of memory" in r.stderr and "model states" in r.stderr
    assert "no layout of 2 x cpu fits this job" in r.stderr and "Use more or bigger devices" in r.stderr
    assert not out.exists()
